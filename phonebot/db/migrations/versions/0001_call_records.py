"""Call records, transcripts and event deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phonebot.db.base import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("direction", sa.String(16), nullable=True),
        sa.Column("from_number", sa.String(255), nullable=True),
        sa.Column("to_number", sa.String(255), nullable=True),
        sa.Column("persona", sa.String(64), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=True),
        sa.Column("campaign_id", sa.String(128), nullable=True),
        sa.Column("customer_id", sa.String(128), nullable=True),
        sa.Column("webhook_answered_at", UTCDateTime(), nullable=True),
        sa.Column("stream_started_at", UTCDateTime(), nullable=True),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("twilio_status", sa.String(32), nullable=True),
        sa.Column("amd_verdict", sa.String(32), nullable=True),
        sa.Column("transfer_target", sa.String(255), nullable=True),
        sa.Column("transfer_result", sa.String(64), nullable=True),
        sa.Column("provider_errors", sa.JSON(), nullable=True),
        sa.Column("reply_latency_p50_s", sa.Float(), nullable=True),
        sa.Column("reply_latency_p95_s", sa.Float(), nullable=True),
        sa.Column("recording_path", sa.String(1024), nullable=True),
        sa.PrimaryKeyConstraint("call_sid", name=op.f("pk_calls")),
    )
    op.create_index("ix_calls_created_at_call_sid", "calls", ["created_at", "call_sid"])
    op.create_index("ix_calls_campaign_id", "calls", ["campaign_id"])
    op.create_index("ix_calls_from_number", "calls", ["from_number"])
    op.create_index("ix_calls_to_number", "calls", ["to_number"])
    op.create_table(
        "transcript_entries",
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("speaker", sa.String(16), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("at_s", sa.Float(), nullable=True),
        sa.Column("reply_latency_s", sa.Float(), nullable=True),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["call_sid"],
            ["calls.call_sid"],
            name=op.f("fk_transcript_entries_call_sid_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("call_sid", "seq", name=op.f("pk_transcript_entries")),
    )
    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_deliveries")),
    )
    op.create_index(
        "ix_event_deliveries_next_attempt_at", "event_deliveries", ["next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_event_deliveries_next_attempt_at", table_name="event_deliveries")
    op.drop_table("event_deliveries")
    op.drop_table("transcript_entries")
    op.drop_index("ix_calls_to_number", table_name="calls")
    op.drop_index("ix_calls_from_number", table_name="calls")
    op.drop_index("ix_calls_campaign_id", table_name="calls")
    op.drop_index("ix_calls_created_at_call_sid", table_name="calls")
    op.drop_table("calls")
