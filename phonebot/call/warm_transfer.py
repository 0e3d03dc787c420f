"""Warm transfer: the caller waits with the bot while a person is called, briefed, and asked.

Two calls take part, maybe on two processes (or a Pipecat Cloud session and the server):

- the caller's (`WarmTransfer`): the bot mutes the caller, says it will look for someone,
  plays hold music into the stream, and places the person's call through its own
  `/outbound` webhook with the caller's CallSid and a summary (`TRANSFER_OF_PARAMETER`,
  `TRANSFER_SUMMARY_PARAMETER`) and a status callback naming the caller. Then it waits
  for the transfer's verdict in the shared state (`TransferVerdicts`, keyed by the person's
  CallSid: a caller may be transferred more than once).
- the person's (`Briefing`): a dial-out whose opening is the briefing (who is waiting and
  why) and "press 1 to take the call, 2 to decline". Key 1 moves this call into the
  conference room to wait, then sets the verdict "accepted" (so the caller is only ever
  sent to a room the person is in); key 2, a hang-up, or no key within
  TRANSFER_DECISION_TIMEOUT_S set "declined" / "hung up" / "no decision". Twilio's final
  status callback for it sets "no-answer", "busy", "failed" or "canceled" when the phone
  was never answered, and "hung up" for an answered call that ended without a verdict
  (our webhook turned it away, say) (phonebot.web.callbacks).

The caller's bot, given "accepted", says so and moves the caller into the room, whose
conference then starts (phonebot.twilio.transfer.join_twiml); given anything else (or
nothing within the ring and decision times), it stops the music, unmutes the caller, says
no one could take the call and offers to take a message: the same pipeline and LLM context
go on, so the bot still knows the whole call. The first verdict wins (SET NX). A caller's
call that ends meanwhile (a hang-up, the duration limit, a shutdown) calls the transfer off
(`abandon`): its verdict is set first, then the person's call is ended, ringing, being
briefed or waiting in the room alike. The caller's record gets the target, the outcome and
its timings (`CallLog.transfer`).

Holding the caller on our own stream rather than in a `<Conference waitUrl>` from the start
keeps the bot, its context and the call's record with the caller the whole time, and
spares a second media stream (and stream token) for a caller coming back from a decline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from loguru import logger
from pipecat.frames.frames import EndFrame, Frame, InputDTMFFrame, OutputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from phonebot.agents.agent import Agent
from phonebot.agents.analysis import message_text
from phonebot.agents.selection import AGENT_PARAMETER
from phonebot.audio import TWILIO_SAMPLE_RATE, hold_music
from phonebot.call.tasks import CallTasks
from phonebot.config import Settings, mask
from phonebot.records.call_log import CallLog
from phonebot.state.base import StateUnavailable
from phonebot.state.verdicts import TransferVerdict
from phonebot.twilio.dialout import STATUS_CALLBACK_PATH
from phonebot.twilio.keypad import pressed_digits
from phonebot.twilio.rest import (
    CreatedCall,
    TwilioAccount,
    TwilioUnavailable,
    create_call,
    hang_up_call,
)
from phonebot.twilio.stream import CallSession
from phonebot.twilio.transfer import (
    SUMMARY_MAX_CHARS,
    TRANSFER_OF_PARAMETER,
    TRANSFER_SUMMARY_PARAMETER,
    conference_room,
    join_twiml,
)

if TYPE_CHECKING:
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext

    from phonebot.call.control import CallControl
    from phonebot.state import TransferVerdicts

# The verdicts (`TransferVerdict.outcome`); Twilio's busy / no-answer / failed / canceled
# come as they are from the status callback.
ACCEPTED = "accepted"
DECLINED = "declined"
NO_DECISION = "no decision"
PERSON_HUNG_UP = "hung up"
TIMED_OUT = "timed out"  # no verdict at all within the ring and decision times
CALLER_LEFT = "caller hung up"
CALL_ENDING = "call ended"  # the caller's call ended otherwise: duration limit, shutdown
FAILED = "failed"
# Beyond the ring and decision times: Twilio's callbacks and the briefing itself.
VERDICT_SLACK_S = 20.0
HOLD_CHUNK_S = 0.5
PERSON_KEYS = {"1": ACCEPTED, "2": DECLINED}
PERSON_LEFT_LINE = "I'm sorry, the caller is no longer on the line. Goodbye."
DECLINED_LINE = "No problem, I'll take a message for you. Goodbye."
NO_DECISION_LINE = "I'll take a message for you instead. Goodbye."
CONNECTING_PERSON_LINE = "Connecting you now."
JOIN_FAILED_LINE = "Sorry, I couldn't connect you. I'll take a message instead. Goodbye."
JOINED = "joined the caller"  # the person's call's end reason once connected


def transfer_summary(summary: str | None, context: LLMContext) -> str:
    """What the person is told: the LLM's summary, else what the caller said last, keys
    aside (the offline responder writes none). Cut to SUMMARY_MAX_CHARS."""
    text = " ".join((summary or "").split())
    if not text:
        said = [
            message_text(m.get("content"))
            for m in context.get_messages()
            if isinstance(m, dict) and m.get("role") == "user"
        ]
        said = [line for line in said if line.strip() and pressed_digits(line) is None]
        text = f'The caller said: "{said[-1].strip()}"' if said else "A caller would like to talk."
    return text[:SUMMARY_MAX_CHARS]


class HoldMusic:
    """Hold music into the call's stream, paced in real time (a few chunks ahead at most),
    so stopping it leaves at most HOLD_CHUNK_S more to play."""

    def __init__(self, send: Callable[[Frame], Awaitable[None]]):
        self._send = send
        self._loop = hold_music(TWILIO_SAMPLE_RATE)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._play())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _play(self) -> None:
        chunk = round(HOLD_CHUNK_S * TWILIO_SAMPLE_RATE) * 2
        position = 0
        while True:
            audio = (self._loop[position:] + self._loop)[:chunk]
            position = (position + chunk) % len(self._loop)
            await self._send(OutputAudioRawFrame(audio, TWILIO_SAMPLE_RATE, 1))
            await asyncio.sleep(HOLD_CHUNK_S)


class WarmTransfer:
    """The caller's side of a warm transfer (see the module docstring).

    `ask` runs one transfer (a call may make several, one at a time); `abandon` is how the
    caller's call ending (a hang-up, the duration limit, a shutdown) stops one under way.
    """

    def __init__(
        self,
        settings: Settings,
        session: CallSession,
        agent: Agent,
        transfers: TransferVerdicts,
        base_url: str,
        records: CallLog,
        mute: Callable[[bool], None],
    ):
        self._mute = mute  # the caller's words are not a turn while they wait
        self._settings = settings
        self._session = session
        self._agent = agent
        self._transfers = transfers
        self._base_url = base_url.rstrip("/")
        self._records = records
        self.holding = False
        self.connected = False  # the caller is going (or went) into the person's room
        self.person_call_sid: str | None = None  # the latest transfer's person
        self._creating: asyncio.Future | None = None  # the person's calls.create
        self._verdict: TransferVerdict | None = None  # the latest transfer's, once settled
        self._target = ""
        self._started = 0.0

    @property
    def verdict_wait_s(self) -> float:
        s = self._settings
        return s.transfer_ring_timeout_s + s.transfer_decision_timeout_s + VERDICT_SLACK_S

    async def ask(
        self, target: str, summary: str, music: HoldMusic, announce: Callable[[], Awaitable[None]]
    ) -> TransferVerdict:
        """Mute the caller, `announce` the hold, call the person and wait for the verdict
        with `music` playing; the caller is unmuted whatever happens."""
        self._target, self._started = target, time.time()
        self.person_call_sid, self._creating, self._verdict = None, None, None
        self.connected = False
        self.holding = True
        self._mute(True)
        try:
            await announce()
            music.start()
            verdict = await self._call_and_wait(summary)
        finally:
            await music.stop()
            self._mute(False)
            self.holding = False
        return self._settle(verdict)

    async def _call_and_wait(self, summary: str) -> TransferVerdict:
        caller_sid = self._session.call_sid
        # Shielded: a caller hanging up meanwhile cancels this task, and `abandon` must still
        # learn the person's CallSid to stop their phone ringing.
        self._creating = asyncio.ensure_future(self._create_person_call(summary))
        try:
            person = self.person_call_sid = (await asyncio.shield(self._creating)).sid
        except TwilioUnavailable as error:
            target = mask(self._target)
            logger.warning(f"Call {caller_sid}: warm transfer can't call {target}: {error}")
            return TransferVerdict(FAILED, at=time.time())
        logger.info(f"Call {caller_sid}: warm transfer calling {mask(self._target)} ({person})")
        try:
            return await self._verdict_for(person)
        except StateUnavailable as error:  # the verdict can't reach us: don't keep them on
            logger.warning(f"Call {caller_sid}: warm transfer verdict unreadable ({error})")
            await self._hang_up(person)
            return TransferVerdict(FAILED, person, at=time.time())

    async def _create_person_call(self, summary: str) -> CreatedCall:
        query = urlencode({TRANSFER_OF_PARAMETER: self._session.call_sid})
        return await create_call(
            self._settings,
            to=self._target,
            from_=self._from_number(),
            twiml_url=f"{self._base_url}/outbound?{urlencode(self._person_parameters(summary))}",
            status_callback_url=f"{self._base_url}{STATUS_CALLBACK_PATH}?{query}",
            ring_timeout_s=self._settings.transfer_ring_timeout_s,
        )

    async def _verdict_for(self, person: str) -> TransferVerdict:
        """The person's call's verdict (keyed by it: a caller may be transferred more than
        once); none in time is "timed out", and their phone stops ringing."""
        text = await self._transfers.wait(person, self.verdict_wait_s)
        if text is None and await self._transfers.set(person, self._gave_up(TIMED_OUT, person)):
            await self._hang_up(person)
            return TransferVerdict(TIMED_OUT, person, at=time.time())
        text = text or await self._transfers.get(person) or self._gave_up(TIMED_OUT, person)
        return TransferVerdict.decode(text)

    def _person_parameters(self, summary: str) -> dict[str, str]:
        agent = self._session.parameters.get(AGENT_PARAMETER) or self._agent.name
        return {
            AGENT_PARAMETER: agent,
            TRANSFER_OF_PARAMETER: self._session.call_sid,
            TRANSFER_SUMMARY_PARAMETER: summary,
        }

    def _from_number(self) -> str:
        """Our number, as the person's phone shows it: TWILIO_PHONE_NUMBER, else the number
        of ours this call is on (the one dialled on a dial-in, the one shown on a dial-out)."""
        ours = "caller_id" if self._session.direction == "outbound" else "called_number"
        return self._settings.twilio_phone_number or self._session.parameters.get(ours) or ""

    @staticmethod
    def _gave_up(outcome: str, person: str) -> str:
        return TransferVerdict(outcome, person, at=time.time()).encode()

    async def _hang_up(self, person: str) -> None:
        """End the person's call (ringing, briefed or waiting in the room): it is off."""
        await hang_up_call(TwilioAccount.from_settings(self._settings), person)

    def _settle(self, verdict: TransferVerdict) -> TransferVerdict:
        """The transfer's outcome, once: kept, and written on the caller's record."""
        if self._verdict is None:
            self._verdict = verdict
            self._record(verdict)
        return self._verdict

    def enter_room_twiml(self) -> str:
        """The TwiML that moves the caller into the room the person waits in (the caller's
        entering starts the conference). From now on the caller counts as gone into the
        room: Twilio may stop our stream before the update returns."""
        self.connected = True
        return join_twiml(conference_room(self._session.call_sid), starts=True)

    async def not_joined(self, error: TwilioUnavailable) -> None:
        """Twilio refused to move the caller: the person's call is ended too (nobody would
        come into their room)."""
        logger.warning(f"Call {self._session.call_sid}: could not join the person: {error}")
        self.connected = False
        if self.person_call_sid is not None:
            await self._hang_up(self.person_call_sid)

    async def abandon(self, outcome: str) -> None:
        """The caller's call is ending (`outcome`: the caller hung up, or the call is being
        ended). Unless the caller went into the person's room, a person still ringing or
        being briefed is told (the verdict, first one wins) and hung up, and so is one
        waiting in the room for a caller who will not come."""
        person = self.person_call_sid or await self._created_sid()
        if person is None or self.connected:
            return
        if self._verdict is None:
            if await self._transfers.set(person, self._gave_up(outcome, person)):
                self._settle(TransferVerdict(outcome, person, at=time.time()))
                await self._hang_up(person)
                return
            self._settle(TransferVerdict.decode(await self._transfers.get(person) or outcome))
        if self._verdict is not None and self._verdict.outcome == ACCEPTED:
            await self._hang_up(person)

    async def _created_sid(self) -> str | None:
        """The CallSid of a person's call whose `calls.create` was under way, once it is
        answered (None if there was none, or it failed)."""
        if self._creating is None:
            return None
        try:
            self.person_call_sid = (await self._creating).sid
        except Exception:  # noqa: BLE001 (no call was placed: nothing to stop)
            return None
        return self.person_call_sid

    def _record(self, verdict: TransferVerdict) -> None:
        def after(moment: float | None) -> float | None:
            return round(moment - self._started, 3) if moment else None

        self._records.transfer(
            self._target,
            verdict.outcome,
            {
                "mode": "warm",
                "person_call_sid": verdict.person_call_sid or self.person_call_sid,
                "answered_after_s": after(verdict.answered_at),
                "decided_after_s": after(verdict.at),
            },
        )


