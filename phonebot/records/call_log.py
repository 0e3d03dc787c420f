"""One call's feed into its record: what the bot's pipeline saw, as record fields and
transcript lines.

The bot creates one `CallLog` per call and calls it from Pipecat's own events (the user
aggregator's `on_user_turn_stopped`, the assistant aggregator's `on_assistant_turn_stopped`)
and from call control (function calls, re-prompts, the transfer). Every method only puts
an operation on the app's `RecordWriter` queue and returns: nothing here waits for the
database. Without a writer (records off, e.g. on Pipecat Cloud without a shared
DATABASE_URL) every method does nothing, so callers never check.

A bot turn's line says what the caller heard of it (`HeardSpeech`), which is known only
once its audio has played or been cut off: Pipecat reports a turn when its audio has been
*sent*, before Twilio has played what it still buffers, and a caller who cuts in then
cuts off a turn Pipecat has already reported whole. Such a line waits here and is written
before the next line of the call, or at its end, so lines stay in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from phonebot.records.schema import utcnow
from phonebot.records.writer import RecordWriter
from phonebot.twilio.keypad import KEYPAD_PREFIX

# The `<Parameter>`s that are record columns of their own, not only in `parameters`.
CAMPAIGN_PARAMETER = "campaign_id"
CUSTOMER_PARAMETER = "customer_id"


@dataclass(frozen=True)
class HeardSpeech:
    """What a bot turn said and what of it the caller heard (phonebot.call.playout measures
    it on the playout clock of phonebot.twilio.transport).

    `text` is everything the bot started to say in the turn (all the text its TTS was
    given), `heard_text` the words of it that fit in the `heard_s` seconds of its audio
    Twilio played (always a prefix of `text`), `spoken_s` how long all of its audio lasts.
    `cut`: the caller (a barge-in's `clear`) or a hang-up stopped it before it had all
    played. `settled`: it has all played or been cut, so this will not change.
    """

    text: str
    heard_text: str
    heard_s: float
    spoken_s: float
    cut: bool
    settled: bool = True

    def data(self) -> dict[str, Any]:
        """The entry's `data` for a cut bot turn (its fields are described with
        `phonebot.records.models.TranscriptEntryOut.data`)."""
        return {"heard_s": self.heard_s, "heard_text": self.heard_text, "spoken_s": self.spoken_s}


# How a bot turn tells what of it was heard, asked when its line is written.
Heard = Callable[[], HeardSpeech | None]


@dataclass
class _BotLine:
    """A bot turn whose audio was still playing when Pipecat reported it."""

    text: str | None
    interrupted: bool
    at_s: float | None
    reply_latency_s: float | None
    heard: Heard


class CallLog:
    """The record of one call as it happens; a no-op when `writer` is None."""

    def __init__(self, writer: RecordWriter | None, call_sid: str) -> None:
        self.writer = writer
        self.call_sid = call_sid
        # Wall clock of the stream's start: Pipecat stamps turns with ISO times, and a
        # line's `at_s` is its turn's start relative to this.
        self._started_at: datetime | None = None
        self._started_mono = time.monotonic()
        # What the bot recorded (`record_outcome`), kept here too: the post-call analysis
        # reads it once the call is over (phonebot.call.analysis), records on or off.
        self.outcomes: dict[str, str] = {}
        self._playing: _BotLine | None = None  # written before the next line

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    # --- the call ------------------------------------------------------------------------
    def started(
        self, *, direction: str, persona: str, parameters: Mapping[str, str]
    ) -> None:
        """The media stream started. From and to come from the webhook's form, as the
        server put them in the stream's parameters (`caller_id`, `called_number`)."""
        self._started_at = utcnow()
        self._started_mono = time.monotonic()
        if self.writer is None:
            return
        self.writer.call_started(
            self.call_sid,
            direction=direction,
            from_number=parameters.get("caller_id") or None,
            to_number=parameters.get("called_number") or None,
            persona=persona,
            parameters=dict(parameters),  # the writer drops the stream token
            campaign_id=parameters.get(CAMPAIGN_PARAMETER) or None,
            customer_id=parameters.get(CUSTOMER_PARAMETER) or None,
            stream_started_at=self._started_at,
        )

    def update(self, **fields: Any) -> None:
        """Set record fields: `transfer_target`, `recording_path`, … (see
        `phonebot.records.writer.UPDATABLE`)."""
        if self.writer is not None:
            self.writer.call_updated(self.call_sid, **fields)

    def outcome(self, fields: Mapping[str, str]) -> None:
        """Outcome fields the bot recorded (`record_outcome`), merged into the record's."""
        self.outcomes.update({str(k): str(v) for k, v in fields.items()})
        if self.writer is not None:
            self.writer.outcome(self.call_sid, dict(fields))

    def opt_out(self, number: str | None) -> None:
        """The other party asked not to be called again: `number` goes on the do-not-call
        list and the record's end reason says so."""
        if self.writer is not None:
            self.writer.opt_out(self.call_sid, number)

    def ended(self, end_reason: str, provider_errors: Mapping[str, int] | None = None) -> None:
        """The stream ended: duration, reason, the provider error counts, and (from the
        bot turns' latencies) reply latency p50/p95."""
        if self.writer is None:
            return
        self._write_playing()
        errors = dict(provider_errors) if provider_errors else None
        self.writer.call_ended(
            self.call_sid,
            end_reason=end_reason,
            duration_s=round(time.monotonic() - self._started_mono, 3),
            provider_errors=errors,
        )

    def analyzed(self, agent: str, analysis: Mapping[str, Any]) -> None:
        """The post-call analysis (phonebot.call.analysis): stored on the record, and sent
        as a `call.analyzed` event."""
        if self.writer is not None:
            self.writer.call_analyzed(self.call_sid, agent=agent, analysis=dict(analysis))

    # --- the transcript ------------------------------------------------------------------
    def caller_turn(self, text: str | None, started: str | None = None) -> None:
        """A caller turn as Pipecat's user aggregator finalised it. Keypad entries (the
        DTMF aggregator's "The caller pressed 42#") become keypad lines of their own."""
        if self.writer is None or not text or not text.strip():
            return
        self._write_playing()
        speech, _, digits = text.partition(KEYPAD_PREFIX)
        at_s = self._at_s(started)
        if speech.strip():
            self.writer.transcript(self.call_sid, "caller", speech.strip(), at_s=at_s)
        if digits.strip():
            digits = digits.strip()
            self.writer.transcript(
                self.call_sid, "keypad", digits, at_s=at_s, data={"digits": digits}
            )

    def bot_turn(
        self,
        text: str | None,
        *,
        interrupted: bool = False,
        started: str | None = None,
        reply_latency_s: float | None = None,
        heard: Heard | None = None,
    ) -> None:
        """A bot turn as Pipecat's assistant aggregator finalised it: what was spoken and
        how long the caller waited for it.

        Pipecat's `text` for a turn the caller cut in on (`interrupted`), or a hang-up cut
        off, is only what had been played: the words so far with a TTS that times its
        words, the sentences whose audio had all been sent with one that does not. With `heard`
        (phonebot.call.playout) the line instead has the turn's whole text, says whether it
        was cut off before it had all played, and for a cut turn its `data` says what was
        heard (`HeardSpeech.data`); it is written once that is known. Without it, a turn cut
        off during its first sentence is still recorded (text None), since the caller did
        hear the bot start.
        """
        if self.writer is None:
            return
        self._write_playing()
        line = _BotLine(text, interrupted, self._at_s(started), reply_latency_s, heard or _nothing)
        speech = line.heard()
        if speech is not None and not speech.settled:
            self._playing = line  # still playing: written before the next line, or at the end
            return
        self._write_bot(line, speech)

    def _write_playing(self) -> None:
        """Write the bot turn that was still playing, with what of it was heard by now."""
        line, self._playing = self._playing, None
        if line is not None:
            self._write_bot(line, line.heard())

    def _write_bot(self, line: _BotLine, speech: HeardSpeech | None) -> None:
        assert self.writer is not None
        text, interrupted, data = (line.text or "").strip(), line.interrupted, None
        if speech is not None:
            if interrupted or not text:
                text = speech.text or text
            interrupted = speech.cut
            data = speech.data() if speech.cut else None
        if not (text or interrupted):
            return
        self.writer.transcript(
            self.call_sid,
            "bot",
            text or None,
            at_s=line.at_s,
            reply_latency_s=line.reply_latency_s,
            interrupted=interrupted,
            data=data,
        )

    def function_call(
        self,
        name: str,
        arguments: Mapping[str, Any],
        result: Any,
        *,
        error: str | None = None,
        duration_s: float | None = None,
    ) -> None:
        """A function the LLM called: its arguments and what it was given back. An agent's
        own tools (phonebot.call.agent_tools) also say why they failed (`error`, e.g.
        "HTTP 503"; `result` is then what the LLM was told) and how long they took."""
        if self.writer is None:
            return
        self._write_playing()
        data = {"name": name, "arguments": dict(arguments), "result": result}
        if error is not None:
            data["error"] = error
        if duration_s is not None:
            data["duration_s"] = duration_s
        self.writer.transcript(self.call_sid, "function", name, data=data)

    def transfer(self, target: str, outcome: str, data: Mapping[str, Any]) -> None:
        """How a warm transfer went (phonebot.call.warm_transfer): the record's target and
        result, and a `transfer` entry with the outcome and its timings."""
        self.update(transfer_target=target, transfer_result=outcome)
        if self.writer is not None:
            self._write_playing()
            self.writer.transcript(self.call_sid, "transfer", outcome, data=dict(data))

    def reprompt(self, text: str) -> None:
        if self.writer is not None:
            self._write_playing()
            self.writer.transcript(self.call_sid, "reprompt", text)

    def _at_s(self, iso_time: str | None) -> float | None:
        """Seconds from the stream's start to `iso_time` (Pipecat's turn start), or None
        (the writer then uses now)."""
        if not iso_time or self._started_at is None:
            return None
        try:
            moment = datetime.fromisoformat(iso_time)
        except ValueError:
            return None
        return max(0.0, (moment - self._started_at).total_seconds())


def _nothing() -> HeardSpeech | None:
    return None


class ReplyLatencies:
    """Each bot turn's reply latency, read from the call's `TurnTimeline` timings.

    `phonebot.call.turns.TurnTimeline` logs one timing per caller turn when the reply's first
    audio frame goes out; its `audio_out_s` is the caller's wait, from the end of their
    speech to that frame. A bot turn takes the newest timing logged since the previous bot
    turn: none for the greeting or a re-prompt (no caller turn before them), and none
    when the caller's turn got no spoken reply.
    """

    def __init__(self, timings: list[dict[str, Any]]) -> None:
        self._timings = timings  # the timeline's own list, appended to as turns go
        self._seen = 0

    def next(self) -> float | None:
        fresh = self._timings[self._seen :]
        self._seen = len(self._timings)
        waits = [t["audio_out_s"] for t in fresh if t.get("audio_out_s") is not None]
        return waits[-1] if waits else None
