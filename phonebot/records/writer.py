"""Writing call records without ever slowing a call down.

The call path only calls the non-blocking methods below (`call_started`, `transcript`,
`call_updated`, `call_ended`, `dialout_status`): each puts one small operation on a bounded
asyncio queue and returns. One background task drains the queue and writes whatever has
piled up in one transaction per batch, so a burst of turns costs one commit, not one per
line (it waits LINGER_S for company after a write arrives), and a slow database only
grows the queue.

When the database is down or the disk is full a batch fails: its operations are counted in
`failed_writes` and lost (not retried: a retry would hold newer writes behind a dead
database), and one error line is logged per outage, plus one line when writes work again.
When the queue is full, new operations are dropped and counted in `dropped_writes`. Calls
never see either.

One bad value must not cost other calls their records: every string is cut to its
column's length before it is queued (`phonebot.records.limits.fit`, one log line), and a
batch that fails because of one operation's values (a constraint, a value its column
can't take) is written again one operation per transaction, so that operation alone is
lost (one log line with its CallSid, never the value) and every other one is written.

Late and replayed callbacks can't rewrite a finished call: a status applies only while it
moves the call forward, an AMD verdict only once, and who called only when the record has
no one yet, each as a conditional UPDATE (`phonebot.records.callbacks`), so that holds even
when two processes write the same call at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from loguru import logger
from sqlalchemy import func, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phonebot.agents.analysis import success_value
from phonebot.dnc.schema import DoNotCall
from phonebot.dnc.store import opt_out_insert
from phonebot.records.callbacks import (
    progress_of,
    status_condition,
    status_refusal,
    verdict_condition,
)
from phonebot.records.events import EventDeliverer
from phonebot.records.limits import fit
from phonebot.records.models import as_json, detail, summary
from phonebot.records.recording import CallRecorder
from phonebot.records.schema import CallRecord, TranscriptEntry, utcnow
from phonebot.twilio.statuses import FINAL_STATUSES

# Twilio's final CallStatus values for a call that never connected: all but completed.
NOT_CONNECTED = frozenset(FINAL_STATUSES) - {"completed"}
NOT_CONNECTED_REASON = "not connected"
# The end reason of a call whose callee asked not to be called again
# (phonebot.call.control.EndReason.OPTED_OUT; the campaign scheduler reads it).
OPTED_OUT_REASON = "opted out"
# A dial-out whose phone menu led nowhere (phonebot.call.ivr); campaigns' `ivr_failed`.
IVR_FAILED_REASON = "ivr failed"
# Entry kinds and who is speaking in each.
SPEAKER = {"caller": "caller", "bot": "bot", "keypad": "caller", "function": "bot",
           "reprompt": "bot", "transfer": "bot"}
# Call-record columns `call_updated` may set.
UPDATABLE = frozenset(
    {
        "direction", "from_number", "to_number", "persona", "parameters", "campaign_id",
        "customer_id", "webhook_answered_at", "stream_started_at", "ended_at", "duration_s",
        "end_reason", "twilio_status", "amd_verdict", "transfer_target", "transfer_result",
        "provider_errors", "reply_latency_p50_s", "reply_latency_p95_s", "recording_path",
    }
)
# Who a call is between: set only while the record has none (an update or a status
# callback never changes it; the stream's start, from our own signed TwiML, may).
SET_ONCE = ("direction", "from_number", "to_number")
# Writes lost one by one (their own values failed) get a line each, up to this many per
# batch, then one line with the count.
LOST_WRITE_LOG_LIMIT = 5
# <Parameter> names never stored: the per-call stream token is a credential.
SECRET_PARAMETERS = frozenset({"token"})
BATCH_SIZE = 200
# After the first write of a batch arrives, wait this long for more before writing: a
# transaction costs ~10x a row (bench/records_writer.py), so on a busy server the turns of
# many calls share one. A crash loses at most this much more.
LINGER_S = 0.25


@dataclass(frozen=True)
class _Op:
    # "update", "entry", "start", "end", "status", "outcome", "opt_out", "analysis"
    kind: str
    call_sid: str
    fields: dict[str, Any]


@dataclass
class _LiveCall:
    """What the writer tracks in memory for a call between start and end."""

    started: float = field(default_factory=time.monotonic)
    next_seq: int = 0
    latencies: list[float] = field(default_factory=list)


class Recorders(Protocol):
    """Where a call gets its recorder: the app's `phonebot.records.recording_store.Recordings`.

    Named here, by what the writer hands on, because the store depends on the writer (a
    stored recording updates its record), not the other way round.
    """

    def recorder(self, call_sid: str) -> CallRecorder | None: ...


class RecordWriter:
    """Queued, batched writes of call records; owned by the app (`Records.writer`)."""

    def __init__(
        self,
        sessions: async_sessionmaker,
        queue_size: int,
        events: EventDeliverer | None = None,
        prepare: Callable[[], Awaitable[Any]] | None = None,
        batch_size: int = BATCH_SIZE,
        linger_s: float = LINGER_S,
    ) -> None:
        self._sessions = sessions
        self._queue: asyncio.Queue[_Op] = asyncio.Queue(maxsize=queue_size)
        self._events = events
        # Run once before the first successful batch (the schema migration, when the
        # database was down at startup).
        self._prepare = prepare
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._live: dict[str, _LiveCall] = {}
        self._task: asyncio.Task | None = None
        self._failing = False
        self._dropping = False
        self._lost_this_outage = 0
        self.failed_writes = 0
        self.dropped_writes = 0
        self.written = 0
        # The app's call recordings, set by `Records` (phonebot.records.recording_store): a
        # call reaches them through the writer it is given, like its record.
        self.recordings: Recorders | None = None
        self.enabled = True  # False (CALL_RECORDS=false): every write is dropped at once

    # --- the call path: non-blocking --------------------------------------------------------
    def call_started(
        self,
        call_sid: str,
        *,
        direction: str | None = None,
        from_number: str | None = None,
        to_number: str | None = None,
        persona: str | None = None,
        parameters: dict[str, str] | None = None,
        campaign_id: str | None = None,
        customer_id: str | None = None,
        webhook_answered_at: datetime | None = None,
        stream_started_at: datetime | None = None,
    ) -> None:
        """The media stream started: create or complete the record; `at_s` counts from now."""
        if direction not in (None, "inbound", "outbound"):
            raise ValueError(f"direction must be inbound or outbound, not {direction!r}")
        self._live.setdefault(call_sid, _LiveCall())
        fields = {
            "direction": direction,
            "from_number": from_number,
            "to_number": to_number,
            "persona": persona,
            "parameters": without_secrets(parameters),
            "campaign_id": campaign_id,
            "customer_id": customer_id,
            "webhook_answered_at": webhook_answered_at,
            "stream_started_at": stream_started_at or utcnow(),
        }
        self._put(_Op("start", call_sid, {k: v for k, v in fields.items() if v is not None}))

    def transcript(
        self,
        call_sid: str,
        kind: str,
        text: str | None = None,
        *,
        at_s: float | None = None,
        reply_latency_s: float | None = None,
        interrupted: bool = False,
        data: dict[str, Any] | None = None,
    ) -> None:
        """One transcript line: kind is caller, bot, keypad, function, reprompt or transfer.

        `at_s` defaults to the seconds since `call_started`; bot latencies feed the call's
        p50/p95 unless `call_ended` is given its own.
        """
        if kind not in SPEAKER:
            raise ValueError(f"unknown transcript entry kind {kind!r}")
        live = self._live.setdefault(call_sid, _LiveCall())
        if at_s is None:
            at_s = time.monotonic() - live.started
        if reply_latency_s is not None:
            live.latencies.append(reply_latency_s)
        entry = {
            "seq": live.next_seq,
            "kind": kind,
            "speaker": SPEAKER[kind],
            "text": text,
            "at_s": round(at_s, 3),
            "reply_latency_s": reply_latency_s,
            "interrupted": interrupted,
            "data": data,
        }
        live.next_seq += 1
        self._put(_Op("entry", call_sid, entry))

    def call_updated(self, call_sid: str, **fields: Any) -> None:
        """Set record fields (AMD verdict, transfer target/result, recording path, …)."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not call record fields: {sorted(unknown)}")
        self._put(_Op("update", call_sid, _clean(fields)))

    def call_ended(
        self,
        call_sid: str,
        *,
        end_reason: str | None,
        ended_at: datetime | None = None,
        duration_s: float | None = None,
        **fields: Any,
    ) -> None:
        """The stream ended: close the record (and send `call.ended` with the transcript)."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not call record fields: {sorted(unknown)}")
        live = self._live.pop(call_sid, None)
        if duration_s is None and live is not None:
            duration_s = round(time.monotonic() - live.started, 3)
        if live is not None and live.latencies and "reply_latency_p50_s" not in fields:
            fields["reply_latency_p50_s"] = percentile(live.latencies, 50)
            fields["reply_latency_p95_s"] = percentile(live.latencies, 95)
        fields.update(end_reason=end_reason, ended_at=ended_at or utcnow(), duration_s=duration_s)
        self._put(_Op("end", call_sid, _clean(fields)))

    def dialout_placed(
        self,
        call_sid: str,
        *,
        to: str,
        from_number: str | None,
        parameters: Mapping[str, str],
        campaign_id: str | None = None,
        customer_id: str | None = None,
    ) -> None:
        """A dial-out's record starts when Twilio accepts the call (/dialout and campaigns
        alike), with its campaign, so one that is never answered is still found by
        campaign_id or customer_id. A `campaign_id` parameter wins over the campaign's own
        id; the contact's `customer_id` over the parameter. Fields without a value are left
        out: an update must not blank what an earlier one set."""
        fields = {
            "direction": "outbound",
            "from_number": from_number,
            "to_number": to,
            "parameters": dict(parameters),
            "campaign_id": parameters.get("campaign_id") or campaign_id,
            "customer_id": customer_id or parameters.get("customer_id"),
        }
        self.call_updated(call_sid, **{k: v for k, v in fields.items() if v is not None})

    def dialout_status(self, call_sid: str, status: str, **fields: Any) -> None:
        """Twilio's StatusCallback for a dial-out: keep a final CallStatus (progress only
        makes sure the record exists); busy, no-answer, failed or canceled with no stream
        ever started closes the record and sends `call.failed`. Applied only while it moves
        the call forward (`phonebot.records.callbacks`)."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not call record fields: {sorted(unknown)}")
        fields.setdefault("direction", "outbound")
        self._put(_Op("status", call_sid, _clean({**fields, "twilio_status": status})))

    def outcome(self, call_sid: str, fields: dict[str, str]) -> None:
        """Outcome fields the bot recorded (`record_outcome`): merged into `calls.outcomes`
        (a later value for a field replaces the earlier one)."""
        self._put(_Op("outcome", call_sid, {str(k): str(v) for k, v in fields.items()}))

    def call_analyzed(self, call_sid: str, *, agent: str, analysis: dict[str, Any]) -> None:
        """The call's post-call analysis (phonebot.call.analysis): stored in `analysis`,
        its success in `success` (the log's filter), and sent as `call.analyzed`."""
        self._put(_Op("analysis", call_sid, {"agent": agent, "analysis": analysis}))

    def opt_out(self, call_sid: str, number: str | None) -> None:
        """The callee asked not to be called again: add `number` to `do_not_call` (kept if
        already there) and mark the record's end reason, in one transaction."""
        self._put(_Op("opt_out", call_sid, {"number": number}))

    def _put(self, op: _Op) -> None:
        if not self.enabled:
            return
        op = _fitted(op)
        try:
            self._queue.put_nowait(op)
        except asyncio.QueueFull:
            self.dropped_writes += 1
            if not self._dropping:
                self._dropping = True
                logger.error(
                    f"Call records: write queue full ({self._queue.maxsize}), dropping new"
                    " writes until the database catches up"
                )

    # --- the background task ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="records-writer")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or has failed)."""
        if self._task is None:
            raise RuntimeError("RecordWriter.start() was not called")
        await self._queue.join()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (at most `timeout_s`), then stop; the rest is counted lost."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        left = self._queue.qsize()
        if left:
            self.failed_writes += left
            logger.error(f"Call records: {left} writes not saved at shutdown")

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._linger_s and self._queue.qsize() < self._batch_size:
                await asyncio.sleep(self._linger_s)
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[_Op]) -> None:
        try:
            if self._prepare is not None:
                await self._prepare()
                self._prepare = None
            staged_events = await self._transaction(batch)
        except Exception as error:  # database down, disk full, constraint: never raise
            if self._prepare is not None or not row_fault(error):
                self._failed(len(batch), error)
            else:
                await self._one_by_one(batch)
            return
        self.written += len(batch)
        self._succeeded(staged_events)

    async def _transaction(self, ops: list[_Op]) -> bool:
        """Apply `ops` in one transaction; True when it staged an event."""
        staged_events = False
        async with self._sessions.begin() as session:
            rows: dict[str, CallRecord] = {}
            for op in ops:
                staged_events |= await self._apply(session, rows, op)
        return staged_events

    async def _one_by_one(self, batch: list[_Op]) -> None:
        """After a batch failed on one operation's values: each operation in a transaction
        of its own, so the bad one loses only itself. Should the database itself fail
        meanwhile, the rest is counted lost, as for any failed batch."""
        staged_events, lost = False, 0
        for index, op in enumerate(batch):
            try:
                staged_events |= await self._transaction([op])
            except Exception as error:
                if not row_fault(error):
                    self._failed(len(batch) - index, error)
                    return
                lost += 1
                self._lost(op, error, lost)
            else:
                self.written += 1
        if lost > LOST_WRITE_LOG_LIMIT:
            logger.error(
                f"Call records: {lost - LOST_WRITE_LOG_LIMIT} more writes of the same batch"
                " were lost the same way"
            )
        self._succeeded(staged_events)

    def _lost(self, op: _Op, error: Exception, count: int) -> None:
        """One operation lost for its own values: counted, and logged with its CallSid and
        field names, never the values (a transcript line or a parameter may hold anything)."""
        self.failed_writes += 1
        if count > LOST_WRITE_LOG_LIMIT:
            return
        what = f"transcript line {op.fields.get('seq')}" if op.kind == "entry" else op.kind
        if op.kind in ("update", "start", "end", "status"):
            what += f" ({', '.join(sorted(op.fields))})"
        logger.error(
            f"Call records: a write for call {op.call_sid} was lost, {what}:"
            f" {error_name(error)}; the other writes of its batch were written"
        )

    def _succeeded(self, staged_events: bool) -> None:
        self._recovered()
        if staged_events and self._events is not None:
            self._events.wake()

    def _failed(self, count: int, error: Exception) -> None:
        self.failed_writes += count
        self._lost_this_outage += count
        if not self._failing:
            self._failing = True
            original = getattr(error, "orig", None) or error
            logger.error(
                "Call records: database write failed, records are lost until it works again"
                f" (counted in /health): {type(original).__name__}: {str(original)[:300]}"
            )

    def _recovered(self) -> None:
        if self._failing:
            logger.info(
                f"Call records: database writes work again; {self._lost_this_outage} writes"
                " were lost"
            )
        self._failing = self._dropping = False
        self._lost_this_outage = 0

    # --- applying one operation inside the batch's transaction ------------------------------
    async def _apply(
        self, session: AsyncSession, rows: dict[str, CallRecord], op: _Op
    ) -> bool:
        """Apply `op`; True when it staged an event. `rows` caches this batch's records: a
        record added in this batch is not in the session's identity map until flushed, and
        looking it up again would flush (one INSERT per transcript line) and SELECT."""
        row = rows.get(op.call_sid) or await self._record(session, op.call_sid)
        rows[op.call_sid] = row
        if op.kind == "entry":
            session.add(TranscriptEntry(call_sid=op.call_sid, **op.fields))
            return False
        if op.kind == "outcome":
            # A new dict, so SQLAlchemy sees the JSON column change.
            row.outcomes = {**(row.outcomes or {}), **op.fields}
            return False
        if op.kind == "opt_out":
            row.end_reason = OPTED_OUT_REASON
            if op.fields["number"]:
                await session.execute(opt_out_insert(session, op.fields["number"]))
            return False
        if op.kind == "status":
            return await self._status(session, row, dict(op.fields))
        if op.kind == "analysis":
            return await self._analyzed(session, row, op.fields["agent"], op.fields["analysis"])
        return await self._update_record(session, row, op)

    @staticmethod
    async def _record(session: AsyncSession, call_sid: str) -> CallRecord:
        """The call's record, created if it has none: any operation may come first (a status
        callback before the stream, or the start lost in an outage)."""
        row = await session.get(CallRecord, call_sid)
        if row is None:
            row = CallRecord(call_sid=call_sid, created_at=utcnow())
            session.add(row)
        return row

    async def _update_record(self, session: AsyncSession, row: CallRecord, op: _Op) -> bool:
        """A start, an update or an end: set its fields (who called only once); True when
        it staged the call's started or ended event."""
        fields = dict(op.fields)
        once: dict[str, Any] = {}
        if op.kind != "start":  # the stream's start, from our signed TwiML, sets who called
            once = {name: fields.pop(name) for name in (*SET_ONCE, "amd_verdict") if name in fields}
        for name, value in fields.items():
            setattr(row, name, value)
        if once:
            await self._set_once(session, row, once)
        if op.kind == "start":
            return await self._stage(session, "call.started", row)
        if op.kind == "end":
            return await self._stage(session, "call.ended", row)
        return False

    async def _set_once(self, session: AsyncSession, row: CallRecord, once: dict[str, Any]) -> None:
        """Who the call is between, and its AMD verdict, written only where the record has
        none yet: in the UPDATE's SQL, so a racing process can't overwrite them either."""
        await session.flush()  # the row exists in the database before it is updated
        key = CallRecord.call_sid == row.call_sid
        verdict = once.pop("amd_verdict", None)
        if once:
            values = {name: func.coalesce(getattr(CallRecord, name), v) for name, v in once.items()}
            await session.execute(_update(key).values(values))
        if verdict is not None:
            result = await session.execute(
                _update(key, verdict_condition()).values(amd_verdict=verdict)
            )
            if result.rowcount == 0:
                logger.info(
                    f"Call {row.call_sid}: AMD verdict {verdict} not recorded (the call already"
                    " has one)"
                )
        await session.refresh(row)

    async def _status(self, session: AsyncSession, row: CallRecord, fields: dict[str, Any]) -> bool:
        """Twilio's status callback, applied only while it moves the call forward
        (`callbacks.status_condition`); a final status that says the call never connected
        closes the record and stages `call.failed`."""
        status = fields.pop("twilio_status")
        values: dict[str, Any] = {
            name: func.coalesce(getattr(CallRecord, name), fields.pop(name))
            for name in SET_ONCE
            if name in fields
        }
        # Only a final status is kept: the column is the call's outcome.
        values["twilio_status"] = status if status in FINAL_STATUSES else CallRecord.twilio_status
        await session.flush()
        key = CallRecord.call_sid == row.call_sid
        result = await session.execute(_update(key, status_condition(status)).values(values))
        await session.refresh(row)
        if result.rowcount == 0:
            reason = status_refusal(progress_of(row), status)
            logger.info(f"Call {row.call_sid}: Twilio status {status} not recorded ({reason})")
            return False
        for name, value in fields.items():
            setattr(row, name, value)
        if _close_unconnected(row):
            return await self._stage(session, "call.failed", row)
        return False

    async def _analyzed(
        self, session: AsyncSession, row: CallRecord, agent: str, analysis: dict[str, Any]
    ) -> bool:
        """Store the analysis and stage `call.analyzed` {call_sid, agent, analysis} in the
        same transaction; True when it staged the event."""
        row.analysis = analysis
        row.success = success_value(analysis)
        if self._events is None:
            return False
        data = {"call_sid": row.call_sid, "agent": agent, "analysis": analysis}
        self._events.stage(session, "call.analyzed", data)
        return True

    async def _stage(self, session: AsyncSession, event_type: str, row: CallRecord) -> bool:
        """Stage the event in this transaction: it exists exactly when the record does."""
        if self._events is None:
            return False
        await session.flush()
        if event_type == "call.ended":
            entries = await session.scalars(
                select(TranscriptEntry)
                .where(TranscriptEntry.call_sid == row.call_sid)
                .order_by(TranscriptEntry.seq)
            )
            data = as_json(detail(row, list(entries)))
        else:
            data = as_json(summary(row))
        self._events.stage(session, event_type, data)
        return True

    def stats(self) -> dict[str, int | bool]:
        """For /health: what is waiting, what was lost, whether the database is failing."""
        return {
            "queued": self.queued,
            "written": self.written,
            "failed_writes": self.failed_writes,
            "dropped_writes": self.dropped_writes,
            "database_failing": self._failing,
        }


