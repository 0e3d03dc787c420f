"""The websocket transport a Twilio call runs on: Pipecat's, made cheaper and exact at barge-in.

Two things set it apart from Pipecat's `FastAPIWebsocketTransport` as it comes
(`twilio_transport` in phonebot.twilio.stream builds it):

- Audio sized for cost (`AudioBatcher`, `INBOUND_BATCH_MS`, `OUTBOUND_CHUNK_10MS`): every
  frame costs a queue hop and a task wake-up in each processor it passes, and Twilio sends
  a 20 ms message 50 times a second per call (see also phonebot.call.pipeline_cost).
- Barge-in that stops the bot at once: nothing of an interrupted reply after the `clear`.

Twilio's `clear` empties the call's playout buffer of the audio sent *before* it; audio
sent after it plays (Twilio Media Streams, "Send a clear message":
https://www.twilio.com/docs/voice/media-streams/websocket-messages#send-a-clear-message).
So once the server has sent `clear`, not one more chunk of the interrupted reply may
follow it, or the caller hears the bot talk on over them.

Why Pipecat 1.14's own path can send some (read in `pipecat/transports/base_output.py`,
`pipecat/transports/websocket/fastapi.py` and `pipecat/processors/frame_processor.py`):

1. The output transport's audio task takes a chunk off its queue and only then writes it,
   through `asyncio.wait_for(write_audio_frame(...))`, which runs the write in a new task:
   between taking the chunk and sending it, the audio task yields. An `InterruptionFrame`
   handled in that gap (the transport's input task drains the queue, then sends `clear`)
   leaves the chunk in hand to be sent after the `clear`. Pipecat's
   `MediaSender.handle_interruptions` keeps "the frame being written" on purpose.
2. A processor's input queue hands out system frames first (`FrameProcessorQueue`):
   audio frames that were still waiting in a processor's input queue when the
   `InterruptionFrame` arrived are processed *after* it, past the point where the queue
   was reset, and travel on behind the interruption: into the output transport after its
   `clear`, where they are cut into chunks and sent like fresh audio.

3. A reply already on its way when the caller cut in: the TTS had made the start of a
   context (and its audio) before the interruption, but none of it had reached the
   output yet (still in the TTS's or a later processor's queue). Seen here only after the
   `clear`, its context is new to the output, so a check on "contexts the output had
   seen" lets it through as if it were the next reply.

`BargeInOutputTransport` closes all three at the wire, with Pipecat's public hooks:

- an interruption closes a gate before the `clear` is written; while it is closed,
  `write_audio_frame` drops interruptible audio (uninterruptible audio, which Pipecat
  keeps on purpose, still goes out);
- audio made before the interruption is stale and dropped on arrival: audio of a TTS
  context the output had seen start, of a context whose `TTSStartedFrame` was made before
  the interruption, and any audio frame made before it (Pipecat numbers frames in the
  order they are made, `Frame.id`, process-wide). The first audio of anything else
  queues a `ResumeAudioFrame` in the transport's audio queue just ahead of it, which
  reopens the gate when the audio task reaches it, i.e. after every chunk queued before
  it.

What the caller heard of each reply, for the transcript, is measured here too
(`PlayoutLedger`): the output is the one place that sees a reply's text and audio as the
TTS made them and each chunk as it goes to Twilio.

Hearing the caller sooner, the other half of barge-in, is the call's VAD
(phonebot.call.barge_in).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import WebSocket
from pipecat.audio.dtmf.utils import load_dtmf_audio
from pipecat.frames.frames import (
    AggregatedTextFrame,
    AggregatedTextProgressFrame,
    CancelFrame,
    ControlFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputDTMFFrame,
    OutputDTMFUrgentFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.pipecat_compat import quiet_close_after_the_far_end, replace_websocket_output

# μ-law at Twilio's 8 kHz, one byte a sample: 8 bytes per millisecond.
ULAW_BYTES_PER_MS = TWILIO_SAMPLE_RATE // 1000
# 60 ms: three Twilio messages per frame. Measured (10 calls held, instant services):
# 20 → 60 ms cut the server's CPU per held call by about a fifth, and 100 ms saved no
# more; the added delay is at most 40 ms on a reply latency of ~450 ms. Silero still
# scores every sample in its own 32 ms windows (the VAD buffers the remainder).
INBOUND_BATCH_MS = 60
# 100 ms of audio per websocket message to Twilio instead of Pipecat's 40 ms default:
# Twilio plays any payload size, and a chunk costs the same work whatever its length
# (serialize, base64, send, pace, push downstream), so this is 2.5x fewer of them.
OUTBOUND_CHUNK_10MS = 10
# TTS contexts remembered as interrupted; a call has a few per turn, so this is hours.
STALE_CONTEXTS_KEPT = 256
# Speech, in characters of its text per second, before the call's voice has said enough
# (MEASURED_SPEECH_S) to measure its own: espeak-ng at 175 wpm and Piper's joe both say
# about 15 characters a second of ordinary English.
DEFAULT_CHARS_PER_S = 15.0
MEASURED_SPEECH_S = 2.0


# --- audio sized for cost -------------------------------------------------------------


class AudioBatcher:
    """Joins consecutive audio payloads until there are at least `size` bytes.

    No timer: Twilio streams continuously (silence included) for the whole call, so a
    batch is always completed by the next messages; what is pending when the stream stops
    is under `size` bytes of audio nobody will answer.
    """

    def __init__(self, size: int):
        self._size = size
        self._pending = bytearray()

    def add(self, payload: bytes) -> bytes | None:
        """Add `payload`; return the batch when it has reached `size` bytes, else None."""
        self._pending += payload
        if len(self._pending) < self._size:
            return None
        batch = bytes(self._pending)
        self._pending.clear()
        return batch

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the batch to fill."""
        return len(self._pending)


