"""The campaign scheduler: a task in the server's lifespan that dials due contacts.

Each tick (CAMPAIGN_TICK_S) it
1. reads finished calls from the call records and decides each contact: done, or pending
   again after the retry delay (`finish_calls`),
2. marks claims never confirmed placed, and placed calls whose end never arrived, as
   "unknown" (`CampaignStore.reap_unknown`),
3. starts scheduled campaigns that are due and completes the finished ones,
4. claims due contacts within their window, never above the campaign's max_concurrent and
   calls_per_minute nor the server's free call slots, and dials them with `place_call`.

Every dial is claimed in the database first (see `store.py`), so any number of schedulers
(one per server process) can run on one PostgreSQL database, and a restarted one resumes
where the last one stood. The clock is injected: tests move it by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from phonebot.campaigns.store import CampaignStore, Claim
from phonebot.campaigns.windows import Clock, SystemClock
from phonebot.config import Settings, mask
from phonebot.twilio.dial_guard import DialRefused
from phonebot.twilio.dialout import DialoutRequest, DialoutResponse, place_call
from phonebot.twilio.rest import TwilioUnavailable
from phonebot.twilio.twiml import ParameterError

Dial = Callable[[DialoutRequest], Awaitable[DialoutResponse]]


def default_dial(settings: Settings) -> Dial:
    """`place_call` with the server's public URL (PUBLIC_URL, else loopback on PORT)."""
    base_url = settings.public_url or f"http://127.0.0.1:{settings.port}"

    async def dial(request: DialoutRequest) -> DialoutResponse:
        return await place_call(request, settings, base_url)

    return dial


async def free_call_slots(admission: Any, settings: Settings) -> int:
    """Calls the server could still take now (MAX_CONCURRENT_CALLS minus live and reserved
    ones, cluster-wide with shared state); 0 while it refuses calls or drains."""
    if admission is None:
        return settings.max_concurrent_calls
    if getattr(admission, "draining", False):
        return 0
    refusal = await _maybe_await(admission.refusal())
    if refusal:
        return 0
    counts = getattr(admission, "counts", None)
    if counts is not None:
        # Not counted as a call's Redis round trips (the benchmark's per-call figure).
        quiet = "counted" in inspect.signature(counts).parameters
        numbers = await _maybe_await(counts(counted=False) if quiet else counts())
        live, reserved = numbers.live, numbers.reserved
    else:
        live, reserved = admission.live, admission.reserved
    return max(0, settings.max_concurrent_calls - live - reserved)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class CampaignScheduler:
    """Dials campaigns; one per server process (the app's `campaigns.scheduler`)."""

    def __init__(
        self,
        store: CampaignStore,
        settings: Settings,
        *,
        dial: Dial | None = None,
        admission: Any = None,
        records_writer: Any = None,
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.dial = dial or default_dial(settings)
        self.admission = admission
        self.writer = records_writer
        self.clock = clock or SystemClock()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._dialing: set[asyncio.Task] = set()
        self._failing = False
        self.dialed = 0

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="campaign-scheduler")

    async def stop(self) -> None:
        """Stop claiming; dials already sent to Twilio get their answer recorded."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.settle()

    async def settle(self) -> None:
        """Wait for the dials in flight (their calls.create) to be answered and recorded."""
        while self._dialing:
            await asyncio.gather(*list(self._dialing), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
                self._ok()
            except Exception as error:  # the database is down: try again next tick
                self._failed(error)
            await self.clock.sleep(self.settings.campaign_tick_s)

    # --- one tick ----------------------------------------------------------------------
    async def tick(self) -> int:
        """One pass; returns how many calls it started (tests call this directly)."""
        now = self.clock.now()
        await self.store.finish_calls(now)  # first: a call that did end is never "unknown"
        await self.store.reap_unknown(now)
        campaigns = await self.store.due_campaigns(now)
        if not campaigns:
            return 0
        room = await free_call_slots(self.admission, self.settings)
        room -= await self.store.ringing()
        started = 0
        for campaign_id in campaigns:
            if room <= 0:
                break
            claims = await self.store.claim(campaign_id, now, room, self.name)
            room -= len(claims)
            for claim in claims:
                self._spawn(self._place(claim))
                started += 1
        return started

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._dialing.add(task)
        task.add_done_callback(self._dialing.discard)

    async def _place(self, claim: Claim) -> None:
        try:
            await self._place_claimed(claim)
        except Exception as error:  # the database failed: the claim is reaped as unknown
            original = getattr(error, "orig", None) or error
            logger.error(f"Campaign {claim.campaign_id}: attempt {claim.number} of contact"
                         f" {mask(claim.to)} not saved: {type(original).__name__}")

    async def _place_claimed(self, claim: Claim) -> None:
        """calls.create for one claimed attempt, and what came of it, in the database."""
        request = DialoutRequest(
            to=claim.to, from_=claim.from_number, parameters=claim.parameters,
            machine_detection=claim.machine_detection,
        )
        who = f"campaign {claim.campaign_id} contact {mask(claim.to)} attempt {claim.number}"
        try:
            placed = await self.dial(request)
        except DialRefused as error:
            logger.warning(f"{who}: refused ({error.rule})")
            await self.store.not_placed(claim, self.clock.now(), str(error), state="refused")
        except ParameterError as error:
            logger.error(f"{who}: not placed: {error}")
            await self.store.not_placed(claim, self.clock.now(), str(error), state="failed")
        except TwilioUnavailable as error:
            logger.warning(f"{who}: {error.detail}")
            await self.store.not_placed(
                claim, self.clock.now(), error.detail, unknown=error.uncertain
            )
        except Exception as error:  # we can't tell whether it rang: never again blindly
            logger.exception(f"{who}: calls.create failed unexpectedly")
            await self.store.not_placed(
                claim, self.clock.now(), f"{type(error).__name__}: {error}", unknown=True
            )
        else:
            self.dialed += 1
            logger.info(f"{who}: call {placed.call_sid} placed")
            await self.store.placed(claim, placed.call_sid, self.clock.now())
            self._record(claim, placed)

    def _record(self, claim: Claim, placed: DialoutResponse) -> None:
        """The call's record starts now, like a /dialout's, with its campaign fields."""
        if self.writer is None:
            return
        self.writer.dialout_placed(
            placed.call_sid,
            to=placed.to,
            from_number=claim.from_number or self.settings.twilio_phone_number,
            parameters=claim.parameters,
            campaign_id=claim.campaign_id,
            customer_id=claim.customer_id,
        )

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            original = getattr(error, "orig", None) or error
            logger.error(f"Campaigns: scheduler pass failed: {type(original).__name__}:"
                         f" {str(original)[:300]}")

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("Campaigns: scheduler passes work again")
