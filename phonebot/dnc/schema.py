"""The do-not-call table, on the one database's metadata (`phonebot.db.base`).

Changing it needs a new Alembic revision in `phonebot/db/migrations/versions/` (the table
came with `0002_campaigns`; `tests/test_records_migrations.py` compares the two).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from phonebot.db.base import Base, UTCDateTime, utcnow


class DoNotCall(Base):
    """A number never to be dialed: by campaign or by /dialout."""

    __tablename__ = "do_not_call"

    # E.164
    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str | None] = mapped_column(String(255))
    # api, opt-out, cli
    source: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
