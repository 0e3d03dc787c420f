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
    # In place, not in batch mode: on SQLite a batch copies the table and drops the old one,
    # and with foreign keys on (phonebot.db.engine) that drop deletes every contact and
    # attempt of every campaign (ON DELETE CASCADE). SQLite drops a column since 3.35.
    op.drop_column("campaigns", "machine_detection_by")
