"""Post-call analysis on the call record: the analysis itself and its success (indexed).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # {"method", "summary", "success": {"value", "reason"}, "fields", "error", "attempts"}
    # (phonebot.agents.analysis), written after the call ends; success is its value alone,
    # for GET /calls?success=.
    op.add_column("calls", sa.Column("analysis", sa.JSON(), nullable=True))
    op.add_column("calls", sa.Column("success", sa.Boolean(), nullable=True))
    op.create_index("ix_calls_success", "calls", ["success"])


def downgrade() -> None:
    op.drop_index("ix_calls_success", table_name="calls")
    # In place, not in batch mode: on SQLite a batch copies the table and drops the old one,
    # and with foreign keys on (phonebot.db.engine) that drop deletes every call's
    # transcript (ON DELETE CASCADE). SQLite drops a column since 3.35.
    op.drop_column("calls", "success")
    op.drop_column("calls", "analysis")
