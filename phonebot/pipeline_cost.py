"""Keeping a call's per-frame cost down, so one 2-core server holds many calls.

Why this exists: besides the models (Silero VAD on every 32 ms, Smart Turn once per
pause), a call's CPU goes to Pipecat moving frames: every frame costs a queue hop and a
task wake-up in each processor it passes, and Twilio sends a 20 ms audio message 50 times
a second per call. So:

- `AudioBatcher` joins consecutive 20 ms Twilio payloads into one frame of
  `INBOUND_BATCH_MS` (used by `phonebot.session.TwilioMarkSerializer`): a third as many
  frames through the input transport, the screen, STT, keypad and user aggregator, at the
  cost of hearing the caller up to `INBOUND_BATCH_MS - 20` ms later.
- `InputAudioStop` ends the caller's audio after the user aggregator, the last processor
  that listens to it (VAD, Smart Turn); without it every audio frame would also travel
  through the LLM, TTS, output transport and assistant aggregator, which ignore it.
- `OUTBOUND_CHUNK_10MS` sets the output transport's chunk size (see
  `phonebot.session.twilio_transport`).
"""

from __future__ import annotations

from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

# μ-law at 8 kHz: 8 bytes per millisecond.
ULAW_BYTES_PER_MS = 8
# 60 ms: three Twilio messages per frame. Measured (10 calls held, instant services):
# 20 → 60 ms cut the server's CPU per held call by about a fifth, and 100 ms saved no
# more; the added delay is at most 40 ms on a reply latency of ~450 ms. Silero still
# scores every sample in its own 32 ms windows (the VAD buffers the remainder).
INBOUND_BATCH_MS = 60
# 100 ms of audio per websocket message to Twilio instead of Pipecat's 40 ms default:
# Twilio plays any payload size, and a chunk costs the same work whatever its length
# (serialize, base64, send, pace, push downstream), so this is 2.5x fewer of them.
OUTBOUND_CHUNK_10MS = 10


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


class InputAudioStop(FrameProcessor):
    """Drops the caller's audio: placed after the last processor that listens to it."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, InputAudioRawFrame):
            await self.push_frame(frame, direction)
