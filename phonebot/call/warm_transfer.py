"""Warm transfer: the caller waits with the bot while a person is called, briefed, and asked.

Two calls take part, maybe on two processes (or a Pipecat Cloud session and the server):

- the caller's (`WarmTransfer`): the bot says it will look for someone, mutes the caller and
  plays hold music into the stream, and places the person's call through its own
  `/outbound` webhook with the caller's CallSid and a summary (`TRANSFER_OF_PARAMETER`,
  `TRANSFER_SUMMARY_PARAMETER`) and a status callback naming the caller. Then it waits
  for the transfer's verdict in the shared state (`TransferVerdicts`, keyed by the person's
  CallSid: a caller may be transferred more than once).
- the person's (`Briefing`): a dial-out whose opening is the briefing (who is waiting and
  why) and "press 1 to take the call, 2 to decline". Key 1 sets the verdict "accepted" and
  moves this call into the conference room; key 2, a hang-up, or no key within
  TRANSFER_DECISION_TIMEOUT_S set "declined" / "hung up" / "no decision". Twilio's status
  callback sets "no-answer", "busy" or "failed" when the phone was never answered
  (phonebot.web.callbacks).

The caller's bot, given "accepted", says so and moves the caller into the room, whose
conference then starts (phonebot.twilio.transfer.join_twiml); given anything else (or
nothing within the ring and decision times), it stops the music, unmutes the caller, says
no one could take the call and offers to take a message: the same pipeline and LLM context
go on, so the bot still knows the whole call. The first verdict wins (SET NX), so a key
pressed after the caller gave up (or hung up) is told the caller is gone. The caller's
record gets the target, the outcome and its timings (`CallLog.transfer`).

Holding the caller on our own stream rather than in a `<Conference waitUrl>` from the start
keeps the bot, its context and the call's record with the caller the whole time, and
spares a second media stream (and stream token) for a caller coming back from a decline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
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
from phonebot.twilio.dialout import STATUS_CALLBACK_PATH
from phonebot.twilio.keypad import pressed_digits
from phonebot.twilio.rest import (
    TwilioAccount,
    TwilioUnavailable,
    create_call,
    hang_up_call,
    update_call_twiml,
)
from phonebot.twilio.stream import CallSession, TwilioMarkSerializer
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
FAILED = "failed"
# Beyond the ring and decision times: Twilio's callbacks and the briefing itself.
VERDICT_SLACK_S = 20.0
HOLD_CHUNK_S = 0.5
PERSON_KEYS = {"1": ACCEPTED, "2": DECLINED}
PERSON_LEFT_LINE = "I'm sorry, the caller is no longer on the line. Goodbye."
DECLINED_LINE = "No problem, I'll take a message for you. Goodbye."
NO_DECISION_LINE = "I'll take a message for you instead. Goodbye."
CONNECTING_PERSON_LINE = "Connecting you now."
JOINED = "joined the caller"  # the person's call's end reason once connected


@dataclass(frozen=True)
class TransferVerdict:
    """How a warm transfer went, as stored in the shared state (JSON)."""

    outcome: str
    person_call_sid: str | None = None
    answered_at: float | None = None  # Unix time the person's stream started
    at: float = 0.0  # Unix time of the verdict

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> TransferVerdict:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError):
            return cls(outcome=text)


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
    """The caller's side of a warm transfer (see the module docstring)."""

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
        self.person_call_sid: str | None = None  # the latest transfer's person
        self.holding = False
        self.connected = False  # the caller went into the person's room
        self._verdict: TransferVerdict | None = None  # the latest transfer's, once known

    @property
    def verdict_wait_s(self) -> float:
        s = self._settings
        return s.transfer_ring_timeout_s + s.transfer_decision_timeout_s + VERDICT_SLACK_S

    async def ask(self, target: str, summary: str, music: HoldMusic) -> TransferVerdict:
        """Call the person and wait for the verdict, the caller hearing `music` meanwhile."""
        started = time.time()
        self.person_call_sid, self._verdict = None, None
        self.holding = True
        self._mute(True)
        music.start()
        try:
            self._verdict = await self._call_and_wait(target, summary)
        finally:
            await music.stop()
            self._mute(False)
            self.holding = False
        self._record(target, self._verdict, started)
        return self._verdict

    async def _call_and_wait(self, target: str, summary: str) -> TransferVerdict:
        caller_sid = self._session.call_sid
        try:
            created = await create_call(
                self._settings,
                to=target,
                from_=self._from_number(),
                twiml_url=f"{self._base_url}/outbound?{urlencode(self._person_parameters(summary))}",
                status_callback_url=(
                    f"{self._base_url}{STATUS_CALLBACK_PATH}?"
                    f"{urlencode({TRANSFER_OF_PARAMETER: caller_sid})}"
                ),
                ring_timeout_s=self._settings.transfer_ring_timeout_s,
            )
        except TwilioUnavailable as error:
            logger.warning(f"Call {caller_sid}: warm transfer can't call {mask(target)}: {error}")
            return TransferVerdict(FAILED, at=time.time())
        person = self.person_call_sid = created.sid
        logger.info(f"Call {caller_sid}: warm transfer calling {mask(target)} ({person})")
        # Keyed by the person's call: a caller may be transferred more than once.
        text = await self._transfers.wait(person, self.verdict_wait_s)
        if text is None and await self._transfers.set(person, self._gave_up(TIMED_OUT)):
            await self._hang_up_person()
            return TransferVerdict(TIMED_OUT, person, at=time.time())
        text = text or await self._transfers.get(person) or self._gave_up(TIMED_OUT)
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
        the caller dialled (on a dial-in, one of ours)."""
        ours = self._settings.twilio_phone_number
        return ours or self._session.parameters.get("called_number") or ""

    def _gave_up(self, outcome: str) -> str:
        return TransferVerdict(outcome, self.person_call_sid, at=time.time()).encode()

    async def hang_up_person(self) -> None:
        """End the person's call (ringing or briefed): the transfer is off."""
        await self._hang_up_person()

    async def _hang_up_person(self) -> None:
        if self.person_call_sid is not None:
            account = TwilioAccount.from_settings(self._settings)
            await hang_up_call(account, self.person_call_sid)

    async def connect(self) -> None:
        """Move the caller into the room the person waits in: the conference starts."""
        room = conference_room(self._session.call_sid)
        await update_call_twiml(
            self._settings, self._session.call_sid, join_twiml(room, starts=True)
        )
        self.connected = True

    async def caller_left(self) -> None:
        """The caller's call ended: unless it went into the person's room, a person still
        ringing, being briefed, or waiting in the room for a caller who is gone is hung up
        (their call is told first, so a key pressed now hears that the caller left)."""
        person = self.person_call_sid
        if person is None or self.connected:
            return
        if self._verdict is None and await self._transfers.set(person, self._gave_up(CALLER_LEFT)):
            await self._hang_up_person()
            return
        verdict = self._verdict or TransferVerdict.decode(await self._transfers.get(person) or "")
        if verdict.outcome == ACCEPTED:  # the person waits in the room: nobody will come
            await self._hang_up_person()

    def _record(self, target: str, verdict: TransferVerdict, started: float) -> None:
        def after(moment: float | None) -> float | None:
            return round(moment - started, 3) if moment else None

        self._records.transfer(
            target,
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
        self._serializer: TwilioMarkSerializer | None = None

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

    def bind(
        self,
        call_sid: str,
        worker: PipelineWorker,
        control: CallControl,
        serializer: TwilioMarkSerializer | None,
    ) -> None:
        self._call_sid = call_sid
        self._worker = worker
        self._control = control
        self._serializer = serializer

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
        if not await self._tell_caller(outcome):
            await self._control.end_call(PERSON_LEFT_LINE, "transfer over")
        elif outcome == ACCEPTED:
            await self._join(self._control)
        else:
            line = DECLINED_LINE if outcome == DECLINED else NO_DECISION_LINE
            await self._control.end_call(line, f"transfer {outcome}")

    async def _tell_caller(self, outcome: str) -> bool:
        """Set the verdict (keyed by this call); False when it already has one (the caller's
        call gave up)."""
        if self._transfers is None or self.caller_sid is None:
            return False
        verdict = TransferVerdict(
            outcome, self._call_sid, answered_at=self._answered_at, at=time.time()
        )
        return await self._transfers.set(self._call_sid, verdict.encode())

    async def _join(self, control: CallControl) -> None:
        """Into the room to wait for the caller, whose entering starts the conference; this
        call's pipeline ends without hanging up (as a cold transfer's)."""
        await control.say(CONNECTING_PERSON_LINE)
        if self._serializer is not None:
            self._serializer.keep_call_on_end()
        control.note_end(JOINED)
        room = conference_room(self.caller_sid or "")
        try:
            await update_call_twiml(self._settings, self._call_sid, join_twiml(room, starts=False))
        except TwilioUnavailable as error:
            logger.error(f"Call {self._call_sid}: could not join the caller: {error}")
        if self._worker is not None:
            await self._worker.queue_frame(EndFrame(reason=JOINED))

    async def call_over(self) -> None:
        """The person's call ended before a key: a hang-up is a decline."""
        if self.active and not self._decided:
            self._decided = True
            with suppress(Exception):
                await self._tell_caller(PERSON_HUNG_UP)
