"""The do-not-call list in the database: its numbers, and the reads and writes other stores
make inside their own transactions.

    store = DoNotCallStore(records.sessions)
    await store.add(["+12025550100"], "asked by email", source="api")
    await store.has("+12025550100")

The campaign claim skips listed contacts (`listed`) and tells an opt-out from a number
listed before the call (`opted_out_since`); the records writer lists a callee who asked in
the same transaction as the call's end reason (`opt_out_insert`). Numbers are kept in
E.164 (`dnc_number`), so "+1 (202) 555-0123" and "+12025550123" are one entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import phonenumbers
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phonebot.db.base import utcnow
from phonebot.dnc.models import DncEntry
from phonebot.dnc.schema import DoNotCall

# The `source` of a number the callee asked to have listed, on a call (the `opt_out` tool).
OPT_OUT_SOURCE = "opt-out"
OPT_OUT_REASON = "asked not to be called again, on a call"


def dnc_number(text: str) -> str | None:
    """A number as the do-not-call list keeps it (E.164), or None when it isn't one."""
    try:
        parsed = phonenumbers.parse(text.strip(), None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class DoNotCallStore:
    """The list's own reads and writes, each in its own transaction (the API's, the check's)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def add(self, numbers: Sequence[str], reason: str | None, source: str) -> list[str]:
        """Add numbers (already E.164); returns those that were not on the list yet."""
        async with self._sessions.begin() as session:
            present = await listed(session, list(numbers))
            added = [n for n in dict.fromkeys(numbers) if n not in present]
            session.add_all(
                DoNotCall(number=n, reason=reason, source=source, created_at=utcnow())
                for n in added
            )
        return added

    async def remove(self, number: str) -> bool:
        """Take `number` off the list; False when it was not on it."""
        async with self._sessions.begin() as session:
            result = await session.execute(delete(DoNotCall).where(DoNotCall.number == number))
        return bool(result.rowcount)

    async def entries(self) -> list[DncEntry]:
        """Every number, oldest first."""
        async with self._sessions() as session:
            rows = (await session.scalars(select(DoNotCall).order_by(DoNotCall.created_at))).all()
        return [DncEntry(number=r.number, reason=r.reason, source=r.source,
                         created_at=r.created_at) for r in rows]

    async def has(self, number: str) -> bool:
        async with self._sessions() as session:
            found = await session.get(DoNotCall, number)
        return found is not None


async def listed(session: AsyncSession, numbers: list[str]) -> set[str]:
    """Which of `numbers` are on the list, read in the caller's transaction."""
    if not numbers:
        return set()
    found = await session.scalars(select(DoNotCall.number).where(DoNotCall.number.in_(numbers)))
    return set(found.all())


async def opted_out_since(session: AsyncSession, number: str, since: datetime) -> bool:
    """`number` asked on a call (source opt-out) to be listed, at or after `since`."""
    entry = await session.get(DoNotCall, number)
    if entry is None or entry.source != OPT_OUT_SOURCE:
        return False
    return entry.created_at >= since


def opt_out_insert(session: AsyncSession, number: str) -> Any:
    """INSERT the number as an opt-out unless it is listed: ON CONFLICT DO NOTHING, so two
    processes listing the same number at once can't fail each other's batch."""
    values = {
        "number": number,
        "source": OPT_OUT_SOURCE,
        "reason": OPT_OUT_REASON,
        "created_at": utcnow(),
    }
    if session.bind.dialect.name == "postgresql":
        return pg_insert(DoNotCall).values(**values).on_conflict_do_nothing()
    return sqlite_insert(DoNotCall).values(**values).on_conflict_do_nothing()
