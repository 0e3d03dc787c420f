"""Call records from whole calls: the real server, the Twilio emulator, the offline engines.

A dial-in call leaves a record with the caller's and the bot's turns in order, a keypad
entry, reply latencies and the end reason; dial-outs that reach voicemail, are busy or go
unanswered leave records with that outcome (from Twilio's signed status callbacks);
`call.ended` reaches a local receiver, signed; records survive a restart. The dial-in
record test runs on SQLite and on a real PostgreSQL server (tests/pg_server.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from phonebot.emulator import (
    Dtmf,
    Hangup,
    MediaStreamCaller,
    Pause,
    TwilioRestEmulator,
    WaitForBot,
    WaitForHangup,
)
from phonebot.emulator.client import record_pointer
from phonebot.emulator.signature import compute_signature
from phonebot.records import Records
from phonebot.records.call_log import CallLog, ReplyLatencies
from phonebot.records.events import SIGNATURE_HEADER, verify_signature
from phonebot.records.service import session_records
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer, free_port
from tests.test_calls import (
    CALLER,
    OUR_NUMBER,
    barge_in_script,
    call_in,
    dialin_opening,
    say,
    server_env,
)

pytest_plugins = ["tests.pg_server"]

ADMIN_KEY = "test-admin-key-0123456789"
EVENTS_SECRET = "test-events-secret-abcdef"
CALLEE = "+15551234567"


# --- a receiver for the events -----------------------------------------------------------


class EventReceiver:
    """A plain HTTP endpoint on loopback that keeps every POST (headers and raw body)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/phonebot"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def events(self, call_sid: str) -> list[dict]:
        """This call's events, in arrival order, each checked against its signature."""
        found = []
        for headers, body in list(self.received):
            event = json.loads(body)
            if event["data"].get("call_sid") != call_sid:
                continue
            assert verify_signature(EVENTS_SECRET, headers[SIGNATURE_HEADER], body), headers
            found.append(event)
        return found

    async def wait_for(self, call_sid: str, event_type: str, timeout_s: float = 15) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events(call_sid):
                if event["type"] == event_type:
                    return event
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {event_type} for {call_sid}: {self.events(call_sid)}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[EventReceiver]:
    listening = EventReceiver()
    yield listening
    listening.close()


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


def records_env(rest_port: int, database_url: str, events_url: str | None = None) -> dict:
    env = server_env(rest_port, ADMIN_API_KEY=ADMIN_KEY, DATABASE_URL=database_url)
    if events_url:
        env |= {"EVENTS_WEBHOOK_URL": events_url, "EVENTS_WEBHOOK_SECRET": EVENTS_SECRET}
    return env


@dataclass
class ServerSlot:
    """A SQLite server that the restart test stops and replaces with its successor."""

    env: dict[str, str]
    folder: Path
    live: LiveServer

    def restart(self) -> LiveServer:
        self.live.stop()
        assert self.live.wait_exit(1) == 0
        self.live = LiveServer(self.env, self.folder)
        return self.live