# --- nothing after `clear` ------------------------------------------------------------


@dataclass
class ResumeAudioFrame(ControlFrame):
    """Queued in the output's audio queue just ahead of the first audio after a barge-in.

    When the audio task reaches it, every chunk queued before it (the interrupted reply)
    has been written or dropped, so audio may flow again.
    """


class ClearGate:
    """Which audio may still go to the wire after a `clear`; see the module docstring.

    Fed, in order, with what reaches the output transport (`interrupted`, `admit`) and with
    what its audio task is about to write (`may_send`, `resumed`).
    """

    def __init__(self) -> None:
        self.closed = False
        self.dropped_frames = 0  # interrupted audio kept off the wire, for logs and tests
        self._live: set[str] = set()  # contexts started since the last interruption
        self._stale: deque[str] = deque(maxlen=STALE_CONTEXTS_KEPT)
        self._resume_queued = False
        self._cut_id = -1  # `Frame.id` of the latest interruption: older audio is stale

    def interrupted(self, frame_id: int = -1) -> None:
        """The caller barged in (`frame_id`: the `InterruptionFrame`'s `id`): everything
        started or made so far is history."""
        self.closed = True
        self._resume_queued = False
        self._cut_id = max(self._cut_id, frame_id)
        self._stale.extend(self._live)
        self._live.clear()

    def admit(self, frame: Frame) -> tuple[bool, bool]:
        """(keep the frame, queue a `ResumeAudioFrame` before it) for a downstream frame."""
        if self._is_stale(frame):
            if isinstance(frame, OutputAudioRawFrame) and frame.interruptible:
                self.dropped_frames += 1
                return False, False
            return True, False
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSStartedFrame | TTSAudioRawFrame) and context_id:
            self._live.add(context_id)
        if not isinstance(frame, OutputAudioRawFrame) or not self.closed:
            return True, False
        resume, self._resume_queued = not self._resume_queued, True
        return True, resume

    def _is_stale(self, frame: Frame) -> bool:
        """Audio, or the start of a TTS context, of a reply begun before the latest
        interruption (the module docstring's three cases)."""
        if not isinstance(frame, TTSStartedFrame | OutputAudioRawFrame):
            return False
        context_id = getattr(frame, "context_id", None)
        if context_id is not None and context_id in self._stale:
            return True
        if frame.id > self._cut_id:
            return False
        if context_id is not None:
            self._stale.append(context_id)
        return True

    def may_send(self, frame: OutputAudioRawFrame) -> bool:
        """Whether a chunk may be written now (the audio task is about to send it)."""
        if self.closed and frame.interruptible:
            self.dropped_frames += 1
            return False
        return True

    def resumed(self) -> None:
        """The audio task reached the `ResumeAudioFrame`: what follows is a new reply."""
        self.closed = False


