"""`Campaigns`: the store and the scheduler of one app (one of its services,
`phonebot.web.services`; its routers are wired by `phonebot.web.campaigns`).

    await campaigns.start(services.admission)              # in the lifespan, after records
    await campaigns.dnc.check(body.to)                     # in /dialout: the do-not-call list
    await campaigns.stop()

Campaigns live in the call records' database, so with CALL_RECORDS=false there are none
(the API answers 503) and /dialout has no list to check. The do-not-call list
(`phonebot.dnc`) lives in the same database and is reached through `Campaigns.dnc`.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from phonebot.campaigns.scheduler import CampaignScheduler, Dial
from phonebot.campaigns.store import CampaignStore
from phonebot.campaigns.windows import Clock, SystemClock
from phonebot.config import Settings
from phonebot.dnc.check import DoNotCallList


class Campaigns:
    """Everything about campaigns for one app (its services' `campaigns`)."""

    def __init__(
        self,
        settings: Settings,
        records: Any,
        *,
        dial: Dial | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.enabled = records.enabled
        self.clock = clock or SystemClock()
        self.store = CampaignStore(records.sessions, settings, records.events)
        self.dnc = DoNotCallList(records)  # checked before /dialout; the claim reads it too
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
