"""How a call ends: the bot's `end_call`, re-prompts on silence, and the limits.

Every way the bot ends a call goes through `CallControl.end_call`: speak a closing line,
wait until Twilio has actually *played* it (a Media Streams `mark` sent after the audio
comes back only then), and end the pipeline, whose `EndFrame` makes the serializer
complete the call through the REST API. Pipecat's websocket output sends audio at up to
twice real time, so "sent" is not "heard": hanging up at "sent" would cut the goodbye.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallResultProperties,
    InputDTMFFrame,
    InputTransportMessageFrame,
    OutputTransportMessageFrame,
    StartFrame,
    TTSSpeakFrame,
    UserSpeakingFrame,
    UserStartedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams

from phonebot.caller_id import E164, presented_caller_id
from phonebot.config import Settings, mask
from phonebot.personas import Persona, outcome_problems
from phonebot.records.call_log import CallLog
from phonebot.session import CallSession, TwilioMarkSerializer
from phonebot.transfer import dial_twiml
from phonebot.twilio_api import TwilioUnavailable, update_call_twiml

END_CALL_TOOL = FunctionSchema(
    name="end_call",
    description=(
        "Hang up. Use it when the caller says goodbye or the conversation is over. Put your "
        "short goodbye in `goodbye`: it is spoken before the line is closed."
    ),
    properties={"goodbye": {"type": "string", "description": "The last thing to say."}},
    required=["goodbye"],
)
TRANSFER_TOOL = FunctionSchema(
    name="transfer_call",
    description=(
        "Connect the caller to a person on our team, when they ask for a human or you "
        "cannot help. The hand-off line is spoken for you; say nothing else."
    ),
    properties={},
    required=[],
)
OPT_OUT_TOOL = FunctionSchema(
    name="opt_out",
    description=(
        "The person asks not to be called again (stop calling me, remove me from your "
        "list, do not call). Their number goes on the do-not-call list and the call ends "
        "with a confirmation spoken for you; say nothing else."
    ),
    properties={},
    required=[],
)
RECORD_OUTCOME = "record_outcome"
PLAYOUT_MARK = "phonebot-playout"
Speak = Callable[[str], Awaitable[None]]
PLAYOUT_SLACK_S = 5.0
SETTLE_S = 0.5


class EndReason:
    """Why a call ended, as logged in the call's end event."""

    CALLER_HUNG_UP = "caller hung up"
    BOT_ENDED = "bot ended"
    SILENCE = "caller silent"
    TRANSFER = "transferred"
    OPTED_OUT = "opted out"
    VOICEMAIL = "voicemail"
    LIMIT = "duration limit"
    IDLE = "idle pipeline"
    SHUTDOWN = "server shutdown"
    PROVIDER_FAILURE = "provider failure"
    ERROR = "error"


# What counts as "someone is talking" for the idle watchdog: the output transport's
# BotSpeakingFrame (every 200 ms while the bot's audio goes out) and the user aggregator's
# UserSpeakingFrame (every 200 ms while VAD hears the caller), plus their starts and key
# presses. Pipecat's own idle timeout watches the same speaking frames.
ACTIVITY_FRAMES = (
    BotStartedSpeakingFrame,
    BotSpeakingFrame,
    UserStartedSpeakingFrame,
    UserSpeakingFrame,
    InputDTMFFrame,
)
OnIdle = Callable[[], Awaitable[None]]


class PlayoutTracker(FrameProcessor):
    """Tells when the bot stops speaking and when Twilio has played what we sent.

    Sits right after `transport.input()`: it sees Twilio's `mark` echoes going downstream
    (our serializer turns them into `InputTransportMessageFrame`s) and the output
    transport's bot-speaking frames coming upstream.

    It is also the call's idle watchdog: with `idle_timeout_s`, when neither side has
    spoken (nor a key been pressed) for that long, `on_idle` runs once. This replaces
    Pipecat's `idle_timeout_secs`, whose observer makes the worker copy every push of
    every frame in the pipeline into a queue for it (with the turn-tracking observer,
    ~14% of the event loop's time at 10 calls, py-spy); here it is one time stamp per
    speaking frame and one timer task per call that wakes once per timeout period.
    """

    def __init__(
        self, idle_timeout_s: float | None = None, on_idle: OnIdle | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self._bot_speaking = False
        self._bot_quiet = asyncio.Event()
        self._bot_quiet.set()
        self._marks: dict[str, asyncio.Event] = {}
        self._idle_timeout_s = idle_timeout_s
        self._on_idle = on_idle
        self._last_activity = time.monotonic()
        self._watchdog: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, ACTIVITY_FRAMES):
            self._last_activity = time.monotonic()
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
            self._start_watchdog()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop_watchdog()
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        await self._stop_watchdog()

    def _start_watchdog(self) -> None:
        if self._idle_timeout_s and self._on_idle and self._watchdog is None:
            self._last_activity = time.monotonic()
            self._watchdog = self.create_task(self._watch_idle(self._idle_timeout_s, self._on_idle))

    async def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            task, self._watchdog = self._watchdog, None
            await self.cancel_task(task)

    async def _watch_idle(self, timeout_s: float, on_idle: OnIdle) -> None:
        """Sleep until the last activity is `timeout_s` old; activity meanwhile moves it on."""
        while (quiet_s := time.monotonic() - self._last_activity) < timeout_s:
            await asyncio.sleep(timeout_s - quiet_s)
        self._watchdog = None  # done: the CancelFrame `on_idle` causes must not cancel us
        await on_idle()

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


