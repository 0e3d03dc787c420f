"""The tables: one row per call, its transcript entries, and the event deliveries.

They share `phonebot.db.base.Base` with the campaign tables (one database, one migration
history; `phonebot.db.tables` gathers both). Changing a table here needs a new Alembic
revision in `phonebot/db/migrations/versions/`
(`tests/test_records_migrations.py` fails when the two disagree).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from phonebot.db.base import Base, UTCDateTime, utcnow


def column_length(column: Any) -> int | None:
    """The most characters a String column holds (`CallRecord.from_number` → 255), or None
    for a column without a limit. Every length check reads it from here, so a limit is
    written once, in the table, and PostgreSQL (which enforces it) and the checks agree."""
    return getattr(getattr(column, "type", None), "length", None)


class CallRecord(Base):
    """What one call was: who, which persona, when, how it ended, how fast the bot was."""

    __tablename__ = "calls"

    call_sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    # When the first write about this call reached us; the order of the call log.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    direction: Mapped[str | None] = mapped_column(String(16))
    from_number: Mapped[str | None] = mapped_column(String(255))
    to_number: Mapped[str | None] = mapped_column(String(255))
    persona: Mapped[str | None] = mapped_column(String(64))
    # The call's <Parameter>s without the stream token (see phonebot.records.writer).
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    campaign_id: Mapped[str | None] = mapped_column(String(128))
    customer_id: Mapped[str | None] = mapped_column(String(128))
    webhook_answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stream_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    end_reason: Mapped[str | None] = mapped_column(String(64))
    # Twilio's final CallStatus: completed, busy, no-answer, failed, canceled.
    twilio_status: Mapped[str | None] = mapped_column(String(32))
    amd_verdict: Mapped[str | None] = mapped_column(String(32))
    transfer_target: Mapped[str | None] = mapped_column(String(255))
    transfer_result: Mapped[str | None] = mapped_column(String(64))
    # {"stt": 1, "llm": 0, "tts": 2}: failed turns per provider.
    provider_errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reply_latency_p50_s: Mapped[float | None] = mapped_column(Float)
    reply_latency_p95_s: Mapped[float | None] = mapped_column(Float)
    recording_path: Mapped[str | None] = mapped_column(String(1024))
    # Outcome fields the bot recorded during the call (record_outcome), e.g.
    # {"interested": "yes", "callback_at": "tomorrow 10:00"}.
    outcomes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The post-call analysis (phonebot.agents.analysis: summary, success, fields, method),
    # and its success judgement on its own for the log's filter (None: not judged).
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    success: Mapped[bool | None] = mapped_column(Boolean)

    transcript: Mapped[list[TranscriptEntry]] = relationship(
        back_populates="call",
        order_by="TranscriptEntry.seq",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        Index("ix_calls_created_at_call_sid", "created_at", "call_sid"),
        Index("ix_calls_campaign_id", "campaign_id"),
        Index("ix_calls_from_number", "from_number"),
        Index("ix_calls_to_number", "to_number"),
        Index("ix_calls_success", "success"),
    )


class TranscriptEntry(Base):
    """One line of the conversation: a turn, a key press, a function call or a re-prompt."""

    __tablename__ = "transcript_entries"

    call_sid: Mapped[str] = mapped_column(
        String(64), ForeignKey("calls.call_sid", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # caller, bot, keypad, function, reprompt, transfer (a warm transfer's outcome)
    kind: Mapped[str] = mapped_column(String(16))
    speaker: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    # Seconds from the start of the call.
    at_s: Mapped[float | None] = mapped_column(Float)
    # Bot turns: seconds from the caller's end of turn to the bot's first audio.
    reply_latency_s: Mapped[float | None] = mapped_column(Float)
    # Bot turns cut off by the caller's barge-in.
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    # Function calls: {"name", "arguments", "result"}; keypad: {"digits"}.
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    call: Mapped[CallRecord] = relationship(back_populates="transcript")


class EventDelivery(Base):
    """An event for EVENTS_WEBHOOK_URL and how its delivery is going.

    Pending: delivered_at is NULL and next_attempt_at is set. Given up after 24 h of
    failures: both are NULL (last_error says why).
    """

    __tablename__ = "event_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    # The whole event as sent: {"id", "type", "created", "data"}.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_event_deliveries_next_attempt_at", "next_attempt_at"),)
