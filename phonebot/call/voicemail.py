"""Voicemail on dial-out: Twilio's answering-machine verdict, and what the bot does with it.

`POST /dialout` with `machine_detection: true` creates the call with Twilio's async AMD
(`MachineDetection=DetectMessageEnd`): the call connects at once and Twilio POSTs its
verdict to our signed `POST /amd` later, once it has heard a human or the end of a
machine's greeting (the beep). `/outbound` marks such a call with the `amd=1` Parameter,
so the bot knows to wait for that verdict before saying anything.

While the verdict is pending the bot must neither open nor answer: a machine's greeting
would otherwise be taken for the callee's "Hello?" and the pitch spoken over it, and would
barge in on the message the bot leaves. `AmdGate` mutes the callee until a human is
confirmed. Then, on a machine, the bot leaves the agent's `voicemail` line and hangs up;
on a human (or no clear verdict) it opens at once: Twilio decided "human" because the
callee has already spoken, so waiting for another "Hello?" would only add silence.

The verdicts live in the app's shared state (`phonebot.state.verdicts.AmdVerdicts`,
the app's `amd_verdicts`): with REDIS_URL the `/amd` callback and the call's media stream
may reach different processes or machines, and a verdict that came before the stream is
still there when the bot asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.classifiers.base_classifier import BaseClassifier
from pipecat.extensions.voicemail.voicemail_detector import VoicemailDetector
from pipecat.frames.frames import (
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from phonebot.agents.agent import Agent, opening_line
from phonebot.call.tasks import CallTasks
from phonebot.pipecat_compat import assume_conversation
from phonebot.twilio.amd import AMD_BY_BOT, AMD_PARAMETER, AMD_REQUESTED, MACHINE_ANSWERS

if TYPE_CHECKING:  # only their types: the bot hands us its CallControl and verdicts
    from phonebot.call.control import CallControl
    from phonebot.records.call_log import CallLog
    from phonebot.state.verdicts import AmdVerdicts

# Twilio stops detecting after MachineDetectionTimeout (30 s by default) and reports what
# it has; wait a little longer so its verdict, not our timeout, normally decides.
AMD_WAIT_TIMEOUT_S = 35.0
VOICEMAIL_END_REASON = "voicemail"
FAX_END_REASON = "fax"


def amd_requested(parameters: Mapping[str, str]) -> bool:
    """Whether a call's Stream parameters ask the bot to wait for an AMD verdict."""
    return (
        parameters.get(AMD_PARAMETER) == AMD_REQUESTED and parameters.get("call_type") == "outbound"
    )


