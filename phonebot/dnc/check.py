"""The check every dial makes first, campaign or `/dialout`: is the number on the list?

    dnc = DoNotCallList(records)      # one per app (`Campaigns.dnc`): the list and its check
    await dnc.check(body.to)          # in /dialout: DialRefused (403) or DoNotCallUnavailable (503)

The list lives in the call records' database, so with CALL_RECORDS=false there is none and
nothing is checked. The campaign scheduler reads it inside its claim instead
(`phonebot.dnc.store.listed`), and the bot's `opt_out` adds to it through the records writer
(`phonebot.dnc.store.opt_out_insert`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from phonebot.config import mask
from phonebot.db.migrate import migrate
from phonebot.dnc.store import DoNotCallStore, dnc_number
from phonebot.twilio.dial_guard import RULE_DNC, DialRefused

if TYPE_CHECKING:
    from phonebot.records.service import Records


class DoNotCallUnavailable(RuntimeError):
    """The list can't be read (database down): no dial goes out unchecked (HTTP 503)."""


class DoNotCallList:
    """The app's do-not-call list: its store (the API's) and the check before a dial."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self.enabled = records.enabled
        self.store = DoNotCallStore(records.sessions)

    async def check(self, to: str) -> None:
        """DialRefused when `to` is on the list; DoNotCallUnavailable when it can't be read."""
        if not self.enabled:
            return
        number = dnc_number(to) or to
        try:
            listed = await self._listed(number)
        except Exception as error:
            original = getattr(error, "orig", None) or error
            logger.error(f"Do-not-call list unavailable: {type(original).__name__}")
            raise DoNotCallUnavailable("the do-not-call list can't be read: no call") from None
        if listed:
            logger.info(f"Dial to {mask(number)} refused: on the do-not-call list")
            raise DialRefused(RULE_DNC, f"{number} is on the do-not-call list")

    async def _listed(self, number: str) -> bool:
        try:
            return await self.store.has(number)
        except Exception:
            # The schema may not be there yet (the database was down when the server
            # started, or the app's lifespan never ran): migrate, as the records' writer
            # does before its next write, and ask again.
            await migrate(self._records.database_url, self._records.engine)
            return await self.store.has(number)
