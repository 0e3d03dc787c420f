"""What one emulated call recorded: events, bot utterances, latencies, audio.

All times are seconds since the `start` message (the call's t = 0), on the same clock as
the stereo recording, so a test can say "the clear came 0.3 s after the caller spoke".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phonebot.audio import TWILIO_SAMPLE_RATE, write_stereo_wav

# [start, end) in seconds on the call's clock.
Span = tuple[float, float]
# How far a caller stall is widened when it excuses late audio (`server_underruns`): two
# 20 ms frames.
STALL_SLACK_S = 0.04


@dataclass(frozen=True)
class CallEvent:
    """Something that happened on the call; `kind` names it, `data` has the details.

    Kinds: start, caller_speech, pause, dtmf, wait, wait_timeout, bot_speech_start,
    bot_utterance, clear, mark, mark_answered, stop_sent, hangup, closed, unknown_event,
    streamsid_mismatch, bad_message; a phone menu's (callee scripts): menu (prompt,
    attempt), menu_choice (key; or said and word, for a spoken choice), menu_heard (said,
    and error when the recogniser failed: words that held no choice), menu_retry (key or
    None), bot_dtmf (digit: a key the bot pressed, heard as tones); after the server closed
    the stream, Twilio running the TwiML after `</Connect>`: say (text, duration),
    twiml_pause (seconds), twiml_unsupported (verb), then hangup (by "twiml").
    """

    t: float
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Utterance:
    """A stretch of bot speech as the caller heard it (after any `clear` truncation).

    `latency` is seconds from the end of the caller's last speech to `start`, or None when
    this utterance is not a reply (greeting, follow-on sentence, overlap). `text` is left
    for a transcriber (the CLI) to fill in.
    """

    index: int
    start: float
    end: float
    latency: float | None
    pcm: bytes
    text: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class ClearRecord:
    """A `clear` from the server (barge-in): when, and how much unplayed audio it dropped.

    `late_media` / `late_audio`: bot media messages (and seconds of audio) that kept
    arriving after it, before the bot's media paused (`timeline.LateMediaWatch`): the rest
    of the interrupted reply, which Twilio plays. `caller_onset`: start of the caller's
    latest speech at the `clear` (the emulator's energy VAD), None if they had not spoken.
    """

    t: float
    dropped: float
    late_media: int = 0
    late_audio: float = 0.0
    caller_onset: float | None = None

    @property
    def delay(self) -> float | None:
        """Seconds from the caller's speech onset to this `clear` (None: no speech)."""
        return None if self.caller_onset is None else self.t - self.caller_onset


@dataclass
class MarkRecord:
    """A `mark` from the server and when the emulator echoed it back (None: never)."""

    name: str
    received: float
    due: float
    answered: float | None = None


@dataclass(frozen=True)
class CloseInfo:
    """How the websocket ended: who closed it, when, code and reason."""

    t: float
    by: str  # "server" or "caller"
    code: int | None
    reason: str


@dataclass
class CallResult:
    """Everything recorded about one media-stream call."""

    url: str
    call_sid: str
    account_sid: str
    stream_sid: str
    parameters: dict[str, str]
    started_at: float = 0.0  # wall clock (epoch seconds) of t = 0
    duration: float = 0.0
    events: list[CallEvent] = field(default_factory=list)
    bot_utterances: list[Utterance] = field(default_factory=list)
    caller_segments: list[tuple[float, float]] = field(default_factory=list)
    clears: list[ClearRecord] = field(default_factory=list)
    marks: list[MarkRecord] = field(default_factory=list)
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    # Keys the bot pressed: tones in its audio, decoded as the far end's menu would
    # (phonebot.emulator.keytones), with when each began.
    bot_dtmf: list[tuple[float, str]] = field(default_factory=list)
    close: CloseInfo | None = None
    ended_by: str | None = None  # caller, server, rest, max_duration, error
    streamsid_mismatches: int = 0
    unknown_events: list[str] = field(default_factory=list)
    bot_audio_received: float = 0.0
    bot_audio_dropped: float = 0.0
    # Outbound pacing as the caller heard it (see `timeline.Playback`): bot audio chunks
    # received, those that came after the playout buffer had run dry mid-reply, the
    # silence that caused (seconds), and mid-reply gaps too long to count as a stall.
    bot_chunks: int = 0
    late_bot_chunks: int = 0
    bot_underrun: float = 0.0
    bot_long_gaps: int = 0
    # Each underrun's [start, end) in seconds (gaps over 2 s are `bot_long_gaps`, not
    # underruns), and the spans in which the caller's own event loop stalled (a frame slot
    # reached `CALLER_STALL_S` late or more): on a busy machine the emulated caller, not
    # the server, can be why bot audio was timed late.
    bot_underrun_spans: list[Span] = field(default_factory=list)
    caller_stalls: list[Span] = field(default_factory=list)
    first_bot_audio: float | None = None
    caller_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    bot_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    error: str | None = None

    @property
    def latencies(self) -> list[float]:
        """Response latency of every bot turn that answered the caller, in order."""
        return [u.latency for u in self.bot_utterances if u.latency is not None]

    @property
    def bot_underrun_share(self) -> float:
        """Share of the bot's speaking time that was silence waiting for late audio."""
        speaking = self.bot_audio_received + self.bot_underrun
        return self.bot_underrun / speaking if speaking > 0 else 0.0

    def server_underruns(self, slack: float = STALL_SLACK_S) -> list[Span]:
        """The bot's late audio that the caller's own stalls don't explain: each underrun
        span less the parts of it inside a caller stall (widened by `slack` both ways).

        A caller whose loop stalls reads the bot audio that came meanwhile only when it
        wakes, so its playout runs dry inside the stall even when the server sent on time.
        The slack is for where a stall is not seen exactly: it began up to a frame before
        the slot it was noticed at, and the audio is read just after the catch-up frames.
        What is left is the server's (or the network's).
        """
        widened = [(start - slack, end + slack) for start, end in self.caller_stalls]
        return [
            piece for span in self.bot_underrun_spans for piece in _outside(span, widened)
        ]

    @property
    def said(self) -> list[str]:
        """What Twilio said to the caller (`<Say>`) after the stream closed, in order."""
        return [str(event.data["text"]) for event in self.events_of("say")]

    @property
    def dead_air_after_stream(self) -> float:
        """Seconds of `<Pause>` silence the caller sat through after the stream closed."""
        return sum(float(event.data["seconds"]) for event in self.events_of("twiml_pause"))

    def events_of(self, kind: str) -> list[CallEvent]:
        """Events of one kind, in order."""
        return [event for event in self.events if event.kind == kind]

    def save_wav(self, path: str | Path) -> Path:
        """Stereo 8 kHz WAV: caller on the left, bot (as played) on the right."""
        return write_stereo_wav(path, self.caller_audio, self.bot_audio, TWILIO_SAMPLE_RATE)


def total_seconds(spans: list[Span]) -> float:
    """How long `spans` last together (they don't overlap: each list here is disjoint)."""
    return sum((end - start for start, end in spans), 0.0)


def _outside(span: Span, holes: list[Span]) -> list[Span]:
    """The parts of `span` that no hole covers, in order."""
    pieces = [span]
    for hole_start, hole_end in holes:
        pieces = [
            part
            for start, end in pieces
            for part in ((start, min(end, hole_start)), (max(start, hole_end), end))
            if part[1] > part[0]
        ]
    return pieces