def _close_unconnected(row: CallRecord) -> bool:
    """A dial-out's final status says it never connected: close its record (once)."""
    connected = row.stream_started_at is not None
    if row.twilio_status not in NOT_CONNECTED or connected or row.ended_at is not None:
        return False
    row.ended_at = utcnow()
    row.end_reason = NOT_CONNECTED_REASON
    return True


def _update(*where: Any) -> Any:
    """An UPDATE of `calls` whose result the session need not mirror (the row is refreshed)."""
    return (
        update(CallRecord).where(*where).execution_options(synchronize_session=False)
    )


def _fitted(op: _Op) -> _Op:
    """`op` with every string cut to its column's length (`limits.fit`, one log line per
    cut): no single value can fail a batch for its length."""
    call_sid = fit(CallRecord, {"call_sid": op.call_sid}, op.call_sid)["call_sid"]
    table = {"entry": TranscriptEntry, "opt_out": DoNotCall}.get(op.kind, CallRecord)
    return _Op(op.kind, call_sid, fit(table, dict(op.fields), call_sid))


def row_fault(error: BaseException) -> bool:
    """True when a write failed because of its own values (a constraint, a value its column
    can't take or its driver can't encode), not because the database failed: the other
    writes of its batch can then still go in."""
    if isinstance(error, IntegrityError | DataError):
        return True
    if isinstance(error, DBAPIError):
        original = error.orig
        # asyncpg's errors reach SQLAlchemy generic: PostgreSQL's SQLSTATE class 22 is a
        # data exception (a value too long, out of range), 23 a constraint violation;
        # asyncpg's own DataError (a value it can't encode) is a ValueError.
        state = str(getattr(original, "sqlstate", None) or "")
        return state[:2] in ("22", "23") or isinstance(original.__cause__, ValueError)
    return isinstance(error, StatementError | TypeError | ValueError)


def error_name(error: BaseException) -> str:
    """The driver's name for what failed (e.g. StringDataRightTruncationError), without
    its message: messages may quote the value."""
    original = getattr(error, "orig", None) or error
    return type(original.__cause__ or original).__name__


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as the record keeps them: parameters without secrets, error counts as ints."""
    if fields.get("parameters") is not None:
        fields["parameters"] = without_secrets(fields["parameters"])
    if fields.get("provider_errors") is not None:
        fields["provider_errors"] = {str(k): int(v) for k, v in fields["provider_errors"].items()}
    return fields


def without_secrets(parameters: dict[str, str] | None) -> dict[str, str] | None:
    """The call's parameters minus credentials (the stream token)."""
    if parameters is None:
        return None
    return {
        str(k): str(v) for k, v in parameters.items() if str(k).lower() not in SECRET_PARAMETERS
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), rounded to the ms."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return round(value, 3)
