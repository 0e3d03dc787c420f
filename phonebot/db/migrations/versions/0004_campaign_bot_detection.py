"""Campaigns whose bot listens for voicemail itself (`machine_detection: "bot"`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Who listens for a machine when machine_detection is on: NULL (Twilio's AMD, as every
    # campaign before this revision) or "bot" (phonebot.call.voicemail.GreetingCheck).
    op.add_column("campaigns", sa.Column("machine_detection_by", sa.String(8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:  # SQLite can't drop a column in place
        batch.drop_column("machine_detection_by")
