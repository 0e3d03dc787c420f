"""What Twilio has played: when the bot stops speaking, and the echo of our playback marks.

Pipecat's websocket output sends audio at up to twice real time, so "sent" is not "heard";
`CallControl` (phonebot.call.control) waits here before it hangs up.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputTransportMessageFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from phonebot.call.watchdog import IdleWatchdog, OnIdle


class PlayoutTracker(FrameProcessor):
    """Tells when the bot stops speaking and when Twilio has played what we sent.

    Sits right after `transport.input()`: it sees Twilio's `mark` echoes going downstream
    (our serializer turns them into `InputTransportMessageFrame`s) and the output
    transport's bot-speaking frames coming upstream.

    The same frames feed the call's idle watchdog (phonebot.call.watchdog): with
    `idle_timeout_s`, when neither side has spoken for that long, `on_idle` runs once.
    """

    def __init__(
        self, idle_timeout_s: float | None = None, on_idle: OnIdle | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self._bot_speaking = False
        self._bot_quiet = asyncio.Event()
        self._bot_quiet.set()
        self._marks: dict[str, asyncio.Event] = {}
        self.watchdog = IdleWatchdog(idle_timeout_s, on_idle)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.watchdog.saw(frame)
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            self._bot_quiet.clear()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._bot_quiet.set()
        elif isinstance(frame, InputTransportMessageFrame) and _is_mark(frame.message):
            name = frame.message.get("mark", {}).get("name", "")
            self._marks.setdefault(name, asyncio.Event()).set()
            return  # Our own bookkeeping; nothing downstream needs it.
        elif isinstance(frame, StartFrame):
            self.watchdog.start(self)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self.watchdog.stop(self)
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        await self.watchdog.stop(self)

    @property
    def bot_speaking(self) -> bool:
        return self._bot_speaking

    async def wait_bot_done(self, settle_s: float, timeout: float) -> None:
        """Until the bot has stopped speaking and not started again for `settle_s`.

        Consecutive utterances (a greeting, then a closing line queued behind it) each
        start and stop the bot, so one "stopped" is not the end of what is queued.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._bot_quiet.wait(), deadline - time.monotonic())
            await asyncio.sleep(settle_s)
            if not self._bot_speaking:
                return

    def expect_mark(self, name: str) -> asyncio.Event:
        self._marks[name] = asyncio.Event()
        return self._marks[name]


def _is_mark(message) -> bool:
    return isinstance(message, dict) and message.get("event") == "mark"
