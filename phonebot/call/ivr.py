"""Phone menus on dial-out: a call with a goal (`ivr_goal`) gets through the menu that answers.

Pipecat's `IVRNavigator` takes the LLM's place in the pipeline. It first asks the LLM
whether the callee's first words are a menu or a person (`<mode>ivr|conversation</mode>`);
in a menu it swaps the context for its navigation prompt with the goal, lengthens the
VAD's silence so a menu's pauses don't end a turn (2 s), and turns the LLM's
`<dtmf>2</dtmf>` into `OutputDTMFUrgentFrame`, which the output transport plays as the
key's tones in the call's audio: Media Streams has no message for sending a key towards
Twilio, so in-band tones are how a bot presses keys on a Twilio stream. The offline
responder answers the same prompts from keywords (phonebot.ai.offline.menus).

This module answers the navigator's events, as the call's agent would want:

- a person (at once, or once the menu says it is transferring: `<ivr>completed</ivr>`):
  the agent's own instructions come back, with the VAD's usual silence, and the call goes
  on as any dial-out (the agent opens when the person has spoken);
- stuck (`<ivr>stuck</ivr>`, the same menu three times, or nothing that fits the goal),
  or no person after IVR_TIMEOUT_S: the bot hangs up without a word and the call ends
  `ivr failed` (a campaign's outcome `ivr_failed`, retried when the campaign says so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.extensions.ivr.ivr_navigator import IVRNavigator, IVRProcessor, IVRStatus
from pipecat.frames.frames import LLMMessagesUpdateFrame, VADParamsUpdateFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContextMessage
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService

from phonebot.call.barge_in import vad_params
from phonebot.config import Settings
from phonebot.records.writer import IVR_FAILED_REASON

if TYPE_CHECKING:  # only its type: the call hands us its CallControl
    from phonebot.call.control import CallControl

IVR_FAILED = IVR_FAILED_REASON
# A menu's pauses between options ("For sales, press 1. … For billing, press 2.") are
# longer than a person's between words: Pipecat's navigator waits 2 s of silence there.
MENU_SILENCE_S = 2.0


class MenuNavigation:
    """One dial-out's way through a phone menu to `goal`, or None's pass-through.

    `stage` is what sits in the LLM's place in the pipeline: the navigator when there is a
    goal, else the LLM itself. `bind` hands over the worker and call control once they
    exist (they are built from the pipeline).
    """

    def __init__(
        self,
        call_sid: str,
        goal: str | None,
        llm: LLMService,
        settings: Settings,
        system_message: LLMContextMessage,
    ):
        self.call_sid = call_sid
        self.goal = goal
        self.settings = settings
        self.system_message = system_message
        self.navigating = goal is not None  # until a person is reached, or we give up
        self.outcome: str | None = None  # "person", "menu then person", "ivr failed"
        self._worker: PipelineWorker | None = None
        self._control: CallControl | None = None
        self._open_call: Callable[[], Awaitable[None]] | None = None
        self._timer: asyncio.Task | None = None
        self.stage: FrameProcessor = llm
        # What hands the TTS its text: the navigator's tag reader (it takes `<dtmf>…` out
        # of the LLM's text), else the LLM. The "bot says" log watches it.
        self.speaker: FrameProcessor = llm
        if goal is not None:
            navigator = IVRNavigator(
                llm=llm, ivr_prompt=goal, ivr_vad_params=self._menu_vad_params()
            )
            navigator.add_event_handler("on_conversation_detected", self.on_person)
            navigator.add_event_handler("on_ivr_status_changed", self.on_status)
            self.stage = navigator
            self.speaker = navigator.processors[-2]  # [source, llm, IVRProcessor, sink]

    def bind(
        self,
        worker: PipelineWorker,
        control: CallControl,
        open_call: Callable[[], Awaitable[None]],
    ) -> None:
        """The call's worker and control, and how it opens a dial-out (the agent's opening
        once the callee has spoken, or after DIALOUT_GREETING_DELAY_S of silence)."""
        self._worker, self._control, self._open_call = worker, control, open_call

    def start(self) -> None:
        """The call is up: give the menu IVR_TIMEOUT_S to lead to a person."""
        if self.navigating:
            logger.info(f"Call {self.call_sid}: listening for a phone menu (goal: {self.goal!r})")
            self._timer = asyncio.create_task(self._time_limit())

    def stop(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()

    # --- the navigator's events ------------------------------------------------------

    async def on_person(self, processor: IVRProcessor, history: list[LLMContextMessage]) -> None:
        """The callee's first words were a person's: answer them as the agent."""
        await self._reached_person("person", history, run_llm=True)

    async def on_status(self, processor: IVRProcessor, status: IVRStatus) -> None:
        if status == IVRStatus.DETECTED:
            logger.info(f"Call {self.call_sid}: a phone menu answered; navigating")
        elif status == IVRStatus.COMPLETED:
            # The menu is putting us through: the agent opens as on any dial-out, when the
            # person has spoken (or after the usual silence: their "Hello" may have come in
            # the same turn as "please hold", and been taken by the navigator).
            await self._reached_person("menu then person", [], run_llm=False)
            if self._open_call is not None:
                await self._open_call()
        elif status == IVRStatus.STUCK:
            await self._give_up("the menu offers nothing that leads to the goal")

    # --- what the call does ----------------------------------------------------------

    async def _reached_person(
        self, outcome: str, history: list[LLMContextMessage], *, run_llm: bool
    ) -> None:
        if not self.navigating:
            return
        self.navigating, self.outcome = False, outcome
        self.stop()
        logger.info(f"Call {self.call_sid}: {outcome}; talking as the agent")
        await self._queue(
            LLMMessagesUpdateFrame(messages=[self.system_message, *history], run_llm=run_llm),
            VADParamsUpdateFrame(params=vad_params(self.settings)),
        )

    async def _give_up(self, why: str) -> None:
        if not self.navigating:
            return
        self.navigating, self.outcome = False, IVR_FAILED
        self.stop()
        logger.info(f"Call {self.call_sid}: {IVR_FAILED} ({why}); hanging up")
        if self._control is not None:
            await self._control.hang_up(IVR_FAILED)

    async def _time_limit(self) -> None:
        await asyncio.sleep(self.settings.ivr_timeout_s)
        await self._give_up(f"no person within IVR_TIMEOUT_S ({self.settings.ivr_timeout_s:g} s)")

    async def _queue(self, *frames) -> None:
        if self._worker is not None:
            await self._worker.queue_frames(list(frames))

    def _menu_vad_params(self) -> VADParams:
        """The call's VAD (its barge-in tuning), with a menu's longer silence."""
        params = vad_params(self.settings)
        return VADParams(
            confidence=params.confidence,
            start_secs=params.start_secs,
            stop_secs=MENU_SILENCE_S,
            min_volume=params.min_volume,
        )
