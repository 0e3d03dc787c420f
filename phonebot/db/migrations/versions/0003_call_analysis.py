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
    with op.batch_alter_table("calls") as batch:  # SQLite can't drop a column in place
        batch.drop_column("success")
        batch.drop_column("analysis")
