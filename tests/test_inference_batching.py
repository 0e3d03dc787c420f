"""Batched inference (phonebot.ai.inference): many calls' VAD windows in one ONNX run, and
Smart Turn predictions side by side, with every call getting what Pipecat alone gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import numpy as np
import pytest
from pipecat.audio.vad.silero import SileroVADAnalyzer
from threadpoolctl import threadpool_info

from phonebot import pipecat_compat as compat
from phonebot.ai.inference import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzer, SileroBatcher
from phonebot.ai.inference.turn import SMART_TURN_NICE, SMART_TURN_THREADS, smart_turn_executor
from phonebot.ai.offline.espeak import synthesize_at

RATE = 8000
FRAME_BYTES = 960  # 60 ms, what phonebot.twilio.transport.AudioBatcher hands the VAD: 1-2 windows
CALLS = 4


def _call_audio(n: int) -> bytes:
    """Call n: speech, a pause long enough for Silero's 2 s model reset, speech, at an
    offset of its own so the calls' speech starts and stops at different windows."""
    texts = ["What are your opening hours?", "My order number is four five six.",
             "I would like to book a table.", "Goodbye."]
    words = synthesize_at(texts[n % len(texts)], RATE)
    return bytes(320 * (3 * n + 1)) + words + bytes(RATE * 2 * 2) + words + bytes(RATE)


