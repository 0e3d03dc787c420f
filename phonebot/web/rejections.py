"""The app's log of refused requests: summaries, so a flood of refusals can't flood the log.

Its own module because the app's services (`phonebot.web.services`) hold one and the
guards (`phonebot.web.guards`) that note refusals read those services.
"""

from __future__ import annotations

import math
import time

from loguru import logger

from phonebot.state.token_bucket import Clock


class RejectionLog:
    """Logs refused requests without letting a flood flood the log.

    The first refusal of a window is logged at once; the rest are counted and summed up
    in one line when the next refusal comes after the window.
    """

    def __init__(self, window_s: float = 10.0, clock: Clock = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._window_start = -math.inf
        self._counts: dict[str, int] = {}

    def note(self, what: str) -> None:
        now = self._clock()
        if now - self._window_start < self._window_s:
            self._counts[what] = self._counts.get(what, 0) + 1
            return
        if self._counts:
            summary = ", ".join(f"{count} × {kind}" for kind, count in self._counts.items())
            logger.warning(f"Refused in the last {self._window_s:g} s: {summary}")
        self._counts = {}
        self._window_start = now
        logger.warning(f"Refused: {what}")