# --- what the caller heard --------------------------------------------------------------


@dataclass
class SpokenPart:
    """One text the TTS was given (a sentence, or a whole `TTSSpeakFrame`) and the seconds
    of audio it made of it; `complete` once it has made all of it (Pipecat's TTS hands the
    text on, as a `TTSTextFrame`, behind the last of its audio; a TTS that times its words
    reports the progress of its last word)."""

    text: str
    audio_s: float = 0.0
    complete: bool = False

    def lasts_s(self, chars_per_s: float) -> float:
        """How long its audio lasts: as made once complete; before that, at least what was
        made, or what its length takes at `chars_per_s` (cut before the TTS had made it)."""
        if self.complete or not self.text:
            return self.audio_s
        return max(self.audio_s, len(self.text) / chars_per_s)


@dataclass
class SpokenContext:
    """One TTS context (an LLM reply or a `TTSSpeakFrame`): its text and audio as the TTS
    made them, and how much Twilio has played.

    Times are `time.monotonic()`. `end_at` is when Twilio finishes playing what was sent
    of it, on the playout clock (`PlayoutLedger`); `cut_at` is when a barge-in or the
    hang-up stopped its playout, if one did before it had all played.
    """

    context_id: str
    parts: list[SpokenPart] = field(default_factory=list)
    interruptible: bool = True
    sent_s: float = 0.0
    end_at: float | None = None
    sent_all: bool = False  # its TTSStoppedFrame has gone out behind its audio
    cut_at: float | None = None

    @property
    def text(self) -> str:
        return " ".join(part.text for part in self.parts if part.text)

    def spoken_s(self, chars_per_s: float) -> float:
        """Seconds all of its audio lasts: what playing it all would have taken."""
        return sum(part.lasts_s(chars_per_s) for part in self.parts)

    def heard_s(self, now: float) -> float:
        """Seconds of it Twilio had played by `now`, or by its cut (Twilio's `clear`, or
        the end of the call, drops what it still held)."""
        if self.end_at is None:
            return 0.0
        at = now if self.cut_at is None else min(self.cut_at, now)
        return max(0.0, self.sent_s - max(0.0, self.end_at - at))

    def done(self, now: float) -> bool:
        """All of it was sent and Twilio has played it."""
        return self.sent_all and (self.end_at is None or self.end_at <= now)


