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

`BargeInOutputTransport` closes both at the wire, with Pipecat's public hooks:

- an interruption closes a gate before the `clear` is written; while it is closed,
  `write_audio_frame` drops interruptible audio (uninterruptible audio, which Pipecat
  keeps on purpose, still goes out);
- audio of a TTS context that had started before the interruption is stale and dropped
  on arrival (frames carry their `context_id`); the first audio of anything else queues a
  `ResumeAudioFrame` in the transport's audio queue just ahead of it, which reopens the
  gate when the audio task reaches it, i.e. after every chunk queued before it.

Hearing the caller sooner, the other half of barge-in, is the call's VAD
(phonebot.call.barge_in).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastapi import WebSocket
from pipecat.frames.frames import (
    ControlFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.pipecat_compat import replace_websocket_output

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

    def interrupted(self) -> None:
        """The caller barged in: everything started so far is history."""
        self.closed = True
        self._resume_queued = False
        self._stale.extend(self._live)
        self._live.clear()

    def admit(self, frame: Frame) -> tuple[bool, bool]:
        """(keep the frame, queue a `ResumeAudioFrame` before it) for a downstream frame."""
        context_id = getattr(frame, "context_id", None)
        if isinstance(frame, TTSStartedFrame | TTSAudioRawFrame) and context_id in self._stale:
            if isinstance(frame, TTSAudioRawFrame) and frame.interruptible:
                self.dropped_frames += 1
                return False, False
            return True, False
        if isinstance(frame, TTSStartedFrame | TTSAudioRawFrame) and context_id:
            self._live.add(context_id)
        if not isinstance(frame, OutputAudioRawFrame) or not self.closed:
            return True, False
        resume, self._resume_queued = not self._resume_queued, True
        return True, resume

    def may_send(self, frame: OutputAudioRawFrame) -> bool:
        """Whether a chunk may be written now (the audio task is about to send it)."""
        if self.closed and frame.interruptible:
            self.dropped_frames += 1
            return False
        return True

    def resumed(self) -> None:
        """The audio task reached the `ResumeAudioFrame`: what follows is a new reply."""
        self.closed = False


class BargeInOutputTransport(FastAPIWebsocketOutputTransport):
    """Pipecat's websocket output, sending nothing of an interrupted reply after `clear`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = ClearGate()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Close the gate before Pipecat writes the `clear`; screen audio on its way in."""
        if isinstance(frame, InterruptionFrame):
            self.gate.interrupted()
        elif direction == FrameDirection.DOWNSTREAM:
            keep, resume = self.gate.admit(frame)
            if not keep:
                return
            if resume:
                await super().process_frame(ResumeAudioFrame(), direction)
        await super().process_frame(frame, direction)

    async def write_transport_frame(self, frame: Frame):
        """Pipecat's hook for frames that waited in the audio queue behind earlier audio."""
        if isinstance(frame, ResumeAudioFrame):
            self.gate.resumed()
            return
        await super().write_transport_frame(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Drop (and don't report as played) a chunk of the interrupted reply."""
        if not self.gate.may_send(frame):
            return False
        return await super().write_audio_frame(frame)


def barge_in_transport(
    websocket: WebSocket, params: FastAPIWebsocketParams
) -> FastAPIWebsocketTransport:
    """Pipecat's FastAPI websocket transport with `BargeInOutputTransport` as its output."""
    transport = FastAPIWebsocketTransport(websocket=websocket, params=params)
    replace_websocket_output(transport, BargeInOutputTransport)
    return transport