def record_outcome_tool(persona: Persona) -> FunctionSchema | None:
    """`record_outcome` with one property per outcome field of the persona (allowed values
    as an enum), or None when the persona records no outcomes."""
    if not persona.outcome_fields:
        return None
    properties = {}
    for spec in persona.outcome_fields:
        prop: dict = {"type": "string", "description": spec.description}
        if spec.values:
            prop["enum"] = list(spec.values)
        properties[spec.name] = prop
    return FunctionSchema(
        name=RECORD_OUTCOME,
        description=(
            "Record what you found out on this call as soon as the person tells you, "
            "then carry on the conversation. Give only the fields you know."
        ),
        properties=properties,
        required=[],
    )


def other_party(call: CallSession) -> str | None:
    """The E.164 number at the other end: the callee of a dial-out, the caller of a dial-in
    (None when withheld, or a SIP/client address: nothing to put on a do-not-call list)."""
    key = "called_number" if call.direction == "outbound" else "caller_id"
    number = presented_caller_id(call.parameters.get(key))
    return number if re.fullmatch(E164, number) else None


def _is_mark(message) -> bool:
    return isinstance(message, dict) and message.get("event") == "mark"


def last_question(context: LLMContext) -> str | None:
    """The last question the bot asked, to repeat it when the caller goes quiet."""
    for message in reversed(context.get_messages()):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        questions = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.endswith("?")]
        if questions:
            return questions[-1]
    return None