class BriefingKeys(FrameProcessor):
    """On the person's call: keys 1 and 2 go to the `Briefing`, not into the conversation."""

    def __init__(self, on_key: Callable[[str], None], **kwargs):
        super().__init__(**kwargs)
        self._on_key = on_key

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame) and frame.button.value in PERSON_KEYS:
            self._on_key(frame.button.value)
            return
        await self.push_frame(frame, direction)


class Briefing:
    """The person's side of a warm transfer (see the module docstring); inactive (no
    `keys`) on every other call."""

    def __init__(
        self,
        parameters: dict[str, str],
        settings: Settings,
        transfers: TransferVerdicts | None,
    ):
        self.caller_sid = parameters.get(TRANSFER_OF_PARAMETER) or None
        self.summary = parameters.get(TRANSFER_SUMMARY_PARAMETER, "")
        self._settings = settings
        self._transfers = transfers
        self.keys = BriefingKeys(self._key_pressed) if self.caller_sid else None
        self._tasks = CallTasks()
        self._decided = False
        self._answered_at = time.time()
        self._call_sid = ""
        self._worker: PipelineWorker | None = None
        self._control: CallControl | None = None

    @property
    def active(self) -> bool:
        return self.keys is not None

    def opening(self, agent: Agent) -> str:
        return (
            f"Hi, this is the assistant on the {agent.name} line. I have a caller on hold for "
            f"you. {self.summary} Press 1 to take the call, or 2 to decline."
        )

    def instructions(self, agent: Agent) -> str:
        return (
            f"You are the assistant on the {agent.name} line. You called a colleague to hand "
            "over a caller who is "
            f"waiting on hold. What the caller needs: {self.summary} Answer the colleague's "
            "questions about it in a sentence, and remind them to press 1 to take the call "
            "or 2 to decline. You have already said: " + self.opening(agent)
        )

    def bind(self, call_sid: str, worker: PipelineWorker, control: CallControl) -> None:
        self._call_sid = call_sid
        self._worker = worker
        self._control = control

    def start(self) -> None:
        """The person picked up: the decision time starts."""
        if self.active:
            self._answered_at = time.time()
            self._tasks.spawn(self._decision_timeout())

    def stop(self) -> None:
        self._tasks.cancel_all()

    def _key_pressed(self, key: str) -> None:
        if not self._decided:
            self._decided = True
            self._tasks.spawn(self._decide(PERSON_KEYS[key]))

    async def _decision_timeout(self) -> None:
        await asyncio.sleep(self._settings.transfer_decision_timeout_s)
        if not self._decided:
            self._decided = True
            await self._decide(NO_DECISION)

    async def _decide(self, outcome: str) -> None:
        assert self._control is not None, "bind() first"
        if outcome == ACCEPTED:
            await self._accept(self._control)
            return
        told = await self._tell_caller(outcome)
        line = DECLINED_LINE if outcome == DECLINED else NO_DECISION_LINE
        await self._control.end_call(line if told else PERSON_LEFT_LINE, f"transfer {outcome}")

    async def _tell_caller(self, outcome: str) -> bool:
        """Set the verdict (keyed by this call); False when it already has one (the caller's
        call gave up first)."""
        if self._transfers is None or self.caller_sid is None:
            return False
        verdict = TransferVerdict(
            outcome, self._call_sid, answered_at=self._answered_at, at=time.time()
        )
        return await self._transfers.set(self._call_sid, verdict.encode())

    async def _accept(self, control: CallControl) -> None:
        """Into the room first, then "accepted": the caller is only sent to a room the
        person is in, and a person in the room whose caller gave up meanwhile is hung up."""
        if self._transfers is None or await self._transfers.get(self._call_sid) is not None:
            await control.end_call(PERSON_LEFT_LINE, "transfer over")
            return
        await control.say(CONNECTING_PERSON_LINE)
        if not await self._join(control):
            await self._tell_caller(FAILED)
            await control.end_call(JOIN_FAILED_LINE, "transfer failed")
            return
        if not await self._tell_caller(ACCEPTED):  # nobody will come into the room
            await hang_up_call(TwilioAccount.from_settings(self._settings), self._call_sid)
        if self._worker is not None:
            await self._worker.queue_frame(EndFrame(reason=JOINED))

    async def _join(self, control: CallControl) -> bool:
        """Into the room to wait for the caller, whose entering starts the conference; this
        call's pipeline ends without hanging up (as a cold transfer's). False if Twilio
        refused (the call goes on, to be ended as usual)."""
        room = conference_room(self.caller_sid or "")
        try:
            await control.hand_over(join_twiml(room, starts=False), JOINED)
        except TwilioUnavailable as error:
            logger.warning(f"Call {self._call_sid}: could not join the caller's room: {error}")
            return False
        return True

    async def call_over(self) -> None:
        """The person's call ended before a key: a hang-up is a decline."""
        if self.active and not self._decided:
            self._decided = True
            with suppress(Exception):
                await self._tell_caller(PERSON_HUNG_UP)
