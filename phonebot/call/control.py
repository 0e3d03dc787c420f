"""How a call ends: the bot's `end_call`, transfer and opt-out, re-prompts on silence, limits.

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
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    FunctionCallResultProperties,
    OutputTransportMessageFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.llm_service import FunctionCallParams

from phonebot.agents.agent import Agent, outcome_problems
from phonebot.call.playout import PlayoutTracker
from phonebot.call.tasks import CallTasks
from phonebot.call.tools import END_CALL, OPT_OUT, RECORD_OUTCOME, TRANSFER_CALL
from phonebot.call.warm_transfer import (
    ACCEPTED,
    CALL_ENDING,
    CALLER_LEFT,
    HoldMusic,
    WarmTransfer,
    transfer_summary,
)
from phonebot.config import Settings, mask
from phonebot.phone_numbers import E164
from phonebot.records.call_log import CallLog
from phonebot.records.writer import IVR_FAILED_REASON
from phonebot.twilio.caller_id import presented_caller_id
from phonebot.twilio.rest import TwilioUnavailable, update_call_twiml
from phonebot.twilio.stream import CallSession, TwilioMarkSerializer
from phonebot.twilio.transfer import dial_twiml

PLAYOUT_MARK = "phonebot-playout"
Speak = Callable[[str], Awaitable[None]]
# Where a closing line's frames enter the pipeline (default: its start, the worker's queue).
Send = Callable[[Frame], Awaitable[None]]
PLAYOUT_SLACK_S = 5.0
SETTLE_S = 0.5
# After a warm transfer's hold, at most this long for the music's last chunk to play.
HOLD_MUSIC_TAIL_S = 2.0


class EndReason:
    """Why a call ended, as logged in the call's end event."""

    CALLER_HUNG_UP = "caller hung up"
    BOT_ENDED = "bot ended"
    SILENCE = "caller silent"
    TRANSFER = "transferred"
    OPTED_OUT = "opted out"
    VOICEMAIL = "voicemail"
    IVR_FAILED = IVR_FAILED_REASON  # a phone menu that led nowhere (phonebot.call.ivr)
    LIMIT = "duration limit"
    IDLE = "idle pipeline"
    SHUTDOWN = "server shutdown"
    PROVIDER_FAILURE = "provider failure"
    ERROR = "error"