def _frames(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


def _scores(analyzer: SileroVADAnalyzer) -> list[float]:
    """Every confidence the analyzer's state machine sees from now on."""
    seen: list[float] = []
    compute = analyzer.voice_confidence

    def record(buffer: bytes):
        confidence = compute(buffer)
        seen.append(float(np.asarray(confidence).reshape(-1)[0]))
        return confidence

    analyzer.voice_confidence = record  # type: ignore[method-assign]
    return seen


def _vad(cls, **kwargs) -> SileroVADAnalyzer:
    analyzer = cls(sample_rate=RATE, **kwargs)
    analyzer.set_sample_rate(RATE)
    return analyzer


async def _feed(
    analyzer: SileroVADAnalyzer, frames: list[bytes], gap_s: float = 0.01
) -> list[object]:
    """Frames as a live call hands them over: each some time after the last (`gap_s`)."""
    states = []
    for frame in frames:
        states.append(await analyzer.analyze_audio(frame))
        await asyncio.sleep(gap_s)
    return states


async def test_batched_vad_scores_and_decides_like_pipecat_alone() -> None:
    """Interleaved calls on one batcher: the same probabilities (1e-5) and VAD states,
    model resets included, as Pipecat's own analyzer fed each call alone; in fewer runs."""
    calls = [_frames(_call_audio(n)) for n in range(CALLS)]
    batcher = SileroBatcher()
    ours = [_vad(SharedSileroVADAnalyzer, batcher=batcher) for _ in calls]
    heard = [_scores(analyzer) for analyzer in ours]
    states = await asyncio.gather(*(_feed(a, f) for a, f in zip(ours, calls, strict=True)))

    for n, frames in enumerate(calls):
        reference = _vad(SileroVADAnalyzer)
        expected = _scores(reference)
        expected_states = [compat.run_silero(reference, frame) for frame in frames]
        assert max(expected) > 0.9  # there is speech to hear
        np.testing.assert_allclose(heard[n], expected, rtol=0, atol=1e-5)
        assert states[n] == expected_states
        assert len(set(expected_states)) >= 3  # quiet, speaking, stopping at least

    assert batcher.windows == sum(len(h) for h in heard)
    assert batcher.runs <= batcher.windows / (CALLS - 1)  # windows of all calls together


async def test_a_window_scored_alone_matches_a_batch() -> None:
    """One call on its own: one window per run, same scores as Pipecat."""
    frames = _frames(_call_audio(0))[:40]
    batcher = SileroBatcher()
    ours, reference = _vad(SharedSileroVADAnalyzer, batcher=batcher), _vad(SileroVADAnalyzer)
    heard, expected = _scores(ours), _scores(reference)
    await _feed(ours, frames)
    for frame in frames:
        compat.run_silero(reference, frame)
    np.testing.assert_allclose(heard, expected, rtol=0, atol=1e-5)
    assert batcher.runs == batcher.windows == len(heard)


async def test_a_call_behind_real_time_catches_up_inline() -> None:
    """Frames handed over back to back (queued behind a slow loop) don't wait for a batch
    or a loop turn each: scored alone, inline, with the same results."""
    frames = _frames(_call_audio(1))[:30]
    batcher = SileroBatcher()
    ours, reference = _vad(SharedSileroVADAnalyzer, batcher=batcher), _vad(SileroVADAnalyzer)
    heard, expected = _scores(ours), _scores(reference)
    states = await _feed(ours, frames, gap_s=0.0)
    assert states == [compat.run_silero(reference, frame) for frame in frames]
    np.testing.assert_allclose(heard, expected, rtol=0, atol=1e-5)
    assert batcher.windows <= 2  # the first frame only: the rest were a backlog


def test_each_event_loop_has_its_own_batcher() -> None:
    async def current() -> SileroBatcher:
        first, second = SileroBatcher.for_running_loop(), SileroBatcher.for_running_loop()
        assert first is second
        analyzer = _vad(SharedSileroVADAnalyzer)
        await analyzer.analyze_audio(bytes(FRAME_BYTES))
        assert first.windows == 1
        return first

    assert asyncio.run(current()) is not asyncio.run(current())


async def test_a_call_that_ends_mid_window_leaves_the_others_scored() -> None:
    batcher = SileroBatcher()
    leaving, staying = (_vad(SharedSileroVADAnalyzer, batcher=batcher) for _ in range(2))
    task = asyncio.create_task(leaving.analyze_audio(bytes(FRAME_BYTES)))
    await asyncio.sleep(0)  # its window is waiting for the next loop turn
    task.cancel()
    state = await staying.analyze_audio(bytes(FRAME_BYTES))
    assert state is not None and batcher.runs >= 1
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_failing_run_falls_back_to_scoring_alone(monkeypatch) -> None:
    class Broken:
        def run(self, *args, **kwargs):
            raise RuntimeError("onnx broke")

    analyzer = _vad(SharedSileroVADAnalyzer, batcher=SileroBatcher(Broken()))
    heard = _scores(analyzer)
    await analyzer.analyze_audio(bytes(FRAME_BYTES))
    assert heard == [pytest.approx(heard[0])] and heard[0] < 0.1  # scored, unbatched


# ------------------------------------------------------------------------ Smart Turn


async def test_simultaneous_turn_ends_run_side_by_side() -> None:
    """k calls ending their turns at once are predicted in parallel on every core, not one
    after the other on one thread: counted, not timed."""
    cores = SMART_TURN_THREADS  # the cores this process may use (phonebot.ops.cores)
    k = max(2, cores)
    running, most = 0, 0
    lock = threading.Lock()
    speech = synthesize_at("Can I book a table for two people tonight?", RATE)

    class Counting(SharedSmartTurnAnalyzer):
        def _predict_endpoint(self, audio):
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                time.sleep(0.2)  # keep it in flight while the others start
                return super()._predict_endpoint(audio)
            finally:
                with lock:
                    running -= 1

    analyzers = [Counting(sample_rate=RATE) for _ in range(k)]
    for analyzer in analyzers:
        analyzer.set_sample_rate(RATE)
        for i in range(0, len(speech) - 320 + 1, 320):
            analyzer.append_audio(speech[i : i + 320], is_speech=True)
    results = await asyncio.gather(*(a.analyze_end_of_turn() for a in analyzers))
    assert all(metrics is not None for _, metrics in results)
    assert most == min(k, cores) and smart_turn_executor()._max_workers == cores


def test_turn_predictions_yield_the_cores_to_the_event_loop() -> None:
    """Smart Turn's threads run `SMART_TURN_NICE` under the process (Linux), so when many
    turns end together the event loop, which paces every call's audio, is not starved."""
    tids = [smart_turn_executor().submit(threading.get_native_id).result() for _ in range(4)]
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for tid in set(tids):
        assert os.getpriority(os.PRIO_PROCESS, tid) >= min(19, ours + SMART_TURN_NICE)


def _cpu_of_threads_python_does_not_know() -> float:
    """CPU seconds so far of this process's native-only threads (OpenBLAS's workers, say):
    every thread in /proc that no Python thread runs on."""
    python_threads = {thread.native_id for thread in threading.enumerate()}
    ticks = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in python_threads:
            continue
        with contextlib.suppress(OSError):  # a thread that just ended
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread CPU from /proc")
def test_turn_predictions_leave_no_blas_thread_spinning() -> None:
    """NumPy's OpenBLAS is kept on the calling thread once Smart Turn's threads exist: its
    own worker thread spun after every mel-filter product, more than doubling a
    prediction's CPU (measured: ~125 ms instead of ~57 ms per prediction)."""
    executor = smart_turn_executor()
    blas = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    assert blas and set(blas) == {1}, blas
    analyzer = SharedSmartTurnAnalyzer(sample_rate=16000)
    audio = (np.random.default_rng(0).standard_normal(16000 * 3) * 0.1).astype(np.float32)

    def predict(_: int) -> float:
        started = time.thread_time()
        compat.predict_endpoint(analyzer, audio)
        time.sleep(0.05)  # as turns come: the worker would spin in the gaps
        return time.thread_time() - started

    native_before = _cpu_of_threads_python_does_not_know()
    predicting = sum(executor.map(predict, range(12)))
    beside = _cpu_of_threads_python_does_not_know() - native_before
    assert beside < 0.25 * predicting, (beside, predicting)
