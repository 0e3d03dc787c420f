"""Issue 16, vulnerabilities 3 and 6, as attacks on the call records.

6. One long field must not lose other calls' writes: every value is bounded by its column
   (422 at the edge, truncation with a log line in the writer), and a batch that fails on
   one operation is written again one operation per transaction, so only that one is lost.
3. Late or replayed callbacks must not rewrite finished calls: status callbacks only move
   a call forward and never change who called, an AMD verdict counts once, and a webhook
   for a call that already has a record is not answered twice, even after the replay cache
   forgot it.

Each runs on SQLite and on a real PostgreSQL (tests/pg_server.py), which enforces
`varchar(n)`: under CI=true a missing PostgreSQL fails, locally it skips.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from phonebot.config import Settings
from phonebot.db.engine import create_engine, sessionmaker
from phonebot.db.migrate import migrate
from phonebot.emulator.ids import new_call_sid
from phonebot.records import Records
from phonebot.records.call_log import CallLog
from phonebot.records.schema import CallRecord, TranscriptEntry, column_length, utcnow
from phonebot.records.store import CallStore
from phonebot.records.writer import RecordWriter
from phonebot.web.app import create_app
from phonebot.web.services import app_services
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings

pytest_plugins = ["tests.pg_server"]

CALLER = "+15557654321"
OUR_NUMBER = "+15550001111"
CALLEE = "+15551234567"
ATTACKER = "+19005550100"
LONG_FROM = "+1" + "5" * 315  # 317 characters: overflowed varchar(255) on PostgreSQL
SECRET_WORDS = "my card number is 4111 1111 1111 1111"


# --- the writer: one bad value loses only itself ---------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator:
    await migrate(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


def innocent_calls(writer: RecordWriter) -> None:
    """Two calls' writes, the kind the lost batch took with it: from and stream start."""
    for call_sid in ("CAinnocent1", "CAinnocent2"):
        CallLog(writer, call_sid).started(
            direction="inbound", persona="support", parameters={"caller_id": CALLER}
        )
        writer.transcript(call_sid, "caller", "hello")


async def test_a_317_character_from_is_cut_to_its_column_and_other_calls_are_written(db, logs):
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    innocent_calls(writer)
    CallLog(writer, "CAlong").started(
        direction="inbound", persona="support", parameters={"caller_id": LONG_FROM}
    )
    innocent_calls(writer)  # before and after it, in the same batch
    writer.start()
    await writer.flush()
    await writer.close()

    store = CallStore(sessionmaker(db))
    for call_sid in ("CAinnocent1", "CAinnocent2"):
        call = await store.get(call_sid)
        assert call.from_ == CALLER and call.stream_started_at is not None
        assert len(call.transcript) == 2
    long = await store.get("CAlong")
    limit = column_length(CallRecord.from_number)
    assert long.from_ == LONG_FROM[:limit] and long.stream_started_at is not None
    assert (writer.failed_writes, writer.written) == (0, 9)
    cut = [line for line in logs if "stored truncated" in line]
    assert len(cut) == 1 and "CAlong" in cut[0] and "from_number" in cut[0]
    assert LONG_FROM[:20] not in cut[0]


async def a_line_already_written(db) -> None:
    """Line 0 of CAdup, as another server process wrote it: this writer's line 0 of the
    same call then violates the transcript's primary key."""
    other_process = RecordWriter(sessionmaker(db), queue_size=10)
    other_process.start()
    other_process.transcript("CAdup", "caller", "first")
    await other_process.close()


@pytest.mark.parametrize("fault", ["constraint", "unencodable"])
async def test_a_batch_with_one_failing_write_still_writes_all_the_others(db, logs, fault):
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    innocent_calls(writer)
    if fault == "constraint":
        await a_line_already_written(db)
        writer.transcript("CAdup", "caller", SECRET_WORDS)  # seq 0 again
        bad = "CAdup"
    else:  # a value the JSON column can't encode
        writer.transcript("CAbad", "function", SECRET_WORDS, data={"result": object()})
        bad = "CAbad"
    innocent_calls(writer)
    writer.call_ended("CAinnocent1", end_reason="caller hung up")
    writer.start()  # all of it is one batch
    await writer.flush()
    await writer.close()

    store = CallStore(sessionmaker(db))
    first, second = await store.get("CAinnocent1"), await store.get("CAinnocent2")
    assert first.from_ == CALLER and first.stream_started_at and first.ended_at
    assert second.from_ == CALLER and len(second.transcript) == 2
    assert writer.failed_writes == 1 and writer.written == 9
    assert writer.stats()["database_failing"] is False
    lost = [line for line in logs if "was lost" in line]
    assert len(lost) == 1 and bad in lost[0] and "transcript line 0" in lost[0]
    assert not any("4111" in line for line in logs)  # never the value
    async with sessionmaker(db)() as session:
        lines = (await session.scalars(
            select(TranscriptEntry.text).where(TranscriptEntry.call_sid == bad)
        )).all()
    assert SECRET_WORDS not in lines


