"""Events to the user's system: signed, stored, retried with the same id, resumed after a
restart, and never in a call's way. A local aiohttp receiver plays the user's endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import socket
import time

import pytest
from aiohttp import web
from loguru import logger
from sqlalchemy import select

from phonebot.records import Records
from phonebot.records.events import (
    SIGNATURE_HEADER,
    backoff_s,
    encode,
    new_event,
    signature_header,
    verify_signature,
)
from phonebot.records.schema import EventDelivery
from tests.conftest import make_settings

pytest_plugins = ["tests.pg_server"]
SECRET = "whsec-test-0123456789"
FAST_RETRY = {"retry_base_s": 0.05, "retry_cap_s": 0.2, "poll_s": 0.5}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """The user's endpoint: answers the given statuses in turn (then 200), keeps every POST."""

    def __init__(self, answers: list[int] | None = None, hold: bool = False) -> None:
        self.answers = list(answers or [])
        # hold=True: every answer waits until the test sets `release` (a hanging receiver).
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.posts: list[tuple[str, bytes]] = []  # (signature header, raw body)
        self.answered = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/phonebot"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((request.headers.get(SIGNATURE_HEADER, ""), body))
        await self.release.wait()
        self.answered += 1
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/phonebot", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.posts]

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.posts) < count:
            assert time.monotonic() < deadline, f"{len(self.posts)} of {count} POSTs arrived"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver():
    receivers: list[Receiver] = []

    async def make(*args, **kwargs) -> Receiver:
        receiver = Receiver(*args, **kwargs)
        await receiver.start()
        receivers.append(receiver)
        return receiver

    yield make
    for receiver in receivers:
        await receiver.stop()


def records_for(database_url: str, url: str, **options) -> Records:
    settings = make_settings(
        database_url=database_url, events_webhook_url=url, events_webhook_secret=SECRET
    )
    return Records(settings, **{**FAST_RETRY, **options})


# --- signatures ----------------------------------------------------------------------------
def test_a_signature_verifies_and_any_change_breaks_it():
    body = encode(new_event("call.started", {"call_sid": "CA1"}))
    now = int(time.time())
    header = signature_header(SECRET, body, now)
    assert verify_signature(SECRET, header, body)
    assert not verify_signature(SECRET, header, body.replace(b"CA1", b"CA2"))
    assert not verify_signature("another-secret", header, body)
    assert not verify_signature(SECRET, header, body, tolerance_s=300, now=now + 301)
    assert verify_signature(SECRET, header, body, tolerance_s=300, now=now + 299)
    old = signature_header(SECRET, body, now - 3600)
    assert not verify_signature(SECRET, old, body)  # a replayed capture
    assert not verify_signature(SECRET, header.replace("v1=", "v0="), body)
    for broken in ["", "t=abc,v1=00", "v1=00", "garbage"]:
        assert not verify_signature(SECRET, broken, body)
    # Several v1 values (a secret being rotated): any may match.
    assert verify_signature(SECRET, f"{header},v1={'0' * 64}", body)


async def test_a_delivery_is_signed_over_its_timestamp_and_raw_body(tmp_path, receiver):
    """What docs/records.md promises receivers, checked from outside: v1 is the HMAC-SHA256
    of "<t>.<raw body>" keyed with the secret, computed here independently; the timestamp is
    part of what is signed, so a tampered t= fails, and so does a MAC of the body alone."""
    endpoint = await receiver()
    records = records_for(f"sqlite:///{tmp_path / 'signed.db'}", endpoint.url)
    await records.start()
    records.writer.call_started("CAsig", direction="inbound", from_number="+15550001")
    await endpoint.wait_for(1)
    await records.stop()

    header, body = endpoint.posts[0]
    fields = dict(item.split("=", 1) for item in header.split(","))
    assert set(fields) == {"t", "v1"}
    timestamp = fields["t"]
    ours = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert fields["v1"] == ours.hexdigest()
    assert abs(int(timestamp) - time.time()) < 60
    assert json.loads(body)["data"]["call_sid"] == "CAsig"
    assert verify_signature(SECRET, header, body)
    tampered = header.replace(f"t={timestamp}", f"t={int(timestamp) - 1}")
    assert tampered != header and not verify_signature(SECRET, tampered, body)
    body_only = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert not verify_signature(SECRET, f"t={timestamp},v1={body_only}", body)


def test_backoff_doubles_with_jitter_up_to_the_cap():
    rng = random.Random(7)
    for attempts, full in [(1, 5), (2, 10), (3, 20), (8, 640), (20, 3600)]:
        delay = backoff_s(attempts, rng, base_s=5, cap_s=3600)
        assert full * 0.5 <= delay <= full
    # Jitter: receivers coming back from an outage are not retried in lockstep.
    assert len({backoff_s(3, rng, base_s=5, cap_s=3600) for _ in range(5)}) == 5


