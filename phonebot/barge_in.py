"""Barge-in that stops the bot at once: nothing of an interrupted reply after the `clear`.

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

The other half of "at once" is hearing the caller sooner: `vad_params` (see its docstring
and the `VAD_*` settings).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastapi import WebSocket
from pipecat.audio.vad.vad_analyzer import VADParams
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

from phonebot.config import Settings
from phonebot.pipecat_compat import replace_websocket_output

__all__ = [
    "BargeInOutputTransport",
    "ClearGate",
    "ResumeAudioFrame",
    "barge_in_transport",
    "vad_params",
]

# TTS contexts remembered as interrupted; a call has a few per turn, so this is hours.
STALE_CONTEXTS_KEPT = 256


def vad_params(settings: Settings) -> VADParams:
    """Silero VAD tuned to hear a caller barging in within ~0.15 s, not ~0.35 s.

    Measured with espeak phrases through μ-law in the server's 60 ms batches
    (`bench/barge_in_vad.py`): with Pipecat's defaults (confidence 0.7, start 0.2 s, min
    volume 0.6) the VAD confirms speech 0.34-0.46 s after its onset, and the `clear` left
    0.35-0.43 s after it on the wire. Two things add up: `start_secs` (0.2 s of voiced
    32 ms windows) and the volume gate, a 0.4 s loudness window smoothed again (factor
    0.2), which needs ~0.15 s of speech before it passes 0.6. Line hiss and cough-like
    bursts never reach Silero's 0.7 confidence (at most 0.14 measured), so the confidence
    stays and the start and the volume gate come down (`VAD_START_S` 0.06 = two windows,
    `VAD_MIN_VOLUME` 0.3): speech confirmed 0.13-0.17 s after onset, `clear` on the wire
    0.16-0.20 s after it. The stop side (`stop_secs`) is Pipecat's, which the turn-taking
    in `phonebot.turns` builds on (measured: when the VAD reports the end of speech is
    unchanged by these two settings).
    """
    return VADParams(
        confidence=settings.vad_confidence,
        start_secs=settings.vad_start_s,
        min_volume=settings.vad_min_volume,
    )


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