async def test_a_value_postgresql_refuses_loses_only_its_own_write(
    postgres_server, monkeypatch, logs
):
    """Should a value slip past the truncation (a column it doesn't know), PostgreSQL's
    "value too long" fails that write alone, never its batch."""
    url = postgres_server.create_database()
    await migrate(url)
    engine = create_engine(url)
    monkeypatch.setattr("phonebot.records.writer.fit", lambda table, fields, call_sid: fields)
    writer = RecordWriter(sessionmaker(engine), queue_size=100)
    innocent_calls(writer)
    writer.call_updated("CAlong", transfer_target=LONG_FROM)
    innocent_calls(writer)
    writer.start()
    await writer.flush()
    await writer.close()
    store = CallStore(sessionmaker(engine))
    assert (await store.get("CAinnocent2")).stream_started_at is not None
    assert await store.get("CAlong") is None
    await engine.dispose()
    assert (writer.failed_writes, writer.written) == (1, 8)
    lost = [line for line in logs if "was lost" in line]
    assert len(lost) == 1 and "CAlong" in lost[0] and "StringDataRightTruncation" in lost[0]
    assert LONG_FROM[:20] not in lost[0]


async def test_a_database_that_is_down_is_still_one_outage_not_a_retry_per_write(logs):
    """The one-by-one retry is for a bad value only: an unreachable database fails the
    batch once, as before (no 200 connection attempts)."""
    engine = create_engine("postgresql://nobody@127.0.0.1:1/none")
    writer = RecordWriter(sessionmaker(engine), queue_size=100)
    innocent_calls(writer)
    writer.start()
    await writer.flush()
    await writer.close()
    await engine.dispose()
    assert (writer.failed_writes, writer.written) == (4, 0)
    assert not any("was lost" in line for line in logs)
    assert sum("database write failed" in line for line in logs) == 1


# --- the writer: a finished call stays as it was, also when callbacks race -------------------


async def test_the_writer_keeps_the_first_final_status_verdict_and_caller(db):
    """The route checks the record first; these are the writer's own conditional UPDATEs,
    which hold when two processes take the callbacks at once."""
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    writer.start()
    writer.call_updated("CAdial", direction="outbound", from_number=OUR_NUMBER, to_number=CALLEE)
    writer.dialout_status("CAdial", "completed")
    writer.call_updated("CAdial", amd_verdict="human")
    await writer.flush()
    writer.dialout_status("CAdial", "busy", from_number=ATTACKER, to_number=ATTACKER)
    writer.dialout_status("CAdial", "ringing", from_number=ATTACKER)
    writer.call_updated("CAdial", amd_verdict="machine_end_beep", from_number=ATTACKER)
    await writer.flush()
    await writer.close()

    call = await CallStore(sessionmaker(db)).get("CAdial")
    assert (call.twilio_status, call.amd_verdict) == ("completed", "human")
    assert (call.from_, call.to, call.direction) == (OUR_NUMBER, CALLEE, "outbound")
    assert call.ended_at is None  # "busy" did not close it as not connected
    assert writer.failed_writes == 0


async def test_a_connected_call_can_only_complete(db):
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    writer.start()
    CallLog(writer, "CAin").started(
        direction="inbound", persona="support", parameters={"caller_id": CALLER}
    )
    writer.call_ended("CAin", end_reason="caller hung up")
    writer.dialout_status("CAin", "busy", from_number=ATTACKER)
    await writer.flush()
    call = await CallStore(sessionmaker(db)).get("CAin")
    assert (call.twilio_status, call.from_, call.direction) == (None, CALLER, "inbound")
    assert call.end_reason == "caller hung up"
    writer.dialout_status("CAin", "completed")  # Twilio's own, after the stream ended
    await writer.flush()
    await writer.close()
    assert (await CallStore(sessionmaker(db)).get("CAin")).twilio_status == "completed"


