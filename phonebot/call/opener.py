"""Who speaks first on a call: the bot at once on a dial-in, the callee on a dial-out."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker

from phonebot.config import Settings


class CallOpener:
    """Who speaks first.

    Dial-in: the bot greets at once. Dial-out: the callee usually answers with "Hello?",
    and the LLM's first reply (instructed by the system prompt) is the campaign opening;
    if the callee stays silent for `dialout_greeting_delay_s`, the bot opens anyway.
    """

    def __init__(self, worker: PipelineWorker, opening: str, direction: str, settings: Settings):
        self._worker = worker
        self._opening = opening
        self._direction = direction
        self._delay_s = settings.dialout_greeting_delay_s
        self._caller_spoke = False
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        """Open now (dial-in), or when the callee has spoken or stayed silent (dial-out;
        again after a phone menu has put the call through: phonebot.call.ivr)."""
        if self._direction == "outbound":
            self.stop()
            self._caller_spoke = False
            self._timer = asyncio.create_task(self._open_if_silent())
        else:
            await self._speak_opening()

    def caller_spoke(self) -> None:
        self._caller_spoke = True

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()

    async def _open_if_silent(self) -> None:
        await asyncio.sleep(self._delay_s)
        if not self._caller_spoke:
            await self._speak_opening()

    async def _speak_opening(self) -> None:
        await self._worker.queue_frames([TTSSpeakFrame(self._opening)])
