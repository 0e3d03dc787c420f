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

- a person answers at once (`<mode>conversation</mode>`): the agent's own instructions
  come back, with the VAD's usual silence, and the agent answers them;
- the menu says it is putting us through (`<ivr>completed</ivr>`): the agent's
  instructions come back and it waits, holding, for the person's first words (answered
  at once if they came in the same turn as "please hold");
- stuck (`<ivr>stuck</ivr>`: the same options three times, or three menus with nothing
  near the goal), or no person within IVR_TIMEOUT_S (holding included): the bot hangs up
  without a word and the call ends `ivr failed` (a campaign's outcome `ivr_failed`,
  retried when the campaign says so).

A callee who says nothing is opened to as on any dial-out (the opener, after
DIALOUT_GREETING_DELAY_S), and what they say next is classified.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.extensions.ivr.ivr_navigator import IVRNavigator, IVRProcessor, IVRStatus
from pipecat.frames.frames import LLMMessagesUpdateFrame, VADParamsUpdateFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext, LLMContextMessage
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService

from phonebot.agents.agent import said_any
from phonebot.agents.analysis import message_text
from phonebot.ai.offline.menus import PERSON_CUES, TRANSFER_CUES
from phonebot.call.barge_in import vad_params
from phonebot.call.control import EndReason
from phonebot.config import Settings

if TYPE_CHECKING:
    from phonebot.call.control import CallControl

# A menu's pauses between options ("For sales, press 1. … For billing, press 2.") are
# longer than a person's between words: Pipecat's navigator waits 2 s of silence there.
MENU_SILENCE_S = 2.0
# How a person's first words after "please hold" begin, besides PERSON_CUES ("this is").
GREETING_WORDS = ("hello", "hi", "hey")
# The navigation's stages: the callee's first words are classified (LISTENING); a menu is
# navigated (NAVIGATING); the menu said it is putting us through (HOLDING, until the person
# speaks); the agent talks (TALKING); or the bot gave up (FAILED).
LISTENING, NAVIGATING, HOLDING, TALKING, FAILED = (
    "listening", "navigating", "holding", "talking", "failed"
)  # fmt: skip


class MenuNavigation:
    """One dial-out's way through a phone menu to its `goal` (without a goal: the LLM, as
    on any call).

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
        self.state = LISTENING if goal is not None else TALKING
        self._worker: PipelineWorker | None = None
        self._control: CallControl | None = None
        self._context: LLMContext | None = None
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

    @property
    def navigating(self) -> bool:
        """Until the agent talks to a person, or the bot has given up."""
        return self.state in (LISTENING, NAVIGATING, HOLDING)

    @property
    def at_a_menu(self) -> bool:
        """A menu answered and no person yet: it may take its time (a speech menu deciding,
        a hold), and is never re-prompted; IVR_TIMEOUT_S bounds it. Not while LISTENING:
        a callee who picked up and says nothing is re-prompted as on any call."""
        return self.state in (NAVIGATING, HOLDING)

    def bind(self, worker: PipelineWorker, control: CallControl, context: LLMContext) -> None:
        self._worker, self._control, self._context = worker, control, context

    def start(self) -> None:
        """The call is up: the menu has IVR_TIMEOUT_S to put us through to a person."""
        if self.navigating:
            logger.info(f"Call {self.call_sid}: listening for a phone menu (goal: {self.goal!r})")
            self._timer = asyncio.create_task(self._time_limit())

    def stop(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()

    def callee_said(self, text: str | None) -> None:
        """The callee's turn, as recognised: after "please hold", words are the person
        (hold music that is only noise to the recogniser is not)."""
        if self.state == HOLDING and text and text.strip():
            self._talking("a person after the menu")

    # --- the navigator's events ------------------------------------------------------

    async def on_person(self, processor: IVRProcessor, history: list[LLMContextMessage]) -> None:
        """The callee's first words were a person's: answer them as the agent."""
        if self.navigating:
            self._talking("a person")
            await self._as_the_agent(history, run_llm=True)

    async def on_status(self, processor: IVRProcessor, status: IVRStatus) -> None:
        if status == IVRStatus.DETECTED and self.state == LISTENING:
            self.state = NAVIGATING
            logger.info(f"Call {self.call_sid}: a phone menu answered; navigating")
        elif status == IVRStatus.COMPLETED and self.state == NAVIGATING:
            await self._put_through()
        elif status == IVRStatus.STUCK:
            await self._give_up("the menu leads nowhere near the goal")

    # --- what the call does ----------------------------------------------------------

    async def _put_through(self) -> None:
        """The menu is transferring us. The agent waits for the person's first words (the
        time limit still runs: a hold can last); if they came in the same turn as
        "please hold", it answers them now."""
        heard = self._last_heard()
        if heard is not None and words_after_transfer(heard):
            self._talking("a person, as the menu put us through")
            await self._as_the_agent([{"role": "user", "content": heard}], run_llm=True)
            return
        self.state = HOLDING
        logger.info(f"Call {self.call_sid}: the menu is putting us through; holding")
        await self._as_the_agent([], run_llm=False)

    def _talking(self, who: str) -> None:
        self.state = TALKING
        self.stop()
        logger.info(f"Call {self.call_sid}: reached {who}; talking as the agent")

    async def _as_the_agent(self, history: list[LLMContextMessage], *, run_llm: bool) -> None:
        """The agent's instructions and the call's usual VAD back, after the navigator's."""
        await self._queue(
            LLMMessagesUpdateFrame(messages=[self.system_message, *history], run_llm=run_llm),
            VADParamsUpdateFrame(params=vad_params(self.settings)),
        )

    async def _give_up(self, why: str) -> None:
        if not self.navigating:
            return
        self.state = FAILED
        self.stop()
        logger.info(f"Call {self.call_sid}: {EndReason.IVR_FAILED} ({why}); hanging up")
        if self._control is not None:
            await self._control.hang_up(EndReason.IVR_FAILED)

    async def _time_limit(self) -> None:
        await asyncio.sleep(self.settings.ivr_timeout_s)
        await self._give_up(f"no person within IVR_TIMEOUT_S ({self.settings.ivr_timeout_s:g} s)")

    def _last_heard(self) -> str | None:
        """The callee's latest turn, as the navigator's LLM got it."""
        messages = self._context.get_messages() if self._context is not None else []
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return message_text(message.get("content")) or None
        return None

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


def words_after_transfer(heard: str) -> str:
    """A person's words after the menu's last "transferring" sentence ("Please hold while
    I transfer you. Billing, this is Sam."), or "" (an announcement such as "This call
    may be recorded" is not a person: their words greet or say who they are)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", heard.strip()) if s.strip()]
    last = max(
        (i for i, s in enumerate(sentences) if any(cue in s.lower() for cue in TRANSFER_CUES)),
        default=None,
    )
    after = "" if last is None else " ".join(sentences[last + 1 :])
    return after if said_any((*PERSON_CUES, *GREETING_WORDS), after) else ""