# --- the server: the edge and the callbacks ---------------------------------------------------


def signed(path: str, form: dict[str, str]) -> dict[str, str]:
    url = f"http://testserver{path}"
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, form)}


class Server:
    """The app in this process, records started (no models, no lifespan), and a client."""

    def __init__(self, app) -> None:
        self.app = app
        self.records: Records = app_services(app).records
        transport = httpx.ASGITransport(app=app)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async def post(self, path: str, form: dict[str, str], **headers: str) -> httpx.Response:
        return await self.http.post(path, data=form, headers={**signed(path, form), **headers})

    async def record(self, call_sid: str):
        await self.records.writer.flush()
        return await self.records.store.get(call_sid)


async def running(settings: Settings) -> AsyncIterator[Server]:
    app = create_app(settings)
    server = Server(app)
    await server.records.start()
    try:
        yield server
    finally:
        await server.http.aclose()
        await server.records.stop()


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[Server]:
    async for running_server in running(make_settings(database_url=database_url)):
        yield running_server


def webhook(call_sid: str, **fields: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": CALLER, "To": OUR_NUMBER,
            "Direction": "inbound", **fields}


def status(call_sid: str, call_status: str, **fields: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "CallStatus": call_status,
            "From": OUR_NUMBER, "To": CALLEE, **fields}


def verdict(call_sid: str, answered_by: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "AnsweredBy": answered_by,
            "MachineDetectionDuration": "1200"}


@pytest.mark.parametrize(("path", "form"), [
    ("/", webhook("CA" + "1" * 32, From=LONG_FROM)),
    ("/outbound", webhook("CA" + "1" * 32, To=LONG_FROM)),
    ("/status", status("CA" + "1" * 32, "ringing", From=LONG_FROM)),
])
async def test_a_from_or_to_longer_than_its_column_gets_422_naming_it(server, path, form):
    response = await server.post(path, form)
    assert response.status_code == 422
    assert response.json()["field"] == ("To" if path == "/outbound" else "From")
    assert await server.record(form["CallSid"]) is None


async def test_record_parameters_longer_than_their_columns_get_422(server):
    campaign = "c" * (column_length(CallRecord.campaign_id) + 1)  # fits a parameter (256)
    response = await server.post(f"/?campaign_id={campaign}", webhook(new_call_sid()))
    assert response.status_code == 422
    assert response.json()["field"] == "query.campaign_id"
    body = {"to": CALLEE, "parameters": {"customer_id": "c" * 200}}
    placed = await server.http.post(
        "/dialout", json=body, headers={"Authorization": f"Bearer {DIALOUT_KEY}"}
    )
    assert placed.status_code == 422  # refused before Twilio is asked
    assert placed.json()["field"] == "parameters.customer_id"


async def finished_inbound_call(server: Server) -> str:
    """A dial-in that connected and ended, as the bot records it."""
    call_sid = new_call_sid()
    writer = server.records.writer
    writer.call_updated(call_sid, webhook_answered_at=utcnow())
    CallLog(writer, call_sid).started(
        direction="inbound", persona="support", parameters={"caller_id": CALLER}
    )
    writer.call_ended(call_sid, end_reason="caller hung up")
    await writer.flush()
    return call_sid


async def test_a_late_busy_status_does_not_rewrite_a_finished_call(server, logs):
    call_sid = await finished_inbound_call(server)
    answer = await server.post("/status", status(call_sid, "busy", From=ATTACKER))
    assert answer.status_code == 204
    call = await server.record(call_sid)
    assert (call.twilio_status, call.from_, call.direction) == (None, CALLER, "inbound")
    assert call.end_reason == "caller hung up"
    assert any(f"{call_sid}: Twilio status busy ignored" in line for line in logs)


async def test_status_callbacks_only_move_a_dialout_forward(server, logs):
    call_sid = new_call_sid()
    assert (await server.post("/status", status(call_sid, "ringing"))).status_code == 204
    assert (await server.post("/status", status(call_sid, "completed"))).status_code == 204
    assert (await server.record(call_sid)).twilio_status == "completed"
    for late in ("busy", "in-progress", "completed"):  # late, out of order, replayed
        answer = await server.post("/status", status(call_sid, late, From=ATTACKER))
        assert answer.status_code == 204
    call = await server.record(call_sid)
    assert (call.twilio_status, call.from_, call.to) == ("completed", OUR_NUMBER, CALLEE)
    assert call.ended_at is None
    ignored = [line for line in logs if "ignored (the call already has its final" in line]
    assert len(ignored) == 3