@pytest.fixture(scope="module")
def sqlite_server(
    rest_port: int, receiver: EventReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("records-sqlite")
    env = records_env(rest_port, f"sqlite:///{folder / 'records.db'}", receiver.url)
    live = LiveServer(env, folder)
    yield live
    live.stop()


@pytest.fixture
def sqlite_slot(rest_port: int, receiver: EventReceiver, tmp_path: Path) -> Iterator[ServerSlot]:
    """The restart test's own server and database: no earlier test's leftovers (a webhook
    answered whose stream never came) are in its drain."""
    env = records_env(rest_port, f"sqlite:///{tmp_path / 'records.db'}", receiver.url)
    slot = ServerSlot(env, tmp_path, LiveServer(env, tmp_path))
    yield slot
    slot.live.stop()


@pytest.fixture(scope="module")
def postgresql_server(
    rest_port: int, postgres_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = records_env(rest_port, postgres_server.create_database())
    live = LiveServer(env, tmp_path_factory.mktemp("records-pg"))
    yield live
    live.stop()


@pytest.fixture
async def twilio(rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    """Twilio's REST side; `local_server_url` is set per test (two servers share the port)."""
    emulator = TwilioRestEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port)
    async with emulator:
        yield emulator


# --- reading records -------------------------------------------------------------------


async def record_of(
    server: LiveServer,
    call_sid: str,
    ready: Callable[[dict], bool] = lambda r: r["ended_at"] is not None,
    timeout_s: float = 10.0,
) -> dict:
    """GET /calls/{sid} until `ready` (writes are batched: a fraction of a second late)."""
    url = f"{server.base_url}/calls/{call_sid}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            response = await client.get(url, headers=headers)
            if response.status_code == 200:
                body = response.json()
                if ready(body):
                    return body
            else:
                assert response.status_code == 404, response.text
            await asyncio.sleep(0.2)
    raise AssertionError(f"record of {call_sid} not ready: {body or 'no record'}")


async def dialout(server: LiveServer, body: dict) -> str:
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(
            f"{server.base_url}/dialout",
            json=body,
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
    assert response.status_code == 201, response.text
    return response.json()["call_sid"]


# --- dial-in ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_dialin_call_is_recorded_turn_by_turn(backend, request, twilio):
    server: LiveServer = request.getfixturevalue(f"{backend}_server")
    twilio.local_server_url = server.base_url
    script = [
        WaitForBot(),
        say("my order has not arrived"),
        # The whole answer before the keys: on a starved machine (four test workers on 2
        # cores) a pause between its sentences once ended a 0.8 s wait, and the keys cut
        # the answer off (recorded as interrupted).
        WaitForBot(timeout=15, quiet=2.5),
        Dtmf("42#"),
        WaitForBot(timeout=8),
        Hangup(),
    ]
    result = await call_in(server, twilio, script, session_type="support")
    record = await record_of(server, result.call_sid)

    support = shipped_agent("support")
    order = next(entry.answer for entry in support.answers if "order" in entry.keywords)
    lines = [(e["kind"], e["speaker"], e["text"]) for e in record["transcript"]]
    assert lines == [
        ("bot", "bot", dialin_opening("support")),
        ("caller", "caller", lines[1][2]),
        ("bot", "bot", order),
        ("keypad", "caller", "42#"),
        ("bot", "bot", "You pressed 4 2 pound."),
    ], lines
    assert "order" in lines[1][2]  # what the offline STT heard
    greeting, heard, answer, keys, pressed = record["transcript"]
    assert [e["seq"] for e in record["transcript"]] == [0, 1, 2, 3, 4]
    assert greeting["at_s"] <= heard["at_s"] <= answer["at_s"] <= keys["at_s"] <= pressed["at_s"]
    assert keys["data"] == {"digits": "42#"}
    # The caller's wait for each reply, from the turn timings; none for the greeting.
    assert greeting["reply_latency_s"] is None
    assert 0 < answer["reply_latency_s"] < 5 and 0 < pressed["reply_latency_s"] < 5
    assert record["reply_latency_p50_s"] is not None
    assert record["reply_latency_p95_s"] >= record["reply_latency_p50_s"]
    assert not any(e["interrupted"] for e in record["transcript"])

    assert record["end_reason"] == "caller hung up"
    assert record["direction"] == "inbound"
    assert (record["from"], record["to"]) == (CALLER, OUR_NUMBER)
    assert record["persona"] == "support"
    assert "token" not in record["parameters"]
    assert record["parameters"]["session_type"] == "support"
    assert record["provider_errors"] == {"stt": 0, "llm": 0, "tts": 0}
    assert record["webhook_answered_at"] <= record["stream_started_at"] <= record["ended_at"]
    assert 2 < record["duration_s"] < 60
    assert server.error_lines() == []


async def test_bot_speech_cut_off_by_the_caller_is_recorded_as_interrupted(sqlite_server, twilio):
    twilio.local_server_url = sqlite_server.base_url
    script = barge_in_script()
    result = await call_in(sqlite_server, twilio, script)
    record = await record_of(sqlite_server, result.call_sid)

    greeting = record["transcript"][0]
    assert (greeting["kind"], greeting["interrupted"]) == ("bot", True), record["transcript"]
    # Cut off early, it keeps its whole text and what of it was heard (Pipecat's own turn
    # text is only the sentences played in full; tests/test_interrupted_turns.py).
    assert greeting["text"] == dialin_opening("general")
    assert greeting["text"].startswith(greeting["data"]["heard_text"])
    assert greeting["at_s"] < 2.0
    assert [e["kind"] for e in record["transcript"][1:3]] == ["caller", "bot"]
    assert not record["transcript"][2]["interrupted"]


async def test_call_ended_reaches_the_receiver_signed_with_the_whole_record(
    sqlite_server, twilio, receiver
):
    twilio.local_server_url = sqlite_server.base_url
    result = await call_in(sqlite_server, twilio, [WaitForBot(), Hangup()])
    record = await record_of(sqlite_server, result.call_sid)

    started = await receiver.wait_for(result.call_sid, "call.started")
    ended = await receiver.wait_for(result.call_sid, "call.ended")  # signature checked
    assert started["data"]["direction"] == "inbound"
    assert ended["data"]["transcript"] == record["transcript"]
    assert ended["data"]["end_reason"] == "caller hung up"
    assert ended["id"] != started["id"]


async def test_a_twilio_webhook_retry_keeps_the_first_answer_time(sqlite_server, twilio):
    """Twilio's retry of a webhook we answered gets the same TwiML from the replay cache,
    and the record keeps when the call was first answered."""
    twilio.local_server_url = sqlite_server.base_url
    call_sid = "CA" + "7" * 32
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": CALLER, "To": OUR_NUMBER}
    url = f"{sqlite_server.base_url}/"
    headers = {
        "X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, form),
        "I-Twilio-Idempotency-Token": "retry-test-token",
    }
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.post(url, data=form, headers=headers)
        answered = await record_of(sqlite_server, call_sid, lambda r: True)
        await asyncio.sleep(0.5)
        again = await client.post(url, data=form, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.text == first.text
    await asyncio.sleep(0.6)  # the writer's batch window
    later = await record_of(sqlite_server, call_sid, lambda r: True)
    assert later["webhook_answered_at"] == answered["webhook_answered_at"]


# --- dial-outs ----------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["busy", "no-answer"])
async def test_a_dialout_that_never_connects_is_recorded_with_its_outcome(
    outcome, sqlite_server, twilio, receiver
):
    twilio.local_server_url = sqlite_server.base_url
    twilio.set_outcome(CALLEE, outcome)
    twilio.no_answer_after = 0.5
    campaign = {"campaign_id": "summer_sale", "customer_id": "c-42"}
    call_sid = await dialout(sqlite_server, {"to": CALLEE, "parameters": campaign})
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=10)
    assert call.answered.is_set() is False  # no stream ever opened

    record = await record_of(sqlite_server, call_sid)
    assert record["twilio_status"] == outcome
    assert record["end_reason"] == "not connected"
    assert record["direction"] == "outbound"
    assert (record["from"], record["to"]) == (OUR_NUMBER, CALLEE)
    assert (record["campaign_id"], record["customer_id"]) == ("summer_sale", "c-42")
    assert record["stream_started_at"] is None and record["transcript"] == []
    failed = await receiver.wait_for(call_sid, "call.failed")
    assert failed["data"]["twilio_status"] == outcome
    # Twilio's progress callbacks, as the emulator sent them, all accepted.
    events = [cb.form["CallStatus"] for cb in twilio.status_callbacks]
    assert events[-1] == outcome and ("ringing" in events) == (outcome == "no-answer")
    assert [cb.status for cb in twilio.status_callbacks] == [204] * len(events)
    assert [cb.form["SequenceNumber"] for cb in twilio.status_callbacks] == [
        str(n) for n in range(len(events))
    ]


async def test_a_dialout_answered_by_voicemail_is_recorded_with_the_amd_verdict(
    sqlite_server, twilio
):
    twilio.local_server_url = sqlite_server.base_url
    greeting = say("Hi, you've reached Alex. Please leave a message after the beep.")
    twilio.answered_by = "machine_end_beep"
    twilio.amd_delay = greeting.duration + 0.5

    async def machine(call, caller: MediaStreamCaller):
        call.result = await caller.run([greeting, Pause(0.3), WaitForHangup(timeout=45)])

    twilio.on_answer = machine
    body = {"to": CALLEE, "parameters": {"campaign_id": "summer_sale"}, "machine_detection": True}
    call_sid = await dialout(sqlite_server, body)
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=60)
    assert call.exception is None, call.error

    record = await record_of(sqlite_server, call_sid, lambda r: r["twilio_status"] is not None)
    assert record["amd_verdict"] == "machine_end_beep"
    assert record["end_reason"] == "voicemail"
    assert record["twilio_status"] == "completed"
    assert record["direction"] == "outbound"
    bot_lines = [e["text"] for e in record["transcript"] if e["kind"] == "bot"]
    assert bot_lines == [shipped_agent("summer_sale").voicemail]
    assert not [e for e in record["transcript"] if e["kind"] == "caller"]  # muted until AMD


# --- /status --------------------------------------------------------------------------


async def test_status_callbacks_are_signature_checked_and_validated(sqlite_server):
    url = f"{sqlite_server.base_url}/status"
    good = {"CallSid": "CA" + "8" * 32, "CallStatus": "busy", "AccountSid": ACCOUNT_SID}
    async with httpx.AsyncClient(timeout=10) as client:
        unsigned = await client.post(url, data=good)
        forged = await client.post(
            url, data=good, headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}
        )
        bad = {**good, "CallStatus": "exploded"}
        invalid = await client.post(
            url, data=bad, headers={"X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, bad)}
        )
        no_sid = {"CallStatus": "busy"}
        missing = await client.post(
            url,
            data=no_sid,
            headers={"X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, no_sid)},
        )
        accepted = await client.post(
            url, data=good, headers={"X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, good)}
        )
    assert unsigned.status_code == forged.status_code == 403
    assert invalid.status_code == 422 and invalid.json()["field"] == "CallStatus"
    assert missing.status_code == 422 and missing.json()["field"] == "CallSid"
    assert accepted.status_code == 204
    record = await record_of(sqlite_server, good["CallSid"])
    assert (record["twilio_status"], record["end_reason"]) == ("busy", "not connected")


# --- restart ----------------------------------------------------------------------------


async def test_records_survive_a_server_restart(sqlite_slot: ServerSlot, twilio):
    twilio.local_server_url = sqlite_slot.live.base_url
    result = await call_in(sqlite_slot.live, twilio, [WaitForBot(), Hangup()])
    before = await record_of(sqlite_slot.live, result.call_sid)

    after = await record_of(sqlite_slot.restart(), result.call_sid)
    assert after == before
    assert [e["kind"] for e in after["transcript"]] == ["bot"]


def test_the_call_tool_says_where_the_record_is():
    sid = "CA" + "1" * 32
    assert record_pointer("http://127.0.0.1:8000/", sid) == (
        f"record: GET http://127.0.0.1:8000/calls/{sid} (Authorization: Bearer $ADMIN_API_KEY),"
        f" or python -m phonebot.records show {sid}"
    )



# --- the emulator plays the called numbers ----------------------------------------------


async def test_the_emulator_posts_twilio_status_callbacks_for_each_outcome():
    """A failed number is refused at once, a canceled call reports canceled; each callback
    carries this call's SequenceNumber and a Timestamp, like Twilio's."""
    hooks = EventReceiver()
    async with TwilioRestEmulator(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        outcomes={"+15550000001": "failed"},
        answer_delay=1,
    ) as twilio:
        client = twilio.client(async_http=True)
        options = {
            "from_": OUR_NUMBER,
            "url": "http://127.0.0.1:1/outbound",
            "status_callback": hooks.url,
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
        }
        failed = await client.calls.create_async(to="+15550000001", **options)
        ringing = await client.calls.create_async(to="+15550000002", **options)
        await client.calls(ringing.sid).update_async(status="canceled")
        for sid in (failed.sid, ringing.sid):
            await twilio.calls[sid].wait_finished(timeout=10)
        with pytest.raises(ValueError, match="outcome must be one of"):
            twilio.set_outcome("+15550000003", "engaged")
        await client.http_client.close()
    hooks.close()

    def sent(sid: str) -> list[dict[str, str]]:
        return [cb.form for cb in twilio.status_callbacks if cb.form["CallSid"] == sid]

    assert [f["CallStatus"] for f in sent(failed.sid)] == ["queued", "failed"]
    assert [f["CallStatus"] for f in sent(ringing.sid)] == ["queued", "canceled"]
    for sid in (failed.sid, ringing.sid):
        assert [f["SequenceNumber"] for f in sent(sid)] == ["0", "1"]
        assert all(f["Timestamp"].endswith("+0000") for f in sent(sid))
        assert sent(sid)[-1]["CallDuration"] == "0"
    assert len(hooks.received) == 4 and all(cb.status == 200 for cb in twilio.status_callbacks)


# --- Pipecat Cloud: a session's own records ---------------------------------------------


async def test_a_pipecat_cloud_session_writes_its_record_and_sends_its_events(postgres_server):
    """No app on Pipecat Cloud: the session opens records on the shared PostgreSQL, and by
    the time it is over its record is written and `call.ended` has been sent."""
    hooks = EventReceiver()
    url = postgres_server.create_database()
    settings = make_settings(
        database_url=url, events_webhook_url=hooks.url, events_webhook_secret=EVENTS_SECRET
    )
    sid = "CA" + "9" * 32
    try:
        async with session_records(settings) as writer:
            assert writer is not None
            writer.call_started(sid, direction="inbound", from_number=CALLER)
            writer.transcript(sid, "bot", "Hello")
            writer.call_ended(sid, end_reason="caller hung up")
        sent = [json.loads(body) for _, body in hooks.received]
    finally:
        hooks.close()
    assert [e["type"] for e in sent] == ["call.started", "call.ended"]
    assert sent[1]["data"]["transcript"][0]["text"] == "Hello"
    records = Records(settings)
    try:
        stored = await records.store.get(sid)
    finally:
        await records.engine.dispose()
    assert stored is not None and stored.end_reason == "caller hung up"


# --- the call's log, without a server -------------------------------------------------------


class FakeWriter:
    """Stands in for RecordWriter: keeps what the call log enqueues."""

    def __init__(self) -> None:
        self.lines: list[tuple] = []

    def transcript(self, call_sid, kind, text=None, **fields) -> None:
        self.lines.append((kind, text, fields.get("data"), fields.get("reply_latency_s")))


def test_a_turn_with_speech_then_keys_is_two_lines_and_latencies_follow_the_timeline():
    writer = FakeWriter()
    log = CallLog(writer, "CA1")  # type: ignore[arg-type]
    log.caller_turn("my number is The caller pressed 42#")
    log.caller_turn("   ")
    timings: list[dict] = []
    latencies = ReplyLatencies(timings)
    assert latencies.next() is None  # the greeting: no caller turn before it
    timings += [{"audio_out_s": None}, {"audio_out_s": 0.8}]
    log.bot_turn("Thanks", reply_latency_s=latencies.next())
    assert latencies.next() is None  # a re-prompt: nothing new
    assert writer.lines == [
        ("caller", "my number is", None, None),
        ("keypad", "42#", {"digits": "42#"}, None),
        ("bot", "Thanks", None, 0.8),
    ]
    log.bot_turn("", interrupted=True)  # cut off before a sentence was played in full
    log.bot_turn("")  # nothing said, nothing cut off: no line
    assert writer.lines[-1] == ("bot", None, None, None) and len(writer.lines) == 4
    CallLog(None, "CA2").caller_turn("hello")  # records off: nothing to do, no error
