"""The record writer: a call's record and transcript land in order, writes are batched off
the call path, and a failing database or a full queue is counted and logged, never raised."""

from __future__ import annotations

import asyncio
import time

import pytest
from loguru import logger
from sqlalchemy import event, select

from phonebot.db.engine import create_engine, sessionmaker
from phonebot.db.migrate import migrate
from phonebot.records import Records
from phonebot.records.schema import TranscriptEntry
from phonebot.records.store import CallStore
from phonebot.records.writer import RecordWriter, percentile
from tests.conftest import make_settings

pytest_plugins = ["tests.pg_server"]
# For tests where the writer never starts: a database it must not touch.
NO_DATABASE = None


@pytest.fixture
async def db(database_url: str):
    await migrate(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def log_lines():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


def a_whole_call(writer: RecordWriter, call_sid: str = "CA1") -> None:
    writer.call_started(
        call_sid,
        direction="inbound",
        from_number="+15551230000",
        to_number="+15550001111",
        persona="support",
        parameters={"session_type": "support", "token": "deadbeefcafe0123", "user_id": "u1"},
        campaign_id="spring",
    )
    writer.transcript(call_sid, "bot", "Hi, how can I help?", reply_latency_s=0.4)
    writer.transcript(call_sid, "caller", "my order has not arrived")
    writer.transcript(call_sid, "bot", "Let me check that", reply_latency_s=0.8, interrupted=True)
    writer.transcript(call_sid, "keypad", "1")
    writer.transcript(
        call_sid, "function", data={"name": "lookup", "arguments": {"id": 7}, "result": "late"}
    )
    writer.transcript(call_sid, "reprompt", "Sorry, I didn't catch that.")
    writer.transcript(call_sid, "bot", "Goodbye!", reply_latency_s=1.2)
    writer.call_updated(call_sid, amd_verdict="human", recording_path="/tmp/x.wav")
    writer.call_ended(call_sid, end_reason="bot ended", provider_errors={"stt": 1})


async def test_a_call_is_recorded_with_its_transcript_in_order(db):
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    writer.start()
    a_whole_call(writer)
    await writer.flush()
    await writer.close()
    call = await CallStore(sessionmaker(db)).get("CA1")

    assert call is not None
    assert (call.direction, call.from_, call.to, call.persona, call.campaign_id) == (
        "inbound", "+15551230000", "+15550001111", "support", "spring"
    )
    assert call.parameters == {"session_type": "support", "user_id": "u1"}  # no token
    assert call.end_reason == "bot ended" and call.ended_at and call.stream_started_at
    assert call.duration_s is not None and call.duration_s >= 0
    assert (call.amd_verdict, call.has_recording, call.provider_errors) == (
        "human", True, {"stt": 1}
    )
    assert [(e.seq, e.kind, e.speaker) for e in call.transcript] == [
        (0, "bot", "bot"), (1, "caller", "caller"), (2, "bot", "bot"), (3, "keypad", "caller"),
        (4, "function", "bot"), (5, "reprompt", "bot"), (6, "bot", "bot"),
    ]
    assert [e.interrupted for e in call.transcript] == [False, False, True] + [False] * 4
    assert call.transcript[4].data == {"name": "lookup", "arguments": {"id": 7}, "result": "late"}
    offsets = [e.at_s for e in call.transcript]
    assert offsets == sorted(offsets) and offsets[0] >= 0
    # p50/p95 of the bot's reply latencies (0.4, 0.8, 1.2).
    assert (call.reply_latency_p50_s, call.reply_latency_p95_s) == (0.8, 1.16)


def test_percentiles_interpolate_like_numpy():
    assert percentile([0.4, 0.8, 1.2], 50) == 0.8
    assert percentile([1.2, 0.4, 0.8], 95) == 1.16
    assert percentile([0.5], 95) == 0.5


async def test_writes_are_batched_in_one_transaction(db):
    commits: list[int] = []
    event.listen(db.sync_engine, "commit", lambda _conn: commits.append(1))
    writer = RecordWriter(sessionmaker(db), queue_size=1000)
    writer.call_started("CAbatch", direction="inbound")
    for i in range(120):
        writer.transcript("CAbatch", "caller", f"line {i}")
    writer.start()  # the 121 queued writes are drained as one batch
    await writer.flush()
    await writer.close()
    assert writer.written == 121
    assert len(commits) == 1
    async with sessionmaker(db)() as session:
        seqs = (await session.scalars(select(TranscriptEntry.seq))).all()
    assert sorted(seqs) == list(range(120))


async def test_writes_that_trickle_in_share_a_transaction(db):
    commits: list[int] = []
    event.listen(db.sync_engine, "commit", lambda _conn: commits.append(1))
    writer = RecordWriter(sessionmaker(db), queue_size=1000, linger_s=0.5)
    writer.start()
    for i in range(10):  # one line every 10 ms, like the turns of many calls
        writer.transcript("CAtrickle", "caller", f"line {i}")
        await asyncio.sleep(0.01)
    await writer.flush()
    await writer.close()
    assert writer.written == 10
    assert len(commits) <= 2  # one per op without the linger


async def test_a_dialout_that_never_connected_gets_a_record_with_its_outcome(db):
    writer = RecordWriter(sessionmaker(db), queue_size=100)
    writer.start()
    writer.dialout_status("CAbusy", "busy", to_number="+15559990000", campaign_id="c1")
    writer.call_started("CAok", direction="outbound")
    writer.call_ended("CAok", end_reason="caller hung up")
    writer.dialout_status("CAok", "completed")
    await writer.flush()
    await writer.close()
    store = CallStore(sessionmaker(db))
    busy, ok = await store.get("CAbusy"), await store.get("CAok")
    assert (busy.direction, busy.twilio_status, busy.end_reason) == (
        "outbound", "busy", "not connected"
    )
    assert busy.ended_at is not None and busy.stream_started_at is None
    assert (ok.twilio_status, ok.end_reason) == ("completed", "caller hung up")


async def test_a_full_queue_drops_and_counts_without_blocking(log_lines):
    writer = RecordWriter(NO_DATABASE, queue_size=3)  # not started: nothing drains
    for i in range(5):
        writer.transcript("CAfull", "caller", f"line {i}")
    assert (writer.queued, writer.dropped_writes) == (3, 2)
    assert sum("write queue full" in line for line in log_lines) == 1


async def test_an_unreachable_database_is_counted_and_logged_once(log_lines):
    # Nothing listens on port 1: every write fails at once.
    engine = create_engine("postgresql://nobody@127.0.0.1:1/none")
    writer = RecordWriter(sessionmaker(engine), queue_size=100)
    writer.start()
    started = time.perf_counter()
    for batch in range(3):
        a_whole_call(writer, f"CAdown{batch}")
        await writer.flush()  # three separate failing batches
    assert time.perf_counter() - started < 10
    await writer.close()
    await engine.dispose()
    assert writer.failed_writes == 3 * 10 and writer.written == 0
    assert writer.stats()["database_failing"] is True
    assert sum("database write failed" in line for line in log_lines) == 1


async def test_a_full_disk_loses_writes_then_recovers(tmp_path, log_lines):
    """SQLite's max_page_count makes the file 'full' (SQLITE_FULL), like a full disk."""
    url = f"sqlite:///{tmp_path / 'full.db'}"
    await migrate(url)
    engine = create_engine(url)
    limit = {"pages": None}

    @event.listens_for(engine.sync_engine, "connect")
    def _cap(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA page_count")
        limit["pages"] = limit["pages"] or cursor.fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count={limit['pages']}")
        cursor.close()

    writer = RecordWriter(sessionmaker(engine), queue_size=1000)
    writer.start()
    big = "x" * 20_000
    for _ in range(2):
        writer.transcript("CAdisk", "caller", big)
        await writer.flush()
    assert writer.failed_writes == 2 and writer.written == 0

    await engine.dispose()  # new connections get room again
    limit["pages"] = 100_000
    writer.transcript("CAdisk", "caller", "fits now")
    await writer.flush()
    await writer.close()
    await engine.dispose()
    assert writer.written == 1 and writer.stats()["database_failing"] is False
    failures = [line for line in log_lines if "database write failed" in line]
    assert len(failures) == 1 and "full" in failures[0]
    assert any("work again; 2 writes were lost" in line for line in log_lines)


async def test_the_call_path_only_enqueues():
    """The writer's call-path methods are plain functions: nothing to await, no I/O."""
    writer = RecordWriter(NO_DATABASE, queue_size=10_000)
    for method in (writer.call_started, writer.transcript, writer.call_updated,
                   writer.call_ended, writer.dialout_status):
        assert not asyncio.iscoroutinefunction(method)
    started = time.perf_counter()
    for i in range(1000):
        writer.transcript("CAfast", "caller", f"line {i}")
    assert time.perf_counter() - started < 0.5
    assert writer.queued == 1000 and writer.written == 0


def test_unknown_fields_and_kinds_are_refused():
    writer = RecordWriter(NO_DATABASE, queue_size=10)
    with pytest.raises(ValueError, match="kind"):
        writer.transcript("CA1", "narrator", "hi")
    with pytest.raises(ValueError, match="not call record fields"):
        writer.call_updated("CA1", created_at="yesterday")


async def test_a_database_down_at_startup_is_migrated_when_it_comes_back(
    postgres_server, log_lines
):
    name = f"late_{id(log_lines)}"
    records = Records(make_settings(database_url=postgres_server.url(name)))
    await records.start()  # the database does not exist yet: no exception, one error line
    assert any("unavailable at startup" in line for line in log_lines)
    records.writer.call_started("CAlate", direction="inbound")
    await records.writer.flush()
    assert records.health()["failed_writes"] == 1

    postgres_server.create_database(name)
    records.writer.call_started("CAlate", direction="inbound")
    records.writer.call_ended("CAlate", end_reason="caller hung up")
    await records.writer.flush()
    assert (await records.store.get("CAlate")).end_reason == "caller hung up"
    assert records.health() | {"queued": 0} == {
        "queued": 0, "written": 2, "failed_writes": 1, "dropped_writes": 0,
        "database_failing": False,
    }
    await records.stop()