class PlayoutLedger:
    """What each TTS context said and how much of it Twilio has played.

    Fed by `BargeInOutputTransport` from two places: frames as they reach the output,
    made by the TTS (`saw`: a sentence's text, announced ahead of its audio as Pipecat's
    `AggregatedTextFrame` with `will_be_spoken`, then the audio made of it), and frames
    as its audio task sends them (`left`: a context's start and stop; `wrote`: each chunk
    written to the websocket).

    Twilio plays a stream's audio in real time, in order, from when it arrives, and
    Pipecat's websocket output sends it ahead of that (its pacing lets a chunk or more run
    ahead, and catches up in bursts after a late one): the playout clock (`wrote`) says
    when Twilio will have played each chunk, so at any moment the audio heard is the
    audio sent minus what Twilio still buffers. The ledger's `cut` (a
    barge-in's `clear`, or the hang-up) fixes that moment for what was playing or
    queued. Twilio's `mark` echoes would say the same thing a chunk late at best (a
    mark comes back once the audio before it has played, and all at once on a `clear`,
    https://www.twilio.com/docs/voice/media-streams/websocket-messages#send-a-mark-message),
    for a message per chunk; the clock is what the call already has.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._contexts: OrderedDict[str, SpokenContext] = OrderedDict()
        self._playing: SpokenContext | None = None
        self._play_end = 0.0  # when Twilio will have played everything sent so far
        self._measured_chars, self._measured_s = 0, 0.0  # parts made in full: the voice's speed
        self.last_cut: list[str] = []  # the contexts the latest cut stopped, in order

    def context(self, context_id: str) -> SpokenContext | None:
        return self._contexts.get(context_id)

    # the TTS's side, in the order frames reach the output
    def saw(self, frame: Frame) -> None:
        """A downstream frame on its way into the output (stale ones included)."""
        context_id = getattr(frame, "context_id", None)
        if not context_id:
            return
        if isinstance(frame, TTSTextFrame):
            self._made(self._context(context_id), frame.text.strip())
        elif isinstance(frame, AggregatedTextProgressFrame):
            if not frame.remaining_text.strip():  # its last word is timed: all of it is made
                self._made(self._context(context_id), frame.text.strip())
        elif isinstance(frame, AggregatedTextFrame):
            if frame.will_be_spoken and frame.text.strip():
                self._context(context_id).parts.append(SpokenPart(frame.text.strip()))
        elif isinstance(frame, TTSAudioRawFrame):
            context = self._context(context_id)
            if not context.parts or context.parts[-1].complete:
                context.parts.append(SpokenPart(""))  # audio that no text announced
            context.parts[-1].audio_s += _seconds(frame)
            context.interruptible = context.interruptible and frame.interruptible
        elif isinstance(frame, TTSStartedFrame):
            context = self._context(context_id)
            context.interruptible = context.interruptible and frame.interruptible

    def chars_per_s(self) -> float:
        """The call's voice's speed, from the parts it made in full (a default before)."""
        if self._measured_s < MEASURED_SPEECH_S:
            return DEFAULT_CHARS_PER_S
        return self._measured_chars / self._measured_s

    def _made(self, context: SpokenContext, text: str) -> None:
        """The TTS handed a part's text on: all of its audio has been made."""
        part = next((p for p in context.parts if not p.complete and p.text == text), None)
        if part is None:
            return  # a word of a TTS that times its words: its progress completes the part
        part.complete = True
        if part.audio_s > 0:
            self._measured_chars += len(part.text)
            self._measured_s += part.audio_s

    # the wire's side, in the order the audio task sends
    def left(self, frame: Frame) -> None:
        """A downstream frame the output passes on (a context's start and stop leave in
        playout order, around its audio)."""
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSStartedFrame) and context_id:
            self._playing = self._context(context_id)
        elif isinstance(frame, TTSStoppedFrame) and context_id:
            context = self._contexts.get(context_id)
            if context is not None:
                context.sent_all = True

    def wrote(self, seconds: float, at: float | None = None) -> None:
        """A chunk of `seconds` went to Twilio at `at` (now): it plays after what is
        buffered, or at once."""
        at = self._clock() if at is None else at
        self._play_end = max(self._play_end, at) + seconds
        if self._playing is not None:
            self._playing.sent_s += seconds
            self._playing.end_at = self._play_end

    def cut(self, *, hang_up: bool = False) -> None:
        """A barge-in's `clear` (interruptible contexts only) or the end of the call (all):
        whatever had not all played stops here."""
        now = self._clock()
        self.last_cut = []
        for context in self._contexts.values():
            if context.cut_at is not None or context.done(now):
                continue
            if hang_up or context.interruptible:
                context.cut_at = now
                self.last_cut.append(context.context_id)
        if self._playing is not None and self._playing.cut_at is not None:
            self._playing = None
        if not hang_up:
            self._play_end = min(self._play_end, now)  # Twilio's buffer is empty

    def now(self) -> float:
        return self._clock()

    def _context(self, context_id: str) -> SpokenContext:
        context = self._contexts.get(context_id)
        if context is None:
            context = self._contexts[context_id] = SpokenContext(context_id)
            while len(self._contexts) > STALE_CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        return context


