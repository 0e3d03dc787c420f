"""Silero VAD for every call of a process, scored in one ONNX run per event-loop tick.

Why: Silero scores each call's audio in 32 ms windows, ~31 runs per second per call, and a
run of one window costs mostly fixed overhead (input checks, session dispatch, small
matrix products): profiled at 10 calls with instant services, VAD was ~30 % of the
server's CPU. The model takes a batch dimension, and its recurrent state and audio context
are plain inputs and outputs, so the windows of all calls waiting at one moment go through
in one run while each call keeps its own state (`SileroStream`). Measured with
`bench/inference.py`: ~260 µs per window alone, ~70 µs per window in batches of 10-20.

`SileroBatcher` lets a window wait up to `BATCH_WAIT_S` for other calls' windows (calls'
audio arrives at independent moments), and not at all when every live call already has
one waiting or the call is alone. There is one batcher per event loop
(`SileroBatcher.for_running_loop`), created lazily and forgotten with its loop, so nothing
outlives a test's loop; an analyzer can also be given one (tests count its runs).

`SharedSileroVADAnalyzer` is Pipecat's `SileroVADAnalyzer` with its windows scored by the
batcher; everything else (the speech state machine, the volume gate, the model resets every
~2 s of quiet) is Pipecat's own code, run window by window in the same order, so the
verdicts are the ones Pipecat's analyzer gives (tests/test_inference_batching.py).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import ClassVar

import numpy as np
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

from phonebot.ai.inference.sessions import silero_session
from phonebot.pipecat_compat import (
    init_silero_state,
    keep_vad_pending_audio,
    reset_silero_if_due,
    run_silero,
    run_vad_window,
    silero_model,
    take_vad_pending_audio,
    vad_state,
)

__all__ = ["SharedSileroVADAnalyzer", "SileroBatcher", "SileroStream", "score_windows"]

_STATE_SHAPE = (2, 1, 128)  # Silero's recurrent state for one stream
# How long a call's window may wait for other calls' windows to share its run. Every VAD
# decision (speech started, stopped) comes up to this much later; measured with
# bench/inference.py: see docs/scaling.md "Capacity per core".
BATCH_WAIT_S = 0.02
# Calls that submitted a window within this period count as live: once all of them have
# a window waiting, the batch goes without waiting out BATCH_WAIT_S. Longer than a frame.
ACTIVE_PERIOD_S = 0.25
# A buffer handed over sooner than this after the previous analysis ended was waiting in
# the queue: the call is behind real time (a 60 ms frame arrives ~60 ms after the last),
# and its audio is analysed inline until it has caught up.
BACKLOG_GAP_S = 0.005


def _context_size(sample_rate: int) -> int:
    """Samples of the previous window Silero prepends to each window (as Pipecat does)."""
    return 64 if sample_rate == 16000 else 32


class SileroStream:
    """One call's Silero recurrent state and audio context, on the process-wide session.

    Stands in for Pipecat's `SileroOnnxModel` in the analyzer (``_model``): same math,
    but the state lives here so that `score_windows` can run many streams at once.
    ``reset_states`` is what Pipecat's analyzer calls every ~2 s of quiet.
    """

    def __init__(self, session) -> None:
        self.session = session
        self.state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self.context = np.zeros((1, 0), dtype=np.float32)
        self.sample_rate = 0

    def reset_states(self) -> None:
        """Forget the recurrent state and audio context (Pipecat's model reset)."""
        self.state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self.context = np.zeros((1, 0), dtype=np.float32)
        self.sample_rate = 0

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """One window scored alone (Pipecat's unbatched path): shape (1, 1)."""
        return score_windows(self.session, [self], [audio], sample_rate)


def score_windows(
    session, streams: list[SileroStream], windows: list[np.ndarray], sample_rate: int
) -> np.ndarray:
    """Score one window (float32, 256 samples at 8 kHz) per stream in one ONNX run.

    Returns the speech probabilities, shape (len(streams), 1), and advances each
    stream's state and context exactly as Pipecat's `SileroOnnxModel.__call__` would.
    """
    context = _context_size(sample_rate)
    batch = np.empty((len(streams), context + len(windows[0])), dtype=np.float32)
    for row, (stream, window) in enumerate(zip(streams, windows, strict=True)):
        if stream.sample_rate != sample_rate or stream.context.shape[1] != context:
            stream.state = np.zeros(_STATE_SHAPE, dtype=np.float32)
            stream.context = np.zeros((1, context), dtype=np.float32)
            stream.sample_rate = sample_rate
        batch[row, :context] = stream.context[0]
        batch[row, context:] = window
    states = np.concatenate([stream.state for stream in streams], axis=1)
    rate = np.array(sample_rate, dtype=np.int64)
    out, new_states = session.run(None, {"input": batch, "state": states, "sr": rate})
    for row, stream in enumerate(streams):
        stream.state = new_states[:, row : row + 1, :]
        stream.context = batch[row : row + 1, -context:]
    return out


class SileroBatcher:
    """Scores the VAD windows of every call on one event loop together.

    Calls' audio arrives at independent moments (each sends a 60 ms frame whenever its
    own Twilio stream delivers it), so windows scored "at the next loop turn" would mostly
    go alone. A call's first window of a frame therefore waits up to `max_wait_s` for other
    calls' windows, and goes at once when every call seen lately has one waiting (alone on
    the loop: no wait at all). A call's next window of the same frame (``wait=False``) goes
    at the next loop turn: the previous run woke every call in it at once, so those next
    windows arrive together.

    Attributes:
        runs: ONNX runs so far; windows: windows scored (windows / runs is the mean batch).
    """

    _per_loop: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(
        self,
        session=None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_wait_s: float = BATCH_WAIT_S,
    ) -> None:
        self._session = session
        self._loop = loop
        self._max_wait_s = max_wait_s
        self._pending: list[tuple[SileroStream, np.ndarray, int, asyncio.Future]] = []
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._seen: set[int] = set()  # streams that submitted since `_seen_since`
        self._seen_since = 0.0
        self._expected = 1  # streams active in the last period: a full batch
        self.runs = 0
        self.windows = 0

    @classmethod
    def for_running_loop(cls) -> SileroBatcher:
        """The running loop's batcher, created on first use and dropped with the loop."""
        loop = asyncio.get_running_loop()
        batcher = cls._per_loop.get(loop)
        if batcher is None:
            batcher = cls._per_loop[loop] = cls(loop=loop)
        return batcher

    def score(
        self, stream: SileroStream, window: np.ndarray, sample_rate: int, *, wait: bool = True
    ) -> asyncio.Future:
        """A future for `window`'s probability (shape (1,)): scored with the other calls'
        windows, within `max_wait_s` (`wait`) or at the next loop turn."""
        loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((stream, window, sample_rate, future))
        self._seen.add(id(stream))
        if not wait or self._max_wait_s <= 0 or len(self._pending) >= self._expected:
            if self._soon is None:
                self._soon = loop.call_soon(self._flush)
        elif self._timer is None and self._soon is None:
            self._timer = loop.call_later(self._max_wait_s, self._flush)
        return future

    def _flush(self) -> None:
        for handle in (self._timer, self._soon):
            if handle is not None:
                handle.cancel()
        pending, self._pending, self._soon, self._timer = self._pending, [], None, None
        self._count_active_streams()
        groups: dict[tuple[int, int], list[tuple[SileroStream, np.ndarray, asyncio.Future]]] = {}
        for stream, window, rate, future in pending:
            groups.setdefault((rate, len(window)), []).append((stream, window, future))
        session = self._session or silero_session()
        for (rate, _), group in groups.items():
            try:
                out = score_windows(session, [g[0] for g in group], [g[1] for g in group], rate)
            except Exception as error:  # one bad run must not hang every call's VAD
                for _, _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.runs += 1
            self.windows += len(group)
            for row, (_, _, future) in enumerate(group):
                if not future.done():  # a call that ended meanwhile cancelled its future
                    future.set_result(out[row])

    def _count_active_streams(self) -> None:
        """Every `ACTIVE_PERIOD_S`: how many calls submitted windows (a full batch)."""
        now = time.monotonic()
        if now - self._seen_since >= ACTIVE_PERIOD_S:
            self._expected = max(1, len(self._seen))
            self._seen, self._seen_since = set(), now


class SharedSileroVADAnalyzer(SileroVADAnalyzer):
    """Pipecat's Silero VAD analyzer on the process-wide session, scored in batches."""

    def __init__(
        self,
        *,
        sample_rate: int | None = None,
        params: VADParams | None = None,
        batcher: SileroBatcher | None = None,
    ):
        """Set up what ``SileroVADAnalyzer.__init__`` sets up, without loading a model.

        We go around Pipecat's constructor because it unconditionally creates an
        ``InferenceSession``. The model is this call's own `SileroStream` on the shared
        session. `batcher`: None means the running event loop's.
        """
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        init_silero_state(self, SileroStream(silero_session()))
        self._vad_batcher = batcher
        self._batched_confidence: np.ndarray | None = None
        self._vad_idle_since = 0.0  # when the last analysis ended

    def voice_confidence(self, buffer) -> float:
        """The window's probability the batcher computed, or Pipecat's own unbatched path.

        Like Pipecat's, it then lets the model reset its state when a reset is due.
        """
        confidence, self._batched_confidence = self._batched_confidence, None
        if confidence is None:
            return super().voice_confidence(buffer)
        reset_silero_if_due(self, confidence.item())
        return confidence

    async def analyze_audio(self, buffer: bytes) -> VADState:
        """Pipecat's analysis, with each 32 ms window scored by the loop's batcher.

        Runs on the event loop, not in Pipecat's thread per call: the hand-off to a
        thread costs more than scoring a window. Windows are scored one at a time per call
        (each depends on the state the previous one left, and on a model reset decided
        after it), but together with every other call's windows. A call behind real time
        is analysed inline until it has caught up.
        """
        if time.monotonic() - self._vad_idle_since < BACKLOG_GAP_S:
            # Handed over right after the previous analysis: this buffer was queued behind
            # it, the call is behind real time. Catch up inline, as before batching: going
            # through the batcher costs a few loop turns per buffer, which an overloaded
            # loop can't spare (the greeting and transcripts queue behind the audio). Sending
            # a behind call's windows to the batcher unwaited instead was no better in 5
            # benchmark pairs (docs/scaling.md, "Where the tail comes from").
            state = run_silero(self, buffer)
            self._vad_idle_since = time.monotonic()
            return state
        window_bytes = self.num_frames_required() * self.num_channels * 2
        audio = take_vad_pending_audio(self, buffer)
        count = len(audio) // window_bytes
        try:
            state = vad_state(self)
            for index in range(count):
                window = audio[index * window_bytes : (index + 1) * window_bytes]
                self._batched_confidence = await self._score(window, wait=index == 0)
                state = run_vad_window(self, window, settle=index == count - 1)
            return state
        finally:
            keep_vad_pending_audio(self, audio[count * window_bytes :])
            self._vad_idle_since = time.monotonic()

    async def _score(self, window: bytes, *, wait: bool) -> np.ndarray | None:
        samples = np.frombuffer(window, np.int16).astype(np.float32) / 32768.0
        batcher = self._vad_batcher or SileroBatcher.for_running_loop()
        try:
            return await batcher.score(silero_model(self), samples, self.sample_rate, wait=wait)
        except Exception as error:  # Pipecat's path then logs it and scores 0
            logger.error(f"Batched Silero VAD failed: {error}")
            return None
