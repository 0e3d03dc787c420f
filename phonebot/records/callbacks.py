"""Which of Twilio's callbacks may still change a call's record.

Signed status and AMD callbacks are accepted only while they move the call forward: a
late or replayed one must not rewrite a finished call. The rules exist twice, the same:
in Python, for the server to answer and log "ignored" where it can read the record
(`status_refusal`, `verdict_refusal`), and as SQL conditions on the writer's UPDATE
(`status_condition`, `verdict_condition`), which hold even when two processes race.

Twilio's call statuses (https://www.twilio.com/docs/voice/api/call-resource#call-status-values
and https://www.twilio.com/docs/voice/twiml#callstatus-values) move queued → initiated →
ringing → in-progress, then end in one final status: completed, busy, no-answer, failed or
canceled. Callbacks may arrive out of order (their `SequenceNumber` says so), so an earlier
status after a later one is ignored, and nothing follows a final status. A call that
connected (its media stream started) was answered, so the only final status it can have is
completed. Who called (from, to) is set once, when the record has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, case, or_

from phonebot.records.schema import CallRecord
from phonebot.twilio.statuses import FINAL_STATUSES, PROGRESS_STATUSES

FINAL_RANK = len(PROGRESS_STATUSES)
INBOUND = "inbound"


@dataclass(frozen=True)
class CallProgress:
    """What a callback is checked against: the few columns of a call's record."""

    twilio_status: str | None = None
    direction: str | None = None
    amd_verdict: str | None = None
    webhook_answered_at: datetime | None = None
    stream_started_at: datetime | None = None
    ended_at: datetime | None = None


def progress_of(row: CallRecord) -> CallProgress:
    """The `CallProgress` of a loaded record."""
    return CallProgress(**{name: getattr(row, name) for name in CallProgress.__dataclass_fields__})


def rank(status: str) -> int:
    """Where `status` is in Twilio's order (every final status last)."""
    return PROGRESS_STATUSES.index(status) if status in PROGRESS_STATUSES else FINAL_RANK


def status_refusal(call: CallProgress | None, status: str) -> str | None:
    """Why the status callback must not change the record, or None (it may)."""
    if call is None:
        return None
    stored = call.twilio_status
    if stored in FINAL_STATUSES:
        return f"the call already has its final status, {stored}"
    if stored is not None and rank(stored) >= rank(status):
        return f"the call is already {stored}"
    if status not in FINAL_STATUSES and call.ended_at is not None:
        return "the call has ended"
    if status in FINAL_STATUSES and status != "completed" and call.stream_started_at is not None:
        return f"the call connected, so it can only be completed, not {status}"
    return None


def status_condition(status: str) -> ColumnElement[bool]:
    """`status_refusal` as the WHERE of the writer's UPDATE: true when it may apply."""
    stored_rank = case(
        {name: index for index, name in enumerate(PROGRESS_STATUSES)},
        value=CallRecord.twilio_status,
        else_=FINAL_RANK,
    )
    clauses = [or_(CallRecord.twilio_status.is_(None), stored_rank < rank(status))]
    if status not in FINAL_STATUSES:
        clauses.append(CallRecord.ended_at.is_(None))
    elif status != "completed":
        clauses.append(CallRecord.stream_started_at.is_(None))
    return and_(*clauses)


def verdict_refusal(call: CallProgress | None) -> str | None:
    """Why an answering-machine verdict must not be taken, or None: one per call, and
    only for a call we placed (dial-in calls never ask Twilio for one)."""
    if call is None:
        return None
    if call.amd_verdict is not None:
        return f"the call already has its verdict, {call.amd_verdict}"
    if call.direction == INBOUND:
        return "the call is inbound; only dial-outs ask for a verdict"
    return None


def verdict_condition() -> ColumnElement[bool]:
    """The WHERE of the writer's UPDATE of a verdict: the first one wins, also when two
    processes race (the direction is the route's check: it is known long before)."""
    return CallRecord.amd_verdict.is_(None)