# --- delivery ------------------------------------------------------------------------------
async def test_a_failed_delivery_is_retried_with_the_same_id(database_url, receiver):
    endpoint = await receiver([500])  # first try fails, the retry succeeds
    records = records_for(database_url, endpoint.url)
    await records.start()
    records.writer.call_started("CAev", direction="inbound", from_number="+15550001")
    records.writer.transcript("CAev", "caller", "hello")
    records.writer.transcript("CAev", "bot", "hi there", reply_latency_s=0.5)
    records.writer.call_ended("CAev", end_reason="caller hung up")
    await endpoint.wait_for(3)
    await records.stop()

    events = endpoint.events()
    # The retry of call.started may come before or after call.ended: ids are what count.
    started = [e for e in events if e["type"] == "call.started"]
    (ended,) = [e for e in events if e["type"] == "call.ended"]
    assert len(started) == 2 and started[0] == started[1]  # same id, same body
    assert started[0]["id"] != ended["id"]
    for header, body in endpoint.posts:
        assert verify_signature(SECRET, header, body)
    assert set(ended) == {"id", "type", "created", "data"}
    assert ended["data"]["call_sid"] == "CAev" and ended["data"]["end_reason"] == "caller hung up"
    assert [(e["speaker"], e["text"]) for e in ended["data"]["transcript"]] == [
        ("caller", "hello"), ("bot", "hi there")
    ]
    async with records.sessions() as session:
        rows = {r.type: r for r in (await session.scalars(select(EventDelivery))).all()}
    assert rows["call.started"].attempts == 2 and rows["call.started"].delivered_at
    assert rows["call.ended"].attempts == 1 and rows["call.ended"].last_error is None


async def test_pending_events_are_sent_after_a_restart(database_url, receiver):
    port = free_port()  # nothing listens yet: the first server's tries fail
    url = f"http://127.0.0.1:{port}/hooks/phonebot"
    first = records_for(database_url, url, retry_base_s=0.2)
    await first.start()
    first.writer.dialout_status("CAbusy", "busy", to_number="+15559990000")
    await first.writer.flush()
    async with first.sessions() as session:
        while not (await session.scalar(select(EventDelivery.attempts))):
            await asyncio.sleep(0.02)
    await first.stop()
    async with first.sessions() as session:
        stored = (await session.scalars(select(EventDelivery))).one()
    assert stored.delivered_at is None and "ConnectError" in stored.last_error

    endpoint = Receiver()
    endpoint.port = port
    await endpoint.start()
    try:
        second = records_for(database_url, url)
        await second.start()
        await endpoint.wait_for(1)
        await second.stop()
    finally:
        await endpoint.stop()
    (event,) = endpoint.events()
    assert (event["id"], event["type"]) == (stored.id, "call.failed")
    assert event["data"]["twilio_status"] == "busy"
    assert event["data"]["end_reason"] == "not connected"


async def test_a_slow_receiver_never_delays_the_record(tmp_path, receiver):
    endpoint = await receiver(hold=True)
    records = records_for(f"sqlite:///{tmp_path / 'slow.db'}", endpoint.url)
    await records.start()
    records.writer.call_started("CAslow", direction="inbound")
    await endpoint.wait_for(1)  # the receiver is now sitting on call.started
    records.writer.transcript("CAslow", "caller", "still talking")
    records.writer.call_ended("CAslow", end_reason="caller hung up")
    await records.writer.flush()
    assert endpoint.answered == 0  # the record was written while the POST still hangs
    assert (await records.store.get("CAslow")).end_reason == "caller hung up"
    endpoint.release.set()
    await records.stop()


async def test_delivery_gives_up_after_the_max_age(tmp_path, receiver):
    endpoint = await receiver([500] * 1000)
    records = records_for(f"sqlite:///{tmp_path / 'old.db'}", endpoint.url, max_age_s=0.3)
    await records.start()
    records.writer.call_started("CAold")
    deadline = time.monotonic() + 10
    while records.events.gave_up == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    tries = len(endpoint.posts)
    await asyncio.sleep(0.5)
    assert len(endpoint.posts) == tries  # no more tries once given up
    async with records.sessions() as session:
        row = (await session.scalars(select(EventDelivery))).one()
    await records.stop()
    assert row.next_attempt_at is None and row.delivered_at is None
    assert row.last_error.startswith(f"gave up after {tries} tries: HTTP 500")
    assert tries >= 2


async def test_events_need_both_url_and_secret(tmp_path):
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    try:
        settings = make_settings(
            database_url=f"sqlite:///{tmp_path / 'x.db'}", events_webhook_url="http://x/"
        )
        records = Records(settings)
    finally:
        logger.remove(sink)
    assert records.events is None
    assert any("EVENTS_WEBHOOK_SECRET is not" in line for line in lines)
    await records.engine.dispose()
