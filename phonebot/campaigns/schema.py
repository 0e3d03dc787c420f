"""The campaign tables, on the one database's metadata (`phonebot.db.base`: one set of migrations).

Changing a table here needs a new Alembic revision in `phonebot/db/migrations/versions/`
(`tests/test_records_migrations.py` compares the two).

Exactly once: an attempt is a row of `campaign_attempts` keyed by (contact_id, number),
inserted in the same transaction that moves the contact to `calling`, BEFORE Twilio's
`calls.create`. A second scheduler (another process, or this one after a restart) can never
claim the same attempt: the primary key refuses it, and on PostgreSQL the contact row is
locked (`FOR UPDATE SKIP LOCKED`) while it is claimed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from phonebot.db.base import Base, UTCDateTime, utcnow


class Campaign(Base):
    """A list to call, its calling window, its pace and its retry policy."""

    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    # scheduled, running, paused, completed, canceled
    status: Mapped[str] = mapped_column(String(16), default="scheduled")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Stream parameters shared by every call (e.g. {"campaign_id": "summer_sale"}).
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    from_number: Mapped[str | None] = mapped_column(String(32))
    # The calling window in each contact's local time: "HH:MM", end exclusive.
    window_start: Mapped[str] = mapped_column(String(5))
    window_end: Mapped[str] = mapped_column(String(5))
    # ["mon", "tue", ...]
    window_days: Mapped[list[str]] = mapped_column(JSON)
    start_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    max_concurrent: Mapped[int] = mapped_column(Integer)
    calls_per_minute: Mapped[int] = mapped_column(Integer)
    retry_attempts: Mapped[int] = mapped_column(Integer)
    retry_delay_s: Mapped[int] = mapped_column(Integer)
    # Outcomes worth another attempt: busy, no-answer, failed, voicemail.
    retry_on: Mapped[list[str]] = mapped_column(JSON)
    machine_detection: Mapped[bool] = mapped_column(default=False)
    # Who listens for a machine when machine_detection is on: NULL (Twilio's AMD) or "bot".
    machine_detection_by: Mapped[str | None] = mapped_column(String(8))
    # Duplicate numbers merged at creation: [{"to", "rows": [..]}], reported back.
    duplicates: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_campaigns_status", "status"),)


class CampaignContact(Base):
    """One number of a campaign and where it stands.

    state: pending (waits for its window / next_attempt_at), calling (an attempt is claimed
    and its call not finished), completed, failed (attempts used up), unknown (Twilio's
    answer to calls.create was lost: not retried blindly), opted_out, do_not_call (on the
    list when its turn came), refused (the destination guard said no), canceled.
    """

    __tablename__ = "campaign_contacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("campaigns.id", ondelete="CASCADE")
    )
    # 1-based position in the request (CSV line without the header), for reports.
    row: Mapped[int] = mapped_column(Integer)
    to_number: Mapped[str] = mapped_column(String(32))
    customer_id: Mapped[str | None] = mapped_column(String(128))
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The resolved IANA zone the window is read in.
    timezone: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Not before this (a retry's delay); NULL: as soon as the window allows.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The last attempt's outcome: completed, busy, no-answer, failed, voicemail, canceled,
    # opted-out, unknown.
    outcome: Mapped[str | None] = mapped_column(String(32))
    # Outcome fields recorded during the calls (record_outcome), merged.
    outcomes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_call_sid: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("campaign_id", "to_number"),
        Index("ix_campaign_contacts_state_next_attempt_at", "state", "next_attempt_at"),
    )


class CampaignAttempt(Base):
    """One claimed attempt to ring a contact: written before calls.create, never twice.

    status: claimed (before calls.create), placed (Twilio accepted: call_sid set), unknown
    (calls.create's result is unknown), not_placed (Twilio refused for sure, or the
    server's cap said no: the attempt did not ring anyone), finished (final outcome known).
    """

    __tablename__ = "campaign_attempts"

    contact_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("campaign_contacts.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    campaign_id: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Which scheduler (process) claimed it, for the logs.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="claimed")
    call_sid: Mapped[str | None] = mapped_column(String(64))
    placed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_campaign_attempts_call_sid", "call_sid"),
        Index("ix_campaign_attempts_campaign_id_status", "campaign_id", "status"),
    )
