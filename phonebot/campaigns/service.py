"""`Campaigns`: the store and the scheduler of one app (wired by `phonebot.campaigns.app`).

    await campaigns.start(app.state.admission)             # in the lifespan, after records
    await campaigns.check_dial(body.to)                    # in /dialout: the do-not-call list
    await campaigns.stop()

Campaigns live in the call records' database, so with CALL_RECORDS=false there are none
(the API answers 503) and /dialout has no list to check.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request, status
from loguru import logger

from phonebot.campaigns.dial_guard import RULE_DNC, DialRefused
from phonebot.campaigns.scheduler import CampaignScheduler, Dial
from phonebot.campaigns.store import CampaignStore, dnc_number
from phonebot.campaigns.windows import Clock, SystemClock
from phonebot.config import Settings, mask
from phonebot.records.migrate import migrate


class DoNotCallUnavailable(RuntimeError):
    """The list can't be read (database down): no dial goes out unchecked (HTTP 503)."""


class Campaigns:
    """Everything about campaigns for one app (`app.state.campaigns`)."""

    def __init__(
        self,
        settings: Settings,
        records: Any,
        *,
        dial: Dial | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._records = records
        self.enabled = records.enabled
        self.clock = clock or SystemClock()
        self.store = CampaignStore(records.sessions, settings, records.events)
        self.scheduler = CampaignScheduler(
            self.store, settings, dial=dial, records_writer=records.writer, clock=self.clock
        )

    async def start(self, admission: Any = None) -> None:
        """Start the scheduler (unless CAMPAIGN_SCHEDULER=false or records are off)."""
        self.scheduler.admission = admission
        if not self.enabled:
            return
        if not self.settings.campaign_scheduler:
            logger.info("CAMPAIGN_SCHEDULER=false: this process dials no campaign")
            return
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    async def check_dial(self, to: str) -> None:
        """DialRefused when `to` is on the do-not-call list (checked before every dial)."""
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
            return await self.store.dnc_has(number)
        except Exception:
            # The schema may not be there yet (the database was down when the server
            # started, or the app's lifespan never ran): migrate, as the records' writer
            # does before its next write, and ask again.
            await migrate(self._records.database_url, self._records.engine)
            return await self.store.dnc_has(number)


def get_campaigns(request: Request) -> Campaigns:
    """The app's campaigns, or 503 when the server keeps no records (CALL_RECORDS=false)."""
    campaigns: Campaigns = request.app.state.campaigns
    if not campaigns.enabled:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "campaigns need the call records database: CALL_RECORDS=false",
        )
    return campaigns