class BargeInOutputTransport(FastAPIWebsocketOutputTransport):
    """Pipecat's websocket output, sending nothing of an interrupted reply after `clear`,
    and keeping the `PlayoutLedger` of what was heard."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = ClearGate()
        self.ledger = PlayoutLedger()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Close the gate before Pipecat writes the `clear`; screen audio on its way in."""
        if isinstance(frame, InterruptionFrame):
            self.gate.interrupted(frame.id)
            self.ledger.cut()
        elif isinstance(frame, CancelFrame):
            self.ledger.cut(hang_up=True)
        elif direction == FrameDirection.DOWNSTREAM:
            self.ledger.saw(frame)
            keep, resume = self.gate.admit(frame)
            if not keep:
                return
            if resume:
                await super().process_frame(ResumeAudioFrame(), direction)
        await super().process_frame(frame, direction)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        """Pipecat's audio task passes a context's start and stop on around its audio."""
        if direction == FrameDirection.DOWNSTREAM:
            self.ledger.left(frame)
        await super().push_frame(frame, direction)

    async def write_transport_frame(self, frame: Frame):
        """Pipecat's hook for frames that waited in the audio queue behind earlier audio."""
        if isinstance(frame, ResumeAudioFrame):
            self.gate.resumed()
            return
        await super().write_transport_frame(frame)

    async def write_dtmf(self, frame: OutputDTMFFrame | OutputDTMFUrgentFrame) -> None:
        """Press keys as in-band tones (Media Streams has no DTMF message towards Twilio),
        from Pipecat's own tone files. Pipecat's `_write_dtmf_audio` does the same with
        interruptible frames, which the gate keeps off the wire after any `clear`; but a
        key is pressed after the callee's words (a phone menu talking: phonebot.call.ivr),
        on purpose, so its tones are not part of an interrupted reply."""
        for button in frame.buttons:
            tone = OutputAudioRawFrame(
                audio=await load_dtmf_audio(button, sample_rate=self.sample_rate),
                sample_rate=self.sample_rate,
                num_channels=1,
            )
            tone.interruptible = False
            await self.write_audio_frame(tone)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Drop (and don't report as played) a chunk of the interrupted reply; put each
        chunk of speech sent on the playout clock (hold music and key tones are not the
        bot's words: Pipecat cuts a frame into chunks of its own class)."""
        if not self.gate.may_send(frame):
            return False
        sent_at = self.ledger.now()
        sent = await super().write_audio_frame(frame)
        if sent and isinstance(frame, TTSAudioRawFrame):
            self.ledger.wrote(_seconds(frame), sent_at)
        return sent


def _seconds(frame: OutputAudioRawFrame) -> float:
    """How long a frame of 16-bit PCM lasts."""
    bytes_per_s = frame.sample_rate * frame.num_channels * 2
    return len(frame.audio) / bytes_per_s if bytes_per_s else 0.0


def barge_in_transport(
    websocket: WebSocket, params: FastAPIWebsocketParams
) -> FastAPIWebsocketTransport:
    """Pipecat's FastAPI websocket transport with `BargeInOutputTransport` as its output,
    closing without an ERROR a socket Twilio has already closed."""
    transport = FastAPIWebsocketTransport(websocket=websocket, params=params)
    replace_websocket_output(transport, BargeInOutputTransport)
    quiet_close_after_the_far_end(transport)
    return transport
