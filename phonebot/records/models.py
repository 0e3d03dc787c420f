"""The records as the API, the events and the command line show them (pydantic).

One shape everywhere: `GET /calls/{sid}`, the `call.ended` event's `data` and
`python -m phonebot.records show` print the same `CallDetail`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from phonebot.records.schema import CallRecord, TranscriptEntry

Direction = Literal["inbound", "outbound"]
EntryKind = Literal["caller", "bot", "keypad", "function", "reprompt", "transfer"]


class TranscriptEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int = Field(description="Order within the call, from 0")
    kind: EntryKind
    speaker: Literal["caller", "bot"] | None = None
    text: str | None = Field(
        None, description="Bot turns: everything the bot started to say, heard or not"
    )
    at_s: float | None = Field(None, description="Seconds from the start of the call")
    reply_latency_s: float | None = Field(
        None, description="Bot turns: seconds from the caller's end of turn to the reply"
    )
    interrupted: bool = Field(
        False, description="Bot speech cut off by the caller (barge-in) or by the hang-up"
    )
    data: dict[str, Any] | None = Field(
        None,
        description=(
            'Function calls: {"name", "arguments", "result"}; keypad: {"digits"}; '
            'interrupted bot turns: {"heard_s": seconds of its audio the caller heard, '
            '"heard_text": the words of text that fit in them (a prefix of text), '
            '"spoken_s": seconds all of its audio lasts}'
        ),
    )


class SuccessOut(BaseModel):
    value: bool | None = Field(
        None, description="Whether the call met the agent's criterion; null: not judged"
    )
    reason: str = ""


class CallAnalysisOut(BaseModel):
    """The post-call analysis (phonebot.agents.analysis), for agents that ask for one."""

    model_config = ConfigDict(extra="allow")

    method: Literal["llm", "extractive"] = Field(
        description="llm: the LLM's; extractive: from the transcript and outcomes alone"
    )
    summary: str | None = None
    success: SuccessOut | None = Field(None, description="null: the agent states no criterion")
    fields: dict[str, str | None] = Field(
        default_factory=dict, description="The agent's analysis fields; null: not found"
    )
    error: str | None = Field(
        None, description="Why the LLM's analysis was replaced by the extractive one"
    )
    attempts: int = Field(0, description="LLM requests made (0: none)")


class CallSummary(BaseModel):
    """One row of the call log."""

    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    call_sid: str
    created_at: datetime
    direction: Direction | None = None
    from_: str | None = Field(None, alias="from", validation_alias="from_number")
    to: str | None = Field(None, validation_alias="to_number")
    persona: str | None = None
    campaign_id: str | None = None
    customer_id: str | None = None
    webhook_answered_at: datetime | None = None
    stream_started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    end_reason: str | None = None
    twilio_status: str | None = Field(
        None, description="Twilio's final CallStatus: completed, busy, no-answer, failed, canceled"
    )
    amd_verdict: str | None = None
    transfer_target: str | None = None
    transfer_result: str | None = None
    reply_latency_p50_s: float | None = None
    reply_latency_p95_s: float | None = None
    outcomes: dict[str, str] | None = Field(
        None, description='What the bot recorded (record_outcome), e.g. {"interested": "yes"}'
    )
    has_recording: bool = False
    success: bool | None = Field(
        None, description="The post-call analysis's success judgement; null: none yet, or none"
    )


class CallDetail(CallSummary):
    """A call with everything recorded about it, transcript in order."""

    parameters: dict[str, str] | None = Field(None, description="Without the stream token")
    provider_errors: dict[str, int] | None = None
    analysis: CallAnalysisOut | None = Field(
        None, description="The post-call analysis; null until it is done, or for agents without"
    )
    transcript: list[TranscriptEntryOut] = []


class CallPage(BaseModel):
    """A page of the call log, newest first."""

    calls: list[CallSummary]
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= for the next page; null on the last page"
    )


def summary(row: CallRecord) -> CallSummary:
    return CallSummary.model_validate(row).model_copy(
        update={"has_recording": bool(row.recording_path)}
    )


def detail(row: CallRecord, entries: Sequence[TranscriptEntry]) -> CallDetail:
    base = summary(row).model_dump()
    return CallDetail(
        **base,
        parameters=row.parameters,
        provider_errors=row.provider_errors,
        analysis=row.analysis,
        transcript=[TranscriptEntryOut.model_validate(e) for e in entries],
    )


def as_json(model: BaseModel) -> dict[str, Any]:
    """The JSON form users see (`from`, ISO datetimes)."""
    return model.model_dump(mode="json", by_alias=True)


class RecordsHealth(BaseModel):
    """The records' counters in `/health` (see docs/records.md: what is lost when)."""

    queued: int = Field(description="Writes waiting for the database")
    written: int = Field(description="Writes saved since the server started")
    failed_writes: int = Field(description="Writes lost: the database failed or was full")
    dropped_writes: int = Field(description="Writes refused: RECORDS_QUEUE_SIZE were waiting")
    database_failing: bool = Field(description="The last write to the database failed")
    events_delivered: int | None = Field(
        None, description="Events your EVENTS_WEBHOOK_URL accepted (null: events off)"
    )
    events_failed_attempts: int | None = Field(
        None, description="Event deliveries that failed and will be retried"
    )