class AmdGate(FrameProcessor):
    """Keeps the callee out of the conversation until a human is confirmed.

    Placed after the playout tracker and before STT. While muted, callee audio goes on as
    silence (so the pipeline's timing and idle watch see a live line) and keypad presses
    are dropped; marks and everything else pass. Without AMD it is never muted.
    """

    def __init__(self, muted: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._muted = muted

    @property
    def muted(self) -> bool:
        return self._muted

    def unmute(self) -> None:
        self._muted = False

    def set_muted(self, muted: bool) -> None:
        """Also a caller on hold (phonebot.call.warm_transfer): what they say is no turn."""
        self._muted = muted

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if self._muted and isinstance(frame, InputDTMFFrame):
            return
        if self._muted and isinstance(frame, InputAudioRawFrame):
            frame = _silenced(frame)
        await self.push_frame(frame, direction)

    async def speak(self, text: str) -> None:
        """Speak `text` (TTS is downstream of the gate)."""
        await self.push_frame(TTSSpeakFrame(text))

    async def end_pipeline(self, reason: str) -> None:
        """End the call without a word (the serializer then hangs up through REST)."""
        await self.push_frame(EndWorkerFrame(reason=reason), FrameDirection.UPSTREAM)


def _silenced(frame: InputAudioRawFrame) -> InputAudioRawFrame:
    silent = InputAudioRawFrame(
        audio=bytes(len(frame.audio)),
        sample_rate=frame.sample_rate,
        num_channels=frame.num_channels,
    )
    silent.transport_source = frame.transport_source
    return silent


class AnsweringMachineScreen:
    """One dial-out call's wait for the AMD verdict, and the bot's answer to it.

    `start()` runs in its own task, because Pipecat waits for transport event handlers
    to finish when the call is torn down; `stop()` cancels it.
    """

    def __init__(
        self,
        call_sid: str,
        parameters: Mapping[str, str],
        *,
        verdicts: AmdVerdicts | None = None,
        timeout_s: float = AMD_WAIT_TIMEOUT_S,
    ):
        self.call_sid = call_sid
        self.requested = amd_requested(parameters)
        self.gate = AmdGate(muted=self.requested)
        self.answered_by: str | None = None
        self._parameters = dict(parameters)
        self._verdicts = verdicts
        self._timeout_s = timeout_s
        self._task: asyncio.Task | None = None

    def start(
        self, control: CallControl, agent: Agent, converse: Callable[[], Awaitable[None]]
    ) -> None:
        """Screen the call in the background; `converse` opens a call that isn't screened."""
        self._task = asyncio.create_task(self._run(control, agent, converse))

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(
        self, control: CallControl, agent: Agent, converse: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await self.screen(control, agent, converse)
        except Exception:  # a background task's failure would otherwise go unseen
            logger.exception(f"Call {self.call_sid}: answering-machine screening failed")

    async def screen(
        self, control: CallControl, agent: Agent, converse: Callable[[], Awaitable[None]]
    ) -> str:
        """Wait for the verdict and act on it; returns what was done, as logged."""
        if not self.requested:
            await converse()
            return "conversation"
        if self._verdicts is None:  # nothing can deliver a verdict here: don't wait for one
            logger.warning(f"Call {self.call_sid}: AMD requested but no verdicts to wait on")
            self.answered_by = None
        else:
            self.answered_by = await self._verdicts.wait(self.call_sid, self._timeout_s)
        verdict = self.answered_by or f"no verdict within {self._timeout_s:g} s"
        outcome = self._outcome(self.answered_by)
        logger.info(f"Call {self.call_sid} voicemail: {verdict} -> {outcome}")
        if outcome == "left message":
            await control.end_call(agent.voicemail, VOICEMAIL_END_REASON)
        elif outcome == "hung up":
            control.note_end(FAX_END_REASON)
            await self.gate.end_pipeline(FAX_END_REASON)
        else:
            self.gate.unmute()
            await self.gate.speak(opening_line(agent, self._parameters))
        return outcome

    @staticmethod
    def _outcome(answered_by: str | None) -> str:
        if answered_by in MACHINE_ANSWERS:
            return "left message"
        if answered_by == "fax":
            return "hung up"
        return "conversation"  # human, unknown, or no callback at all


# --- the bot decides (`machine_detection: "bot"`) ---------------------------------------

# Recorded as the call's `amd_verdict` when the bot decided, not Twilio: what it heard, and
# that it was the bot (campaigns read any verdict starting "machine" as voicemail).
BOT_MACHINE_VERDICT = "machine_bot"
BOT_HUMAN_VERDICT = "human_bot"
# After a greeting's last word, the silence that says the recording has started (a beep is
# not speech: the VAD ignores it and the wait runs through it). Pipecat's default.
MESSAGE_AFTER_SILENCE_S = 2.0


def bot_listens_for_voicemail(parameters: Mapping[str, str]) -> bool:
    """Whether a call asks the bot itself to tell a person from a voicemail greeting."""
    return (
        parameters.get(AMD_PARAMETER) == AMD_BY_BOT and parameters.get("call_type") == "outbound"
    )


class GreetingCheck:
    """One dial-out's `machine_detection: "bot"`: Pipecat's `VoicemailDetector` listens
    to what the callee says first and asks `classifier` (the LLM, or keywords offline:
    phonebot.ai.offline.greetings) whether it is a person or a voicemail greeting, while
    its gate holds back whatever the bot would say (its opening never plays over a
    greeting). A person: the held-back opening plays and the call goes on; a callee who
    says nothing for `silent_after_s` is taken for a person waiting for us. A voicemail:
    once the greeting has been followed by MESSAGE_AFTER_SILENCE_S of silence from the
    verdict on (a beep is not speech), the agent's voicemail message is left once and the
    bot hangs up (end reason `voicemail`). Screening assistants ask for a reply, so they
    are a conversation: the agent answers them with who it is and why
    (phonebot.call.phone_call.system_prompt).

    `detector` goes after the STT, `gate` after the TTS (None: not asked for).
    """

    def __init__(
        self,
        call_sid: str,
        parameters: Mapping[str, str],
        classifier_factory: Callable[[], BaseClassifier],
        silent_after_s: float,
    ):
        self.call_sid = call_sid
        self.requested = bot_listens_for_voicemail(parameters)
        self.detector: VoicemailDetector | None = None
        self.gate: FrameProcessor | None = None
        self.verdict: str | None = None
        self._silent_after_s = silent_after_s
        self._callee_spoke = False
        self._control: CallControl | None = None
        self._agent: Agent | None = None
        self._records: CallLog | None = None
        self._tasks = CallTasks()  # the silence wait, and a message being left
        if self.requested:
            self.detector = VoicemailDetector(
                classifier=classifier_factory(),
                voicemail_response_delay=MESSAGE_AFTER_SILENCE_S,
            )
            self.gate = self.detector.gate()
            self.detector.add_event_handler("on_conversation_detected", self.on_person)
            self.detector.add_event_handler("on_voicemail_detected", self.on_voicemail)

    def bind(self, control: CallControl, agent: Agent, records: CallLog) -> None:
        self._control, self._agent, self._records = control, agent, records

    def start(self) -> None:
        """The call is up: a callee still silent after `silent_after_s` is a person."""
        if self.detector is not None:
            self._tasks.spawn(self._silent_callee(self.detector))

    def stop(self) -> None:
        """The call is over: stop a message still being left (the callee hung up)."""
        self._tasks.cancel_all()

    async def on_person(self, processor: FrameProcessor) -> None:
        self._decided(BOT_HUMAN_VERDICT)

    async def on_voicemail(self, processor: FrameProcessor) -> None:
        """The greeting is over: leave the message in a task of our own (cancelled with the
        call; Pipecat waits for its handler's task when the pipeline is torn down)."""
        self._decided(BOT_MACHINE_VERDICT)
        self._tasks.spawn(self._leave_message(processor))

    async def _leave_message(self, processor: FrameProcessor) -> None:
        """Through the detector: it holds back everything from before it now."""
        if self._control is None or self._agent is None:
            return

        async def send(frame: Frame) -> None:
            await processor.push_frame(frame)

        await self._control.end_call(self._agent.voicemail, VOICEMAIL_END_REASON, send=send)

    def callee_spoke(self) -> None:
        """The callee started talking (a turn began): not a silent callee, whatever the
        transcript has so far (a greeting is transcribed only once it pauses)."""
        self._callee_spoke = True

    async def _silent_callee(self, detector: VoicemailDetector) -> None:
        await asyncio.sleep(self._silent_after_s)
        if not self._callee_spoke:
            await assume_conversation(detector)

    def _decided(self, verdict: str) -> None:
        if self.verdict is not None:
            return
        self.verdict = verdict
        logger.info(f"Call {self.call_sid} answered by {verdict} (the bot listened)")
        if self._records is not None:
            self._records.update(amd_verdict=verdict)