def other_party(call: CallSession) -> str | None:
    """The E.164 number at the other end: the callee of a dial-out, the caller of a dial-in
    (None when withheld, or a SIP/client address: nothing to put on a do-not-call list)."""
    key = "called_number" if call.direction == "outbound" else "caller_id"
    number = presented_caller_id(call.parameters.get(key))
    return number if re.fullmatch(E164, number) else None


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
        agent: Agent,
        settings: Settings,
        playout: PlayoutTracker,
        call: CallSession,
        serializer: TwilioMarkSerializer | None = None,
        records: CallLog | None = None,
        warm: WarmTransfer | None = None,
    ):
        self._worker = worker
        self._context = context
        self._agent = agent
        self._settings = settings
        self._playout = playout
        self._call = call
        self._serializer = serializer
        # Function calls, re-prompts and the transfer go on the call's record.
        self._records = records or CallLog(None, call.call_sid)
        self.warm = warm  # None: no shared state to meet the person's call in, cold only
        self._warm_task: asyncio.Task | None = None
        self._unanswered_reprompts = 0
        self._ending = False
        self._tasks = CallTasks()  # the duration limit, endings and transfers under way
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
        send: Send | None = None,
    ) -> None:
        """Say `closing_line`, wait until Twilio has played it, then end the call.

        `playout_timeout_s` caps the wait for the playback mark (server shutdown can't
        wait as long as a normal ending would). `speak` replaces the TTS when it is the TTS
        that failed (phonebot.call.provider_faults). `send` puts the line and its playback
        mark in the pipeline after a processor that holds everything else back (Pipecat's
        voicemail detector, once it has heard a machine: phonebot.call.voicemail).
        """
        if self._ending:
            return
        self._ending = True
        await self._call_off_hold()
        self.note_end(reason)
        logger.info(f"Ending call ({reason}): {closing_line!r}")
        await self._say_and_wait(closing_line, playout_timeout_s, speak, send)
        await self._worker.queue_frame(EndFrame(reason=reason))

    async def _call_off_hold(self) -> None:
        """A call that ends while the caller holds for a warm transfer (the duration limit,
        a shutdown) calls the transfer off first: the music stops, the person's phone too."""
        task = self._warm_task
        if self.warm is None or task is None or task.done():
            return
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await self.warm.abandon(CALL_ENDING)

    async def hang_up(self, reason: str) -> None:
        """End the call without a word (a machine on the line: a phone menu that leads
        nowhere). The pipeline's `EndFrame` makes the serializer hang up through REST."""
        if self._ending:
            return
        self._ending = True
        self.note_end(reason)
        logger.info(f"Hanging up ({reason})")
        await self._worker.queue_frame(EndFrame(reason=reason))

    async def end_for_shutdown(self, phrase: str, playout_timeout_s: float) -> None:
        """The server is going away: say `phrase` and hang up, the usual way but bounded."""
        await self.end_call(phrase, EndReason.SHUTDOWN, playout_timeout_s)

    async def say(self, line: str) -> None:
        """Say `line` and return once Twilio has played it (the call goes on)."""
        await self._say_and_wait(line)

    async def _say_and_wait(
        self,
        line: str,
        timeout_s: float | None = None,
        speak: Speak | None = None,
        send: Send | None = None,
    ) -> None:
        send = send or self._worker.queue_frame
        if speak:
            await speak(line)
        else:
            await send(TTSSpeakFrame(line))
        await self._wait_played(line, timeout_s, send)

    async def _wait_played(self, text: str, timeout_s: float | None, send: Send) -> None:
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
        await send(OutputTransportMessageFrame(message=mark))
        try:
            await asyncio.wait_for(echoed.wait(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            logger.warning("Twilio did not confirm playback of the closing line; ending anyway")

    async def _wait_bot_started(self) -> None:
        while not self._playout.bot_speaking:
            await asyncio.sleep(0.02)

    async def end_call_tool(self, params: FunctionCallParams) -> None:
        """The `end_call` function, for the LLM and the offline responder alike."""
        goodbye = str(params.arguments.get("goodbye") or self._agent.goodbye)
        result = {"status": "ending call"}
        self._records.function_call(END_CALL, params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        self._tasks.spawn(self.end_call(goodbye, EndReason.BOT_ENDED))

    # --- outcomes and opt-out --------------------------------------------------------

    async def record_outcome_tool(self, params: FunctionCallParams) -> None:
        """The `record_outcome` function: check the fields against the agent's, store them
        on the call's record; the conversation goes on (the LLM answers the caller)."""
        fields = dict(params.arguments)
        problems = outcome_problems(self._agent, fields)
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
        self._records.function_call(OPT_OUT, params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        self._tasks.spawn(self.end_call(self._agent.opt_out_confirmation, EndReason.OPTED_OUT))

    # --- transfer -----------------------------------------------------------------

    async def transfer_call_tool(self, params: FunctionCallParams) -> None:
        """The `transfer_call` function: hand the caller to a person, if we have one; warm
        (briefed first) when TRANSFER_MODE or the call's `warm` argument says so."""
        target = self._settings.transfer_target
        if target is None or self._serializer is None or self._settings.twilio_credentials is None:
            refused = {"error": "no one to transfer to; keep helping"}
            self._records.function_call(TRANSFER_CALL, params.arguments, refused)
            await params.result_callback(refused)
            return
        # The LLM may ask for warm; it can't make cold what TRANSFER_MODE makes warm.
        warm = self._settings.transfer_mode == "warm" or params.arguments.get("warm") is True
        result = {"status": "asking a person to take the call" if warm else "transferring"}
        self._records.function_call(TRANSFER_CALL, params.arguments, result)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=False))
        if warm and self.warm is not None:
            summary = transfer_summary(params.arguments.get("summary"), self._context)
            self._warm_task = self._tasks.spawn(self.warm_transfer(target, summary))
            return
        if warm:
            logger.warning(
                f"Call {self._call.call_sid}: a warm transfer needs the shared state and this "
                "server's address (PUBLIC_URL on Pipecat Cloud); transferring cold"
            )
        self._tasks.spawn(self.transfer(target))

    async def warm_transfer(self, target: str, summary: str) -> None:
        """Hold the caller, ask the person (phonebot.call.warm_transfer); connect them on
        "accepted", else tell the caller and go on (offering to take a message)."""
        warm = self.warm
        if self._ending or self._serializer is None or warm is None or warm.holding:
            return
        phrase = self._settings.warm_transfer_phrase
        verdict = await warm.ask(
            target, summary, HoldMusic(self._worker.queue_frame),
            announce=lambda: self._say_and_wait(phrase),
        )  # fmt: skip
        logger.info(f"Call {self._call.call_sid}: warm transfer {verdict.outcome}")
        if verdict.outcome in (CALLER_LEFT, CALL_ENDING):
            return
        # The music's last chunk plays out first, so the next line's playback is its own.
        await self._playout.wait_bot_done(SETTLE_S, HOLD_MUSIC_TAIL_S)
        if verdict.outcome == ACCEPTED and await self._connect_warm(warm):
            return
        await self._worker.queue_frames([TTSSpeakFrame(self._settings.transfer_declined_phrase)])

    async def _connect_warm(self, warm: WarmTransfer) -> bool:
        """Into the person's room; False (the caller stays with the bot) if Twilio failed."""
        self._ending = True
        await self._say_and_wait(self._settings.transfer_connecting_phrase)
        try:
            await self.hand_over(warm.enter_room_twiml(), EndReason.TRANSFER)
        except TwilioUnavailable as error:
            await warm.not_joined(error)
            self._ending = False
            return False
        await self._worker.queue_frame(EndFrame(reason=EndReason.TRANSFER))
        return True

    async def hand_over(self, twiml: str, reason: str) -> None:
        """Give the live call to other TwiML (a `<Dial>`, a conference room): the pipeline
        will end without the REST hang-up it usually ends with, for `reason`.

        The reason is in place before the update: Twilio stops our stream as soon as the
        new TwiML runs, maybe before the REST call returns. If Twilio refused, all of it is
        undone (the call goes on with the bot) and `TwilioUnavailable` is raised.
        """
        if self._serializer is not None:
            self._serializer.keep_call_on_end()
        self.note_end(reason)
        try:
            await update_call_twiml(self._settings, self._call.call_sid, twiml)
        except TwilioUnavailable:
            if self._serializer is not None:
                self._serializer.keep_call_on_end(False)
            self.end_reason = None
            raise

    async def call_over(self) -> None:
        """The call's pipeline has ended: a warm transfer under way is called off (the
        person's phone stops ringing; one waiting in the room is not left there)."""
        if self.warm is not None:
            hung_up = self.end_reason == EndReason.CALLER_HUNG_UP
            await self.warm.abandon(CALLER_LEFT if hung_up else CALL_ENDING)

    async def transfer(self, target: str) -> None:
        """Say the hand-off line, put `<Dial>` on the call, and leave the caller connected.

        A failed transfer is apologised for and the conversation goes on.
        """
        if self._ending or self._serializer is None:
            return
        self._ending = True
        await self._say_and_wait(self._settings.transfer_phrase)
        try:
            await self.hand_over(dial_twiml(target), EndReason.TRANSFER)
        except TwilioUnavailable as error:
            logger.warning(f"Transfer of {self._call.call_sid} failed: {error.code} {error}")
            failed = f"failed (Twilio {error.code})" if error.code else "failed"
            self._records.update(transfer_target=target, transfer_result=failed)
            self._ending = False
            await self._worker.queue_frames([TTSSpeakFrame(self._settings.transfer_failed_phrase)])
            return
        logger.info(f"Call {self._call.call_sid} transferred to {mask(target)}")
        self._records.update(transfer_target=target, transfer_result="transferred")
        await self._worker.queue_frame(EndFrame(reason=EndReason.TRANSFER))

    # --- silence ------------------------------------------------------------------

    def caller_spoke(self) -> None:
        self._unanswered_reprompts = 0

    async def on_caller_silent(self) -> None:
        """Re-prompt, and after MAX_REPROMPTS unanswered re-prompts say goodbye (never to a
        caller on hold for a warm transfer)."""
        if self._ending or (self.warm is not None and self.warm.holding):
            return
        if self._unanswered_reprompts >= self._settings.max_reprompts:
            await self.end_call(self._agent.goodbye, EndReason.SILENCE)
            return
        self._unanswered_reprompts += 1
        prompt = last_question(self._context) or self._settings.reprompt_phrase
        logger.info(f"Caller silent: re-prompt {self._unanswered_reprompts}: {prompt!r}")
        self._records.reprompt(prompt)
        await self._worker.queue_frames([TTSSpeakFrame(prompt)])

    # --- limits -------------------------------------------------------------------

    def start_duration_limit(self) -> None:
        self._tasks.spawn(self._duration_limit())

    async def _duration_limit(self) -> None:
        await asyncio.sleep(self._settings.max_call_duration_s)
        await self.end_call(self._settings.duration_limit_phrase, EndReason.LIMIT)

    def stop(self) -> None:
        """Cancel timers and pending endings when the pipeline is gone."""
        self._tasks.cancel_all()

    def duration_s(self) -> float:
        return time.monotonic() - self.started_at
