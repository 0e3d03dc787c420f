"""The idle watchdog: a call where no one has spoken for a while is a stuck or abandoned stream.

It replaces Pipecat's `idle_timeout_secs`, whose observer makes the worker copy every push
of every frame in the pipeline into a queue for it (with the turn-tracking observer, ~14%
of the event loop's time at 10 calls, py-spy); here it is one time stamp per speaking frame
and one timer task per call that wakes once per timeout period. `PlayoutTracker`
(phonebot.call.playout) feeds it the frames it sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    Frame,
    InputDTMFFrame,
    UserSpeakingFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameProcessor

# What counts as "someone is talking": the output transport's BotSpeakingFrame (every
# 200 ms while the bot's audio goes out) and the user aggregator's UserSpeakingFrame (every
# 200 ms while VAD hears the caller), plus their starts and key presses. Pipecat's own idle
# timeout watches the same speaking frames.
ACTIVITY_FRAMES = (
    BotStartedSpeakingFrame,
    BotSpeakingFrame,
    UserStartedSpeakingFrame,
    UserSpeakingFrame,
    InputDTMFFrame,
)
OnIdle = Callable[[], Awaitable[None]]


class IdleWatchdog:
    """Runs `on_idle` once when neither side has spoken (nor a key been pressed) for
    `timeout_s`; without a timeout or a callback it never does."""

    def __init__(self, timeout_s: float | None = None, on_idle: OnIdle | None = None):
        self._timeout_s = timeout_s
        self._on_idle = on_idle
        self._last_activity = time.monotonic()
        self._task: asyncio.Task | None = None

    def saw(self, frame: Frame) -> None:
        """Note a frame passing by: speech or a key press moves the deadline on."""
        if isinstance(frame, ACTIVITY_FRAMES):
            self._last_activity = time.monotonic()

    def start(self, owner: FrameProcessor) -> None:
        """Start watching, in a task of `owner`'s (Pipecat's task manager tracks it)."""
        if self._timeout_s and self._on_idle and self._task is None:
            self._last_activity = time.monotonic()
            self._task = owner.create_task(self._watch(self._timeout_s, self._on_idle))

    async def stop(self, owner: FrameProcessor) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await owner.cancel_task(task)

    async def _watch(self, timeout_s: float, on_idle: OnIdle) -> None:
        """Sleep until the last activity is `timeout_s` old; activity meanwhile moves it on."""
        while (quiet_s := time.monotonic() - self._last_activity) < timeout_s:
            await asyncio.sleep(timeout_s - quiet_s)
        self._task = None  # done: the CancelFrame `on_idle` causes must not cancel us
        await on_idle()
