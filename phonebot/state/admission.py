"""Call admission: how many calls the cluster and this process have and have promised.

A call holds a slot from the moment its webhook is answered with `<Connect><Stream>` (a
*reservation*, for CALL_RESERVATION_TTL_S) until its stream ends (a *live lease*). Both
are leases in the shared state with an expiry: a burst of webhooks spread over several
processes can't overshoot MAX_CONCURRENT_CALLS before any stream connects, and a process
that dies without releasing its calls (SIGKILL, a lost machine) frees their slots within
CALL_LEASE_TTL_S, because its live calls stop being renewed (every CALL_LEASE_TTL_S / 3,
by one background task per process for all of its calls).

Two caps: MAX_CONCURRENT_CALLS for the whole cluster (what your providers' and Twilio's
limits allow) and MAX_CALLS_PER_PROCESS for the pipelines one process runs (what its
core can carry). A stream may land on another process than its webhook did, so the
per-process cap is checked when the stream is admitted; a reserved call refused there
hears STREAM_CLOSED_PHRASE. Keep MAX_CONCURRENT_CALLS ≤ processes × MAX_CALLS_PER_PROCESS
and balance websockets by least connections so that stays rare.

The stream token is single-use: the first verified stream for a CallSid spends it
(SET NX, kept REPLAY_CACHE_TTL_S + MAX_CALL_DURATION_S, longer than a call can last), so
a replayed `start` message can't start a second pipeline, on any process.

Draining (SIGTERM) is per process: it refuses new calls here and waits for this
process's live calls and for the reservations it handed out, until their streams have
connected (anywhere), or their calls are reported over, or STREAM_WAIT_S has passed since
their webhook: Twilio opens a stream within a second or two of fetching the TwiML, so one
not there by then is not coming (the caller hung up), and a restart must not wait the
reservation's whole CALL_RESERVATION_TTL_S for it.

When the shared state is unreachable every method raises StateUnavailable (callers fail
closed: busy TwiML, 503, refused stream), except `release`, and the renewal of live
calls, which log once per outage and go on: a live call is never cut off for it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable

from cachetools import TTLCache
from loguru import logger

from phonebot.config import Settings
from phonebot.state.base import (
    ADMITTED,
    CLUSTER_FULL,
    DRAINING,
    PROCESS_FULL,
    TOKEN_USED,
    LeaseCounts,
    SharedState,
    StateUnavailable,
    stream_token_key,
)

IDLE_POLL_S = 0.1
# How long after its webhook a draining process still waits for a call's stream.
STREAM_WAIT_S = 10.0
SHUTTING_DOWN = "the server is shutting down"
Clock = Callable[[], float]


def process_name() -> str:
    """Names this process's leases: host, pid and a random tag (pids repeat after restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class CallAdmission:
    """The server's call cap, over the shared state; one per app (its services' `admission`)."""

    def __init__(
        self,
        shared: SharedState,
        settings: Settings,
        process: str | None = None,
        clock: Clock = time.monotonic,
    ):
        self._shared = shared
        self.max_calls = settings.max_concurrent_calls
        self.max_calls_here = settings.max_calls_per_process or settings.max_concurrent_calls
        self._reservation_ttl_s = settings.call_reservation_ttl_s
        self._lease_ttl_s = settings.call_lease_ttl_s
        # A token stays spent for longer than any call could last.
        self._token_ttl_s = settings.replay_cache_ttl_s + settings.max_call_duration_s
        self.process = process or process_name()
        self.draining = False
        self._clock = clock
        self._live: set[str] = set()  # calls this process runs
        # Reservations this process handed out (→ when), for its drain to wait on.
        self._reserved: TTLCache[str, float] = TTLCache(
            maxsize=100_000, ttl=self._reservation_ttl_s, timer=clock
        )
        self._renewer: asyncio.Task | None = None
        self._renewal_failing = False

    # --- what the server asks ---------------------------------------------------------

    def capacity_refusal(self) -> str:
        return f"at capacity: {self.max_calls} concurrent calls (MAX_CONCURRENT_CALLS)"

    async def refusal(self) -> str | None:
        """Why no new call can start now (draining, cluster full), or None."""
        if self.draining:
            return SHUTTING_DOWN
        if (await self.counts()).in_use >= self.max_calls:
            return self.capacity_refusal()
        return None

    async def reserve(self, call_sid: str) -> str | None:
        """Hold a slot for a call whose webhook we are answering; the refusal, or None."""
        if self.draining:
            return SHUTTING_DOWN
        if not await self._shared.reserve(call_sid, self._reservation_ttl_s, self.max_calls):
            return self.capacity_refusal()
        self._reserved[call_sid] = self._clock()
        return None

    async def admit_stream(self, call_sid: str) -> str | None:
        """Let a verified stream run its call (spending its token and reservation), or
        say why not. While draining, only calls already answered (reserved) get in."""
        if call_sid in self._live:
            return f"stream token already used for CallSid={call_sid}"
        verdict = await self._shared.admit(
            call_sid,
            self.process,
            token_ttl_s=self._token_ttl_s,
            lease_ttl_s=self._lease_ttl_s,
            cap=self.max_calls,
            process_cap=self.max_calls_here,
            draining=self.draining,
        )
        if verdict != ADMITTED:
            return self._refusal_text(verdict, call_sid)
        self._live.add(call_sid)
        self._reserved.pop(call_sid, None)
        self._start_renewing()
        return None

    async def call_over(self, call_sid: str) -> None:
        """Spend the stream token of a call that is over (Twilio reported its final status)
        before its stream came, so no stream can start for it on any process (nor will a
        drain wait for it here)."""
        await self._shared.claim([stream_token_key(call_sid)], self._token_ttl_s)
        self._reserved.pop(call_sid, None)

    def _refusal_text(self, verdict: str, call_sid: str) -> str:
        return {
            TOKEN_USED: f"stream token already used for CallSid={call_sid}",
            PROCESS_FULL: (
                f"this process is at capacity: {self.max_calls_here} calls "
                "(MAX_CALLS_PER_PROCESS)"
            ),
            DRAINING: SHUTTING_DOWN,
            CLUSTER_FULL: self.capacity_refusal(),
        }.get(verdict, f"not admitted ({verdict})")

    async def release(self, call_sid: str) -> None:
        """The call's stream ended: free its slot (or let its lease expire if we can't)."""
        if call_sid not in self._live:
            return
        self._live.discard(call_sid)
        try:
            await self._shared.release(self.process, call_sid)
        except StateUnavailable as error:
            logger.warning(
                f"Call {call_sid}: could not release its slot ({error}); it frees itself "
                f"within {self._lease_ttl_s:g} s (CALL_LEASE_TTL_S)"
            )

    async def counts(self, *, counted: bool = True) -> LeaseCounts:
        """Cluster-wide live and reserved calls, and this process's live calls."""
        return await self._shared.counts(self.process, counted=counted)

    @property
    def process_live(self) -> int:
        """Calls this process runs (known without asking the shared state)."""
        return len(self._live)

    @property
    def process_reserved(self) -> int:
        """Reservations this process handed out that have not expired or connected here."""
        return len(self._reserved)

    def in_use_here(self) -> int:
        return self.process_live + self.process_reserved

    def live_calls(self) -> list[str]:
        return sorted(self._live)

    # --- leases of live calls -----------------------------------------------------------

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="call-lease-renewal")

    async def _renew_leases(self) -> None:
        """Every CALL_LEASE_TTL_S / 3, extend the leases of this process's live calls.

        One round trip per period for all of them. A failure (Redis down) is logged once
        per outage and is not fatal: the call goes on, and the next renewal after the
        outage puts its lease back even if Redis lost it.
        """
        while self._live:
            await asyncio.sleep(self._lease_ttl_s / 3)
            if self._live:
                await self.renew_now()

    async def renew_now(self) -> None:
        try:
            await self._shared.renew(
                self.process, sorted(self._live), self._lease_ttl_s, self._token_ttl_s
            )
        except StateUnavailable as error:
            if not self._renewal_failing:
                logger.warning(
                    f"Shared state: could not renew {len(self._live)} live call lease(s) "
                    f"({error}); the calls go on, retrying every {self._lease_ttl_s / 3:g} s"
                )
            self._renewal_failing = True
            return
        if self._renewal_failing:
            logger.info(f"Shared state: call leases renewed again ({len(self._live)} live)")
        self._renewal_failing = False

    # --- draining -------------------------------------------------------------------

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until this process has no live call and none of its reservations is still
        waiting for a stream (True), or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self._forget_connected_reservations()
            self._forget_streams_not_coming()
            if not self.in_use_here():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(IDLE_POLL_S)

    async def _forget_connected_reservations(self) -> None:
        """Drop local reservations whose stream connected on another process."""
        if not self._reserved:
            return
        try:
            pending = set(await self._shared.still_reserved(list(self._reserved)))
        except StateUnavailable:
            return  # they expire locally after CALL_RESERVATION_TTL_S
        for call_sid in list(self._reserved):
            if call_sid not in pending:
                self._reserved.pop(call_sid, None)

    def _forget_streams_not_coming(self) -> None:
        """Drop local reservations answered more than STREAM_WAIT_S ago: no stream now."""
        too_old = self._clock() - STREAM_WAIT_S
        for call_sid, reserved_at in list(self._reserved.items()):
            if reserved_at <= too_old:
                self._reserved.pop(call_sid, None)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None


class StreamGate:
    """The `admit` hook for one `/ws` connection: admits its call, releases it at the end.

    A stream whose token can't be checked (shared state unreachable) is refused.
    """

    def __init__(self, admission: CallAdmission):
        self._admission = admission
        self.call_sid: str | None = None

    async def __call__(self, call) -> str | None:
        try:
            refusal = await self._admission.admit_stream(call.call_sid)
        except StateUnavailable as error:
            return f"shared state unavailable, the stream token can't be checked ({error})"
        if refusal is None:
            self.call_sid = call.call_sid
        return refusal

    async def release(self) -> None:
        if self.call_sid is not None:
            call_sid, self.call_sid = self.call_sid, None
            await self._admission.release(call_sid)
