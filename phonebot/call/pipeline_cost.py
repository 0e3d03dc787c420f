"""Keeping a call's per-frame cost down, so one 2-core server holds many calls.

Why this exists: besides the models (Silero VAD on every 32 ms, Smart Turn once per
pause), a call's CPU goes to Pipecat moving frames: every frame costs a queue hop and a
task wake-up in each processor it passes, and Twilio sends a 20 ms audio message 50 times
a second per call. So:

- the transport joins Twilio's 20 ms payloads into fewer, longer frames and sends longer
  chunks (`AudioBatcher`, `INBOUND_BATCH_MS`, `OUTBOUND_CHUNK_10MS` in
  phonebot.twilio.transport);
- `InputAudioStop` ends the caller's audio after the user aggregator, the last processor
  that listens to it (VAD, Smart Turn); without it every audio frame would also travel
  through the LLM, TTS, output transport and assistant aggregator, which ignore it.
"""

from __future__ import annotations

from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


class InputAudioStop(FrameProcessor):
    """Drops the caller's audio: placed after the last processor that listens to it."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, InputAudioRawFrame):
            await self.push_frame(frame, direction)
