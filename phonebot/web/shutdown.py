"""Graceful shutdown: a deploy or Ctrl+C never cuts a caller off mid-sentence.

On the first SIGTERM or SIGINT the server *drains*:

1. it stops taking calls (`CallAdmission.draining`): webhooks answer the busy TwiML,
   `/dialout` answers 503, `/health` answers 503 "draining" (so a load balancer moves
   on), and a new stream is refused unless its webhook was answered before the signal;
2. live calls go on for up to `SHUTDOWN_GRACE_S`; if they all end, the server exits then
   (draining is per process: with several processes sharing Redis, the others go on taking
   calls, and this one waits only for its own calls and for the streams of the webhooks it
   answered, wherever they connect, and at most `STREAM_WAIT_S` (10 s) after each webhook:
   a stream that has not come by then never will, and must not hold the restart);
3. every call still up is told to say `SHUTDOWN_PHRASE` and hang up through the usual
   end-of-call path (`CallControl.end_for_shutdown`: wait for Twilio's playback mark,
   at most `SHUTDOWN_GOODBYE_TIMEOUT_S`, then the REST hang-up);
4. uvicorn then shuts down as usual, closing whatever is left within
   `UVICORN_CLOSE_TIMEOUT_S`, and the process exits 0.

A second signal exits at once (exit status 1), and a watchdog thread ends the process if
any step hangs, so nothing can keep it alive past its deadline.

Why not uvicorn's own handling: on SIGTERM it stops listening and closes every websocket
at once (code 1012), so callers would be cut off, and its `timeout_graceful_shutdown`
only bounds the wait for HTTP tasks. It also re-raises the signal after shutting down,
so the exit status would be "killed by SIGTERM" rather than 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import uvicorn
from loguru import logger

from phonebot.config import Settings
from phonebot.state.admission import CallAdmission

if TYPE_CHECKING:
    from phonebot.call.control import CallControl

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After the goodbye's playback wait: the REST hang-up and pipeline teardown.
HANG_UP_SLACK_S = 5.0
# uvicorn's own last step: close leftover connections and wait for HTTP tasks.
UVICORN_CLOSE_TIMEOUT_S = 5.0
# After a second signal, the watchdog's allowance for the immediate exit.
FORCED_EXIT_S = 3.0
WATCHDOG_SLACK_S = 5.0


class ActiveCalls:
    """The running calls of one app (its services' `calls`), so it can reach their CallControl.

    `PhoneCall.run` (phonebot.call.phone_call) adds a call once its pipeline is built and
    removes it when it ends.
    """

    def __init__(self) -> None:
        self._calls: dict[str, CallControl] = {}
        self._tasks: set[asyncio.Task] = set()

    def add(self, call_sid: str, control: CallControl) -> None:
        self._calls[call_sid] = control

    def discard(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._calls))

    def end_all(self, phrase: str, playout_timeout_s: float) -> int:
        """Tell every call to say `phrase` and hang up; returns how many were told."""
        for control in list(self._calls.values()):
            task = asyncio.create_task(control.end_for_shutdown(phrase, playout_timeout_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(self._calls)


class Drain:
    """Steps 1 to 3 of the module docstring, for one server process."""

    def __init__(self, settings: Settings, admission: CallAdmission, calls: ActiveCalls):
        self.settings = settings
        self.admission = admission
        self.calls = calls

    @property
    def deadline_s(self) -> float:
        """The longest a drain can take, from the signal to "calls are gone"."""
        return self.settings.shutdown_grace_s + self.goodbye_wait_s

    @property
    def goodbye_wait_s(self) -> float:
        return self.settings.shutdown_goodbye_timeout_s + HANG_UP_SLACK_S

    async def run(self) -> None:
        admission, settings = self.admission, self.settings
        admission.start_draining()
        logger.info(
            f"Shutdown: taking no new calls; {admission.process_live} live and "
            f"{admission.process_reserved} answered call(s) may go on for up to "
            f"{settings.shutdown_grace_s:g} s"
        )
        if await admission.wait_idle(settings.shutdown_grace_s):
            logger.info("Shutdown: no calls left; exiting")
            return
        told = self.calls.end_all(settings.shutdown_phrase, settings.shutdown_goodbye_timeout_s)
        logger.info(f"Shutdown: grace period over; saying goodbye on {told} call(s)")
        if await admission.wait_idle(self.goodbye_wait_s):
            logger.info("Shutdown: all calls ended; exiting")
        else:
            logger.warning(f"Shutdown: {admission.in_use_here()} call(s) still up; closing them")


class GracefulServer(uvicorn.Server):
    """uvicorn's server with our signal handling: drain first, then uvicorn's shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Handle SIGINT/SIGTERM on the event loop; unlike uvicorn, don't re-raise them."""
        loop = asyncio.get_running_loop()
        try:
            for sig in HANDLED_SIGNALS:
                loop.add_signal_handler(sig, self.on_signal, sig)
        except (NotImplementedError, RuntimeError):  # Not the main thread, or Windows.
            with super().capture_signals():
                yield
            return
        try:
            yield
        finally:
            for sig in HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._drain_task is None:
            logger.info(f"{name}: draining (a second signal exits at once)")
            self._drain_task = asyncio.create_task(self._drain_then_exit())
            watchdog(self.drain.deadline_s + UVICORN_CLOSE_TIMEOUT_S + WATCHDOG_SLACK_S)
            return
        logger.warning(f"{name} again: exiting now, cutting off {len(self.drain.calls)} call(s)")
        self._drain_task.cancel()
        self.exit_code = 1
        self.force_exit = self.should_exit = True
        watchdog(FORCED_EXIT_S)

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True


def watchdog(after_s: float) -> None:
    """End the process after `after_s` seconds unless it has exited by then."""

    def expire() -> None:
        logger.error(f"Shutdown did not finish within {after_s:g} s; exiting")
        os._exit(1)

    timer = threading.Timer(after_s, expire)
    timer.daemon = True
    timer.start()
