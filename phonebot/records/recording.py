"""Recording a call: a stereo 8 kHz WAV, the caller on the left, the bot on the right.

Two taps in the call's pipeline feed one `CallRecorder`:

- `caller_tap`, right after `transport.input()`: the caller's audio as Twilio sent it. It
  must come before `InputAudioStop` (phonebot.call.pipeline_cost), which drops the caller's
  audio after the user aggregator, so nothing downstream of the LLM ever sees it.
- `bot_tap`, right after `transport.output()`: the bot's audio as it was actually sent
  to Twilio (what a barge-in cut off never gets here).

Why not Pipecat's `AudioBufferProcessor`: it is one processor that must see both the
caller's and the bot's frames, and in this pipeline no point sees both. Its alignment is
also the cause of the distortion reported at 8 kHz on Twilio calls (pipecat-ai/pipecat
#3758): before appending a frame to one track it pads the *other* track with zeros up to
the same length unless a speaking flag says not to, so whenever the caller's 60 ms
batches arrive late in a burst (network jitter) zeros are written into the middle of
continuous caller audio and everything after is shifted (fed this pipeline's frame
pattern, 60 ms caller batches and 100 ms bot chunks, a 0.3 s network hiccup put 180 ms
of zeros into a continuous caller tone; it also placed the bot up to one caller batch
early, at the caller track's length). And it keeps the whole
call in memory unless it is given a buffer size, whose chunking misaligned the tracks
(pipecat-ai/pipecat #2448).

So here the clock is the caller's own audio: Twilio streams the caller continuously
(silence included) at 8000 samples a second, so the number of caller samples received is
the call's media time. Caller frames are appended back to back; a bot frame is placed at
the caller position of the moment it was sent (the output transport pushes a chunk
downstream when its playout starts), back to back with the previous bot frame unless
there was a real pause. Talking over the bot therefore shows as overlap, and neither
track ever gets zeros inside continuous audio.

The aligned part is written to disk every `FLUSH_S` seconds in a worker thread (never on
the event loop, never more than one write in flight), so a call of any length holds a few
seconds of audio in memory.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from phonebot.audio import TWILIO_SAMPLE_RATE, resample_pcm16

# A caller frame arriving this much later than the caller's clock says means Twilio did
# not send that audio (the stream paused): the gap is recorded as silence. Below it, late
# frames are network or event-loop jitter and their audio goes on back to back.
CALLER_GAP_S = 0.5
# A bot frame starting this much after the previous one ended is a pause in the bot's
# speech. Below it (the output transport keeps one 100 ms chunk queued at Twilio, so a late
# chunk still plays back to back) it continues the previous frame.
BOT_GAP_S = 0.2
# Audio is written once it is this far behind the clock: later than any frame can still
# land in it (more than both gaps above), so what is written never changes.
SETTLE_S = 1.0
# Write to disk in chunks of at least this much audio.
FLUSH_S = 2.0


class StereoTimeline:
    """Two tracks of 16-bit mono PCM on one timeline, in samples from the recording's start.

    Pure bookkeeping (no I/O, no asyncio): `now` is passed in, so tests drive it with any
    clock. Only the part not yet taken by `take_ready` is held in memory.
    """

    def __init__(self, sample_rate: int = TWILIO_SAMPLE_RATE) -> None:
        self.rate = sample_rate
        self.written = 0  # samples already handed out (both tracks)
        self._caller = bytearray()  # samples from `written` on
        self._bot = bytearray()
        # The media clock: position `_anchor_pos` was reached at monotonic `_anchor_time`;
        # it starts with the first audio of either side.
        self._anchor_pos = 0
        self._anchor_time: float | None = None

    @property
    def caller_end(self) -> int:
        return self.written + len(self._caller) // 2

    @property
    def bot_end(self) -> int:
        return self.written + len(self._bot) // 2

    def clock(self, now: float) -> int:
        """The media position at `now`: the caller samples received, plus the time since."""
        if self._anchor_time is None:
            return 0
        return self._anchor_pos + max(0, round((now - self._anchor_time) * self.rate))

    def add_caller(self, pcm: bytes, now: float) -> None:
        """A caller frame that has just arrived: its audio ends now."""
        n = len(pcm) // 2
        if self._anchor_time is None:
            self._anchor_time = now - n / self.rate
        start = self.clock(now) - n
        if start - self.caller_end > CALLER_GAP_S * self.rate:
            self._pad(self._caller, start)
        self._caller += pcm
        # Twilio's samples are the clock: re-anchor on them, so a late burst moves nothing.
        self._anchor_pos, self._anchor_time = self.caller_end, now

    def add_bot(self, pcm: bytes, now: float) -> None:
        """A bot frame that has just been sent: its playout starts now."""
        if self._anchor_time is None:
            self._anchor_time = now
        start = self.clock(now)
        if start - self.bot_end > BOT_GAP_S * self.rate:
            self._pad(self._bot, start)
        self._bot += pcm

    def take_ready(self, now: float, min_s: float = 0.0) -> bytes:
        """Interleaved stereo frames for the settled part (older than SETTLE_S), if at
        least `min_s` of it is waiting; else b""."""
        until = self.clock(now) - round(SETTLE_S * self.rate)
        if until - self.written < max(1, round(min_s * self.rate)):
            return b""
        return self._take(until)

    def take_all(self) -> bytes:
        """Everything left, both tracks padded to the longer one (the call is over)."""
        return self._take(max(self.caller_end, self.bot_end))

    def _take(self, until: int) -> bytes:
        self._pad(self._caller, until)
        self._pad(self._bot, until)
        count = until - self.written
        if count <= 0:
            return b""
        stereo = np.empty((count, 2), dtype="<i2")
        stereo[:, 0] = np.frombuffer(self._caller, dtype="<i2", count=count)
        stereo[:, 1] = np.frombuffer(self._bot, dtype="<i2", count=count)
        del self._caller[: 2 * count]
        del self._bot[: 2 * count]
        self.written = until
        return stereo.tobytes()

    def _pad(self, track: bytearray, position: int) -> None:
        """Silence from the track's end up to `position` (never shortens it)."""
        missing = position - (self.written + len(track) // 2)
        if missing > 0:
            track.extend(bytes(2 * missing))


class WavFile:
    """A stereo 16-bit WAV written in pieces; every method runs in a worker thread.

    `wave` rewrites the header after each write, so the file is a valid WAV of what was
    written so far even if the process dies mid-call.
    """

    def __init__(self, path: Path, sample_rate: int = TWILIO_SAMPLE_RATE) -> None:
        self.path = path
        self.rate = sample_rate
        self.frames = 0
        self._wav: wave.Wave_write | None = None

    def write(self, stereo: bytes) -> None:
        if not stereo:
            return
        if self._wav is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wav = wave.open(str(self.path), "wb")  # noqa: SIM115 (open across writes)
            self._wav.setnchannels(2)
            self._wav.setsampwidth(2)
            self._wav.setframerate(self.rate)
        self._wav.writeframes(stereo)
        self.frames += len(stereo) // 4

    def close(self, last: bytes = b"") -> None:
        try:
            self.write(last)
        finally:
            if self._wav is not None:
                self._wav.close()
                self._wav = None


class CallRecorder:
    """One call's recording: feed it through `caller_tap` and `bot_tap`, then `finish()`.

    The taps only append to memory and, every FLUSH_S, start one background write; the
    call's audio path never waits for the disk.
    """

    def __init__(
        self,
        call_sid: str,
        path: Path,
        on_stop: Callable[[CallRecorder], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_rate: int = TWILIO_SAMPLE_RATE,
    ) -> None:
        self.call_sid = call_sid
        self.file = WavFile(path, sample_rate)
        self.timeline = StereoTimeline(sample_rate)
        self.failed: str | None = None
        self._clock = clock
        self._on_stop = on_stop
        self._stopped = False
        self._write: asyncio.Task | None = None
        self.caller_tap = RecorderTap(self, "caller", name=f"RecorderCallerTap#{call_sid[-6:]}")
        self.bot_tap = RecorderTap(self, "bot", name=f"RecorderBotTap#{call_sid[-6:]}")

    @property
    def duration_s(self) -> float:
        return self.file.frames / self.file.rate

    def add(self, side: str, frame: InputAudioRawFrame | OutputAudioRawFrame) -> None:
        if self._stopped or self.failed:
            return
        pcm = _mono_pcm(frame, self.timeline.rate)
        now = self._clock()
        if side == "caller":
            self.timeline.add_caller(pcm, now)
        else:
            self.timeline.add_bot(pcm, now)
        if self._write is None or self._write.done():
            chunk = self.timeline.take_ready(now, FLUSH_S)
            if chunk:
                self._write = asyncio.create_task(self._write_chunk(chunk))

    async def _write_chunk(self, chunk: bytes) -> None:
        try:
            await asyncio.to_thread(self.file.write, chunk)
        except OSError as error:  # disk full, folder gone: the call goes on unrecorded
            self.failed = f"{type(error).__name__}: {error}"
            logger.error(f"Call {self.call_sid}: recording stopped: {self.failed}")

    def stop(self) -> None:
        """The call's pipeline is ending: take no more audio and hand over to `on_stop`
        (which runs `finish()` off the call's path). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._on_stop is not None:
            self._on_stop(self)

    async def finish(self) -> Path | None:
        """Write what is left and close the file: its path, or None if nothing was
        recorded or the disk failed (then the partial file is removed)."""
        self._stopped = True
        if self._write is not None:
            await self._write
        try:
            rest = b"" if self.failed else self.timeline.take_all()
            await asyncio.to_thread(self.file.close, rest)
        except OSError as error:
            self.failed = self.failed or f"{type(error).__name__}: {error}"
            logger.error(f"Call {self.call_sid}: recording not finished: {self.failed}")
        if self.failed or self.file.frames == 0:
            await asyncio.to_thread(self.file.path.unlink, missing_ok=True)
            return None
        return self.file.path


class RecorderTap(FrameProcessor):
    """Copies one side's audio into the call's recorder; every frame passes unchanged."""

    def __init__(self, recorder: CallRecorder, side: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder
        self._kind = InputAudioRawFrame if side == "caller" else OutputAudioRawFrame
        self._side = side

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, self._kind) and direction == FrameDirection.DOWNSTREAM:
            self._recorder.add(self._side, frame)
        elif isinstance(frame, (EndFrame, CancelFrame)) and self._side == "bot":
            self._recorder.stop()
        await self.push_frame(frame, direction)

    async def cleanup(self):
        """Whatever way the pipeline ended, the recording is closed (stop is idempotent)."""
        await super().cleanup()
        self._recorder.stop()


def _mono_pcm(frame: InputAudioRawFrame | OutputAudioRawFrame, rate: int) -> bytes:
    """The frame's audio as 16-bit mono at `rate` (phone frames already are)."""
    pcm = frame.audio
    if frame.num_channels > 1:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, frame.num_channels)
        pcm = samples.mean(axis=1).astype("<i2").tobytes()
    if frame.sample_rate != rate:
        pcm = resample_pcm16(pcm, frame.sample_rate, rate)
    return bytes(pcm)