async def test_a_status_callback_never_changes_who_called(server):
    call_sid = new_call_sid()
    await server.post("/status", status(call_sid, "ringing"))
    await server.post("/status", status(call_sid, "in-progress", From=ATTACKER, To=ATTACKER))
    call = await server.record(call_sid)
    assert (call.from_, call.to) == (OUR_NUMBER, CALLEE)


async def test_a_second_amd_verdict_is_ignored(server, logs):
    call_sid = new_call_sid()
    await server.post("/status", status(call_sid, "in-progress"))
    assert (await server.post("/amd", verdict(call_sid, "human"))).status_code == 204
    again = await server.post("/amd", verdict(call_sid, "machine_end_beep"))
    assert again.status_code == 204
    assert (await server.record(call_sid)).amd_verdict == "human"
    assert await app_services(server.app).amd_verdicts.get(call_sid) == "human"
    assert any(f"{call_sid}: AMD verdict machine_end_beep ignored" in line for line in logs)


async def test_the_verdict_store_keeps_the_first_verdict_without_records(tmp_path):
    """Records off: the shared verdict store alone keeps the first (SET NX)."""
    settings = make_settings(call_records=False, database_url=f"sqlite:///{tmp_path / 'r.db'}")
    async for server in running(settings):
        call_sid = new_call_sid()
        await server.post("/amd", verdict(call_sid, "machine_start"))
        await server.post("/amd", verdict(call_sid, "human"))
        assert await app_services(server.app).amd_verdicts.get(call_sid) == "machine_start"


async def test_an_amd_verdict_for_a_finished_inbound_call_is_ignored(server):
    call_sid = await finished_inbound_call(server)
    assert (await server.post("/amd", verdict(call_sid, "machine_end_beep"))).status_code == 204
    assert (await server.record(call_sid)).amd_verdict is None
    assert await app_services(server.app).amd_verdicts.get(call_sid) is None


@pytest.fixture
async def forgetful_server(database_url: str) -> AsyncIterator[Server]:
    """A replay cache that forgets after 0.3 s (REPLAY_CACHE_TTL_S)."""
    settings = make_settings(database_url=database_url, replay_cache_ttl_s=0.3)
    async for running_server in running(settings):
        yield running_server


@pytest.mark.parametrize("path", ["/", "/outbound"])
async def test_a_webhook_replayed_after_the_replay_cache_expired_gets_409(
    forgetful_server, path, logs
):
    call_sid = new_call_sid()
    first = await forgetful_server.post(path, webhook(call_sid))
    assert first.status_code == 200 and "<Stream" in first.text
    assert (await forgetful_server.record(call_sid)).webhook_answered_at is not None
    await asyncio.sleep(0.5)  # the replay cache has forgotten the CallSid
    replay = await forgetful_server.post(path, webhook(call_sid))
    assert replay.status_code == 409, replay.text
    assert "already answered" in replay.json()["detail"]
    assert "<Stream" not in replay.text


async def test_twilios_retry_of_an_answered_webhook_still_gets_the_same_answer(server):
    """Twilio's retry (same I-Twilio-Idempotency-Token, within WEBHOOK_RETRY_WINDOW_S) is
    answered from the cache before the record is looked at."""
    call_sid = new_call_sid()
    token = {"I-Twilio-Idempotency-Token": "idem-retry-1"}
    first = await server.post("/", webhook(call_sid), **token)
    assert (await server.record(call_sid)).webhook_answered_at is not None
    again = await server.post("/", webhook(call_sid), **token)
    assert first.status_code == again.status_code == 200
    assert again.text == first.text


async def test_a_dialout_record_without_an_answer_is_answered_once(server):
    """/dialout's record exists before Twilio fetches /outbound: that is no replay."""
    call_sid = new_call_sid()
    server.records.writer.call_updated(
        call_sid, direction="outbound", from_number=OUR_NUMBER, to_number=CALLEE
    )
    await server.post("/status", status(call_sid, "ringing"))
    await server.records.writer.flush()
    assert (await server.post("/outbound", webhook(call_sid))).status_code == 200
