"""A campaign end to end: the real server (`python server.py`) dials through the Twilio
REST emulator, whose numbers answer, are busy, don't answer or fail and send the status
callbacks Twilio would; outcomes and retries land on the contacts. And the do-not-call list
and the destination guard in front of `POST /dialout`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest

from phonebot.emulator import TwilioRestEmulator
from phonebot.emulator.script import Pause
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY
from tests.live_server import LiveServer, free_port
from tests.test_calls import server_env

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NUMBERS = [f"+1202555{n:04d}" for n in range(100, 110)]  # America/New_York


def noon_zone() -> str:
    """A fixed-offset zone where it is about noon now: the server's scheduler reads the real
    clock, and a contact's 00:00-23:59 window there stays open for the whole test, whenever
    the suite runs (in New York's own zone it would close at 23:59)."""
    offset = 12 - datetime.now(UTC).hour  # hours east of UTC, -11 to +12
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(rest_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = server_env(rest_port, ADMIN_API_KEY=ADMIN_KEY, CAMPAIGN_TICK_S="0.2",
                     TWILIO_REST_TIMEOUT_S="1")
    live = LiveServer(env, tmp_path_factory.mktemp("campaigns"))
    yield live
    live.stop()


async def _callee_hangs_up(call, caller) -> None:
    """The person who answers listens for a moment and hangs up."""
    await caller.run([Pause(0.5)], check=False)


@pytest.fixture
async def twilio(server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    emulator = TwilioRestEmulator(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port,
        local_server_url=server.base_url, on_answer=_callee_hangs_up,
        outcomes={NUMBERS[1]: "busy", NUMBERS[2]: "no-answer", NUMBERS[3]: "failed"},
        no_answer_after=0.3,
    )
    async with emulator:
        yield emulator


async def _wait_done(client: httpx.AsyncClient, campaign: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    detail: dict = {}
    while time.monotonic() < deadline:
        detail = (await client.get(f"/campaigns/{campaign}", headers=ADMIN)).json()
        if detail["status"] == "completed":
            return detail
        await asyncio.sleep(0.3)
    raise AssertionError(f"campaign not completed: {detail}")


async def test_a_campaign_through_the_emulator(server: LiveServer, twilio: TwilioRestEmulator):
    body = {
        "name": "emulated", "parameters": {"campaign_id": "summer_sale"},
        "contacts": [{"to": n, "customer_id": f"c-{i}", "timezone": noon_zone()}
                     for i, n in enumerate(NUMBERS[:4])],
        "window": {"start": "00:00", "end": "23:59"},
        "max_concurrent": 2, "calls_per_minute": 60,
        "retry": {"attempts": 2, "delay_s": 0, "on": ["busy", "no-answer", "failed"]},
    }
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        created = await client.post("/campaigns", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        detail = await _wait_done(client, created.json()["id"], timeout_s=90)
    contacts = {c["to"]: c for c in detail["contacts"]}
    assert {n: (c["state"], c["outcome"], c["attempts"]) for n, c in contacts.items()} == {
        NUMBERS[0]: ("completed", "completed", 1),
        NUMBERS[1]: ("failed", "busy", 2),
        NUMBERS[2]: ("failed", "no-answer", 2),
        NUMBERS[3]: ("failed", "failed", 2),
    }
    # Each attempt is one Twilio call, and the contact names the calls it made.
    placed = [r for r in twilio.requests if r.method == "POST" and r.path.endswith("Calls.json")]
    assert sorted(r.form["To"] for r in placed) == sorted(
        [NUMBERS[0]] + [n for n in NUMBERS[1:4] for _ in range(2)])
    assert {sid for c in contacts.values() for sid in c["call_sids"]} == set(twilio.calls)


async def test_a_lost_create_answer_is_unknown_and_a_refusal_is_retried(
    server: LiveServer, twilio: TwilioRestEmulator
):
    """Twilio slow past TWILIO_REST_TIMEOUT_S, then placing the call anyway: the contact is
    "unknown" and never dialed again. Twilio answering 503 (nothing placed): tried again."""
    twilio.inject_fault(None, delay=2.5, on="create")  # the first create: slow, then placed
    body = {
        "name": "faults", "contacts": [{"to": NUMBERS[6], "timezone": noon_zone()}],
        "window": {"start": "00:00", "end": "23:59"}, "max_concurrent": 1,
        "retry": {"attempts": 3, "delay_s": 0, "on": ["busy", "no-answer", "failed"]},
    }
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        lost = (await client.post("/campaigns", json=body, headers=ADMIN)).json()["id"]
        detail = await _wait_done(client, lost, timeout_s=60)
        assert [(c["state"], c["outcome"], c["attempts"]) for c in detail["contacts"]] == [
            ("unknown", "unknown", 1)]
        await asyncio.sleep(4)  # the slow create went through: that call rang
        creates = [r for r in twilio.requests if r.path.endswith("Calls.json")]
        assert len(creates) == 1

        twilio.inject_fault(503, on="create")
        retried = (await client.post("/campaigns", json={**body, "contacts": [
            {"to": NUMBERS[7], "timezone": noon_zone()}]}, headers=ADMIN)).json()["id"]
        detail = await _wait_done(client, retried, timeout_s=60)
    assert [(c["state"], c["outcome"], c["attempts"]) for c in detail["contacts"]] == [
        ("completed", "completed", 2)]


async def test_dialout_honours_the_do_not_call_list_and_the_guard(
    server: LiveServer, twilio: TwilioRestEmulator
):
    dialout = {"Authorization": f"Bearer {DIALOUT_KEY}"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20) as client:
        listed = await client.post("/dnc", json={"numbers": [NUMBERS[5]]}, headers=ADMIN)
        assert listed.status_code == 200
        refused = await client.post("/dialout", json={"to": NUMBERS[5]}, headers=dialout)
        assert refused.status_code == 403
        assert refused.json()["rule"] == "do-not-call list"
        premium = await client.post("/dialout", json={"to": "+19005550100"}, headers=dialout)
        assert premium.status_code == 403 and premium.json()["rule"] == "premium-rate"
        abroad = await client.post("/dialout", json={"to": "+33612345678"}, headers=dialout)
        assert abroad.status_code == 403
        assert abroad.json()["rule"] == "DIALOUT_ALLOWED_COUNTRIES"
        assert twilio.requests == []  # none of them reached Twilio (a fresh emulator)
        await client.delete(f"/dnc/{NUMBERS[5]}", headers=ADMIN)
        allowed = await client.post("/dialout", json={"to": NUMBERS[5]}, headers=dialout)
        assert allowed.status_code == 201, allowed.text