class CallControl:
    """One call's ending, re-prompts and limits."""

    def __init__(
        self,
        worker: PipelineWorker,
        context: LLMContext,
        persona: Persona,
        settings: Settings,
        playout: PlayoutTracker,
        call: CallSession,
        serializer: TwilioMarkSerializer | None = None,
        records: CallLog | None = None,
    ):
        self._worker = worker
        self._context = context
        self._persona = persona
        self._settings = settings
        self._playout = playout
        self._call = call
        self._serializer = serializer
        # Function calls, re-prompts and the transfer go on the call's record.
        self._records = records or CallLog(None, call.call_sid)
        self._unanswered_reprompts = 0
        self._ending = False
        self._tasks: set[asyncio.Task] = set()
        self.started_at = time.monotonic()
        self.end_reason: str | None = None

    # --- ending -------------------------------------------------------------------

    def note_end(self, reason: str) -> None:
        """Record why the call ended, keeping the first reason given."""
        self.end_reason = self.end_reason or reason

    async def end_call(
        self,
        closing_line: str,
        reason: str,
        playout_timeout_s: float | None = None,
        speak: Speak | None = None,
    ) -> None:
        """Say `closing_line`, wait until Twilio has played it, then end the call.

        `playout_timeout_s` caps the wait for the playback mark (server shutdown can't
        wait as long as a normal ending would). `speak` replaces the TTS when it is the TTS
        that failed (phonebot.provider_faults).
        """
        if self._ending:
            return
        self._ending = True
        self.note_end(reason)
        logger.info(f"Ending call ({reason}): {closing_line!r}")
        await self._say_and_wait(closing_line, playout_timeout_s, speak)
        await self._worker.queue_frame(EndFrame(reason=reason))

    async def end_for_shutdown(self, phrase: str, playout_timeout_s: float) -> None:
        """The server is going away: say `phrase` and hang up, the usual way but bounded."""
        await self.end_call(phrase, EndReason.SHUTDOWN, playout_timeout_s)

    async def _say_and_wait(
        self, line: str, timeout_s: float | None = None, speak: Speak | None = None
    ) -> None:
        if speak:
            await speak(line)
        else:
            await self._worker.queue_frames([TTSSpeakFrame(line)])
        await self._wait_played(line, timeout_s)

    async def _wait_played(self, text: str, timeout_s: float | None = None) -> None:
        # Whatever is queued ahead of the closing line plays first; bound the wait by the
        # call's own limit on one utterance (~15 characters a second) plus slack.
        budget = 2 * len(text) / 15 + 2 * PLAYOUT_SLACK_S
        budget = budget if timeout_s is None else min(budget, timeout_s)
        deadline = time.monotonic() + budget
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wait_bot_started(), timeout=PLAYOUT_SLACK_S)
        await self._playout.wait_bot_done(SETTLE_S, max(0.1, deadline - time.monotonic()))
        echoed = self._playout.expect_mark(PLAYOUT_MARK)
        mark = {"event": "mark", "streamSid": self._call.stream_sid, "mark": {"name": PLAYOUT_MARK}}
        # Not urgent: it must queue behind any audio the output transport still holds.
        await self._worker.queue_frame(OutputTransportMessageFrame(message=mark))
        try:
            await asyncio.wait_for(echoed.wait(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            logger.warning("Twilio did not confirm playback of the closing line; ending anyway")

    async def _wait_bot_started(self) -> None:
        while not self._playout.bot_speaking:
            await asyncio.sleep(0.02)

    async def end_call_tool(self, params: FunctionCallParams) -> None:
        """The `end_call` function, for the LLM and the offline responder alike."""
        goodbye = str(params.arguments.get("goodbye") or self._persona.goodbye)
        result = {"status": "ending call"}
        self._records.function_call("end_call", params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        self._spawn(self.end_call(goodbye, EndReason.BOT_ENDED))

    # --- outcomes and opt-out --------------------------------------------------------

    async def record_outcome_tool(self, params: FunctionCallParams) -> None:
        """The `record_outcome` function: check the fields against the persona's, store them
        on the call's record; the conversation goes on (the LLM answers the caller)."""
        fields = dict(params.arguments)
        problems = outcome_problems(self._persona, fields)
        if problems:
            result: dict = {"error": "; ".join(problems)}
        else:
            self._records.outcome(fields)
            result = {"status": "recorded", "fields": fields}
        self._records.function_call(RECORD_OUTCOME, params.arguments, result)
        await params.result_callback(result)

    async def opt_out_tool(self, params: FunctionCallParams) -> None:
        """The `opt_out` function: the number goes on the do-not-call list, the bot confirms
        and hangs up; the record's end reason is "opted out"."""
        number = other_party(self._call)
        self._records.opt_out(number)
        result = {"status": "number added to the do-not-call list; ending call"}
        if number is None:
            result = {"status": "no number known for this call; ending call"}
            logger.warning(f"Call {self._call.call_sid}: opt-out with no number to list")
        self._records.function_call("opt_out", params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        self._spawn(self.end_call(self._persona.opt_out_confirmation, EndReason.OPTED_OUT))

    # --- transfer -----------------------------------------------------------------

    async def transfer_call_tool(self, params: FunctionCallParams) -> None:
        """The `transfer_call` function: hand the caller to a person, if we have one."""
        target = self._settings.transfer_target
        if target is None or self._serializer is None or self._settings.twilio_credentials is None:
            refused = {"error": "no one to transfer to; keep helping"}
            self._records.function_call("transfer_call", params.arguments, refused)
            await params.result_callback(refused)
            return
        result = {"status": "transferring"}
        self._records.function_call("transfer_call", params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        self._spawn(self.transfer(target))

    async def transfer(self, target: str) -> None:
        """Say the hand-off line, put `<Dial>` on the call, and leave the caller connected.

        A failed transfer is apologised for and the conversation goes on.
        """
        if self._ending or self._serializer is None:
            return
        self._ending = True
        await self._say_and_wait(self._settings.transfer_phrase)
        self._serializer.keep_call_on_end()
        # Twilio stops our stream as soon as it starts dialing, maybe before the REST
        # call returns: the reason must be in place by then.
        self.note_end(EndReason.TRANSFER)
        try:
            await update_call_twiml(self._settings, self._call.call_sid, dial_twiml(target))
        except TwilioUnavailable as error:
            logger.warning(f"Transfer of {self._call.call_sid} failed: {error.code} {error}")
            failed = f"failed (Twilio {error.code})" if error.code else "failed"
            self._records.update(transfer_target=target, transfer_result=failed)
            self._serializer.keep_call_on_end(False)
            self._ending = False
            self.end_reason = None
            await self._worker.queue_frames([TTSSpeakFrame(self._settings.transfer_failed_phrase)])
            return
        logger.info(f"Call {self._call.call_sid} transferred to {mask(target)}")
        self._records.update(transfer_target=target, transfer_result="transferred")
        await self._worker.queue_frame(EndFrame(reason=EndReason.TRANSFER))

    # --- silence ------------------------------------------------------------------

    def caller_spoke(self) -> None:
        self._unanswered_reprompts = 0

    async def on_caller_silent(self) -> None:
        """Re-prompt, and after MAX_REPROMPTS unanswered re-prompts say goodbye."""
        if self._ending:
            return
        if self._unanswered_reprompts >= self._settings.max_reprompts:
            await self.end_call(self._persona.goodbye, EndReason.SILENCE)
            return
        self._unanswered_reprompts += 1
        prompt = last_question(self._context) or self._settings.reprompt_phrase
        logger.info(f"Caller silent: re-prompt {self._unanswered_reprompts}: {prompt!r}")
        self._records.reprompt(prompt)
        await self._worker.queue_frames([TTSSpeakFrame(prompt)])

    # --- limits -------------------------------------------------------------------

    def start_duration_limit(self) -> None:
        self._spawn(self._duration_limit())

    async def _duration_limit(self) -> None:
        await asyncio.sleep(self._settings.max_call_duration_s)
        await self.end_call(self._settings.duration_limit_phrase, EndReason.LIMIT)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        """Cancel timers and pending endings when the pipeline is gone."""
        for task in list(self._tasks):
            task.cancel()

    def duration_s(self) -> float:
        return time.monotonic() - self.started_at
