"""Twilio's answering-machine verdicts, from `POST /amd` on any process to the call's bot.

Behind a load balancer Twilio's `/amd` callback and the call's media stream may land on
different processes (or machines), and the verdict may come before the stream has even
connected (Twilio is quick on a human). So `/amd` stores the verdict (SET EX
VERDICT_TTL_S) and announces it (PUBLISH); the bot first GETs it, then waits.

How the bot waits: for the announcement, on one pub/sub listener per process (a verdict
reaches a waiting bot at once, and a process costs one extra Redis connection, not one
per call), *and* with a GET every VERDICT_POLL_S, because pub/sub is fire-and-forget: an
announcement sent while the listener was reconnecting is lost, and the poll bounds what
that costs to a second of silence. Polling alone would have cost the caller up to the
poll period on every call (a human's "Hello?" answered a second late) and Redis a GET
per waiting call per period.

A call gets one verdict: the first one `set` wins (SET NX on a key of its own, in every
process), so a replayed or late callback can't change what the bot was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass

from loguru import logger

from phonebot.state.base import SharedState, StateUnavailable

# A verdict no call claims (the stream never connected) is forgotten after this long.
VERDICT_TTL_S = 300.0
VERDICT_POLL_S = 1.0
CHANNEL = "amd"
PREFIX = "amd:"
# The claim that a call's verdict was given (SET NX): the first `set` wins.
GIVEN_PREFIX = "amd-given:"


class Verdicts:
    """One verdict per call, set on any process and awaited by the call's bot, wherever it
    runs; see the module docstring. Subclasses name their keys and channel."""

    channel = CHANNEL
    prefix = PREFIX
    given_prefix = GIVEN_PREFIX
    what = "AMD verdict"  # for log lines

    def __init__(
        self, shared: SharedState, ttl_s: float = VERDICT_TTL_S, poll_s: float = VERDICT_POLL_S
    ):
        self._shared = shared
        self._ttl_s = ttl_s
        self._poll_s = poll_s
        self._waiters: dict[str, set[asyncio.Future]] = {}
        shared.watch(self.channel, self._announced)

    async def set(self, call_sid: str, answered_by: str) -> bool:
        """Record Twilio's verdict and wake the call's bot, wherever it runs; False (and
        nothing changed) when the call already had one.

        Raises StateUnavailable when the shared state can't be reached.
        """
        claim = [self.given_prefix + call_sid]
        if await self._shared.claim(claim, self._ttl_s) is not None:
            return False
        try:
            await self._shared.announce(
                self.prefix + call_sid,
                answered_by,
                self._ttl_s,
                self.channel,
                f"{call_sid} {answered_by}",
            )
        except BaseException:
            with contextlib.suppress(StateUnavailable):  # else it expires after the TTL
                await self._shared.forget(claim)
            raise
        return True

    async def get(self, call_sid: str) -> str | None:
        """The verdict recorded for a call, if any (without waiting)."""
        return await self._shared.get(self.prefix + call_sid)

    async def wait(self, call_sid: str, timeout: float) -> str | None:
        """The call's verdict, or None if none came within `timeout` seconds.

        The shared state being unreachable counts as "no verdict yet": the bot keeps
        asking until the timeout, then converses (as without AMD).
        """
        self._shared.listen()
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(call_sid, set()).add(future)
        deadline = time.monotonic() + timeout
        failing = False
        try:
            while True:
                try:
                    if verdict := await self.get(call_sid):
                        return verdict
                except StateUnavailable as error:
                    if not failing:  # once per wait, not once per poll
                        logger.warning(f"Call {call_sid}: can't read its {self.what} ({error})")
                    failing = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    return await asyncio.wait_for(
                        asyncio.shield(future), min(remaining, self._poll_s)
                    )
                except TimeoutError:
                    continue
        finally:
            waiters = self._waiters.get(call_sid, set())
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(call_sid, None)
            future.cancel()

    def _announced(self, message: str) -> None:
        call_sid, _, answered_by = message.partition(" ")
        for future in self._waiters.get(call_sid, ()):
            if not future.done():
                future.set_result(answered_by)


class AmdVerdicts(Verdicts):
    """The app's `amd_verdicts`: `set` from the `/amd` callback, `wait` from the bot."""


@dataclass(frozen=True)
class TransferVerdict:
    """How a warm transfer went, as `TransferVerdicts` store it (JSON): the outcome, the
    person's CallSid, and when they answered and decided (Unix times)."""

    outcome: str
    person_call_sid: str | None = None
    answered_at: float | None = None  # Unix time the person's stream started
    at: float = 0.0  # Unix time of the verdict

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> TransferVerdict:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError):
            return cls(outcome=text)


class TransferVerdicts(Verdicts):
    """The app's `transfer_verdicts`: how a warm transfer went (phonebot.call.warm_transfer),
    set by the person's call (a key pressed, a hang-up) or by Twilio's status callback for
    it (no answer, busy), awaited by the caller's call, which may run on another process.
    The first verdict wins, so a late "accept" after the caller gave up changes nothing."""

    channel = "transfer"
    prefix = "transfer:"
    given_prefix = "transfer-given:"
    what = "transfer verdict"
