"""Process-wide ONNX sessions (phonebot.ai.inference): shared models, per-call state, same results.

Each call's VAD and Smart Turn analyzer must behave exactly like Pipecat's own, one session per
analyzer, would; only the session (the ~38 MB of model and arena per call) is shared.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
import pytest
from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer

from phonebot import pipecat_compat as compat
from phonebot.ai.inference import (
    SharedSileroVADAnalyzer,
    SharedSmartTurnAnalyzer,
    load_shared_models,
    sessions,
    silero_session,
    smart_turn_session,
)
from phonebot.ai.offline.espeak import synthesize_at
from phonebot.call.turns import user_turn_params
from tests.conftest import make_settings

RATE = 8000
WINDOW_BYTES = 512  # Silero's 256-sample window at 8 kHz
FRAME_BYTES = 320  # 20 ms, what the transport delivers


def _speech() -> bytes:
    """~5 s of speech with a pause, long enough for Silero's 2 s state resets to happen."""
    words = synthesize_at("What are your opening hours? I would like to book a table.", RATE)
    return words + bytes(RATE * 2) + words


def _noise(length: int) -> bytes:
    """Quiet line noise: the other caller, who says nothing."""
    rng = np.random.default_rng(7)
    return (rng.standard_normal(length // 2) * 200).astype(np.int16).tobytes()


def _chunks(pcm: bytes, size: int) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


def _vad(cls: type[SileroVADAnalyzer]) -> SileroVADAnalyzer:
    analyzer = cls(sample_rate=RATE)
    analyzer.set_sample_rate(RATE)
    return analyzer


def _scalar(confidence: object) -> float:
    """Silero's confidence comes back as a one-element array."""
    return float(np.asarray(confidence).reshape(-1)[0])


def _recorded(analyzer: SileroVADAnalyzer) -> list[float]:
    """Every confidence the analyzer computes from now on (its state machine included)."""
    confidences: list[float] = []
    compute = analyzer.voice_confidence

    def record(buffer: bytes) -> float:
        confidence = compute(buffer)
        confidences.append(_scalar(confidence))
        return confidence

    analyzer.voice_confidence = record  # type: ignore[method-assign]
    return confidences


def _confidences(analyzer: SileroVADAnalyzer, pcm: bytes) -> list[float]:
    return [_scalar(analyzer.voice_confidence(w)) for w in _chunks(pcm, WINDOW_BYTES)]


def _turn(cls: type[LocalSmartTurnAnalyzerV3]) -> LocalSmartTurnAnalyzerV3:
    analyzer = cls(sample_rate=RATE)
    analyzer.set_sample_rate(RATE)
    return analyzer


def _float_audio(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


def test_every_analyzer_runs_on_the_one_session() -> None:
    vads = [SharedSileroVADAnalyzer(), SharedSileroVADAnalyzer()]
    turns = [SharedSmartTurnAnalyzer(), SharedSmartTurnAnalyzer()]
    models = [compat.silero_model(vad) for vad in vads]
    assert models[0].session is models[1].session is silero_session()
    sessions = [compat.smart_turn_session(turn) for turn in turns]
    assert sessions[0] is sessions[1] is smart_turn_session()
    # ...while the recurrent state lives in a wrapper of each call's own.
    assert models[0] is not models[1]
    assert models[0].state is not models[1].state


def test_a_call_loads_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """user_turn_params (run for every call) uses the shared sessions, loading nothing."""
    load_shared_models()
    loaded: list[object] = []
    real = onnxruntime.InferenceSession

    def counting(*args: object, **kwargs: object) -> onnxruntime.InferenceSession:
        loaded.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    params = user_turn_params(make_settings())
    turn_analyzer = compat.stop_strategy_turn_analyzer(params.user_turn_strategies.stop[0])
    assert loaded == []
    assert compat.silero_model(params.vad_analyzer).session is silero_session()
    assert compat.smart_turn_session(turn_analyzer) is smart_turn_session()
    SileroVADAnalyzer()  # the probe works: Pipecat's own analyzer does load a session
    assert len(loaded) == 1


async def test_vad_state_stays_per_call() -> None:
    """Two calls on one session, fed alternately, score exactly as two Pipecat analyzers."""
    speech = _chunks(_speech(), FRAME_BYTES)
    noise = _chunks(_noise(len(speech) * FRAME_BYTES), FRAME_BYTES)
    talker, quiet = _vad(SharedSileroVADAnalyzer), _vad(SharedSileroVADAnalyzer)
    heard_talker, heard_quiet = _recorded(talker), _recorded(quiet)
    talker_states = []
    for a, b in zip(speech, noise, strict=True):
        talker_states.append(await talker.analyze_audio(a))
        await quiet.analyze_audio(b)

    # Pipecat's own analyzers, each fed its stream alone.
    reference_talker, reference_quiet = _vad(SileroVADAnalyzer), _vad(SileroVADAnalyzer)
    expected_talker, expected_quiet = _recorded(reference_talker), _recorded(reference_quiet)
    expected_states = [await reference_talker.analyze_audio(a) for a in speech]
    for b in noise:
        await reference_quiet.analyze_audio(b)

    assert max(heard_talker) > 0.9 and max(heard_quiet) < 0.2  # speech vs. no speech
    np.testing.assert_allclose(heard_talker, expected_talker, rtol=0, atol=1e-6)
    np.testing.assert_allclose(heard_quiet, expected_quiet, rtol=0, atol=1e-6)
    assert talker_states == expected_states


def test_smart_turn_predicts_like_pipecat() -> None:
    ours, pipecats = _turn(SharedSmartTurnAnalyzer), _turn(LocalSmartTurnAnalyzerV3)
    for text in ("I would like to book a table for tomorrow.", "I would like to"):
        audio = _float_audio(synthesize_at(text, RATE))
        mine = compat.predict_endpoint(ours, audio)
        theirs = compat.predict_endpoint(pipecats, audio)
        assert mine["prediction"] == theirs["prediction"]
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-6)


async def test_smart_turn_end_of_turn_like_pipecat() -> None:
    """Pipecat's own buffering and threading path, end to end, on both analyzers."""
    speech = synthesize_at("Can I book a table for two people tonight?", RATE)
    results = []
    for analyzer in (_turn(SharedSmartTurnAnalyzer), _turn(LocalSmartTurnAnalyzerV3)):
        for chunk in _chunks(speech, FRAME_BYTES):
            analyzer.append_audio(chunk, is_speech=True)
        for chunk in _chunks(bytes(RATE // 5 * 2), FRAME_BYTES):  # 200 ms of silence
            analyzer.append_audio(chunk, is_speech=False)
        state, metrics = await analyzer.analyze_end_of_turn()
        results.append((state, metrics.probability))
        await analyzer.cleanup()
    (state, probability), (expected_state, expected_probability) = results
    assert state == expected_state
    assert probability == pytest.approx(expected_probability, abs=1e-6)


async def test_smart_turn_threads_are_shared_and_survive_a_calls_cleanup() -> None:
    first, second = _turn(SharedSmartTurnAnalyzer), _turn(SharedSmartTurnAnalyzer)
    assert first._model_executor is second._model_executor
    assert first._model_executor._max_workers <= (os.cpu_count() or 1)
    await first.cleanup()  # one call ends...
    for chunk in _chunks(synthesize_at("Hello there.", RATE), FRAME_BYTES):
        second.append_audio(chunk, is_speech=True)
    state, metrics = await second.analyze_end_of_turn()  # ...another goes on
    assert state in (EndOfTurnState.COMPLETE, EndOfTurnState.INCOMPLETE) and metrics


def test_concurrent_calls_get_their_own_results() -> None:
    """Many threads on the one session at once: each result is what it is alone."""
    speech = _speech()
    expected_vad = _confidences(_vad(SileroVADAnalyzer), speech)
    texts = ["Yes please.", "I would like to", "What are your opening hours?", "Goodbye."]
    audios = [_float_audio(synthesize_at(t, RATE)) for t in texts]
    pipecats = _turn(LocalSmartTurnAnalyzerV3)
    expected_turn = [compat.predict_endpoint(pipecats, a)["probability"] for a in audios]

    def one_call(n: int) -> tuple[list[float], float]:
        vad = _confidences(_vad(SharedSileroVADAnalyzer), speech)
        turn = compat.predict_endpoint(_turn(SharedSmartTurnAnalyzer), audios[n % len(audios)])
        return vad, turn["probability"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_call, range(8)))
    for n, (vad, probability) in enumerate(results):
        np.testing.assert_allclose(vad, expected_vad, rtol=0, atol=1e-6)
        assert probability == pytest.approx(expected_turn[n % len(audios)], abs=1e-6)


def test_the_shared_model_is_built_once_when_calls_start_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "_templates", {})
    built: list[object] = []

    class SlowToLoad:
        def __init__(self) -> None:
            built.append(self)
            time.sleep(0.05)  # like loading a model: wide open to a race

    start = threading.Barrier(8)

    def get() -> object:
        start.wait()
        return sessions._template(SlowToLoad)

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: get(), range(8)))
    assert len(built) == 1
    assert all(g is built[0] for g in got)


def test_pipecat_analyzers_have_no_attribute_we_miss() -> None:
    """Our constructors replace Pipecat's: every attribute Pipecat sets must exist on ours."""
    extra = set(vars(SharedSileroVADAnalyzer())) - set(vars(SileroVADAnalyzer()))
    assert extra == {"_vad_batcher", "_batched_confidence", "_vad_idle_since"}
    assert set(vars(SileroVADAnalyzer())) <= set(vars(SharedSileroVADAnalyzer()))
    assert set(vars(LocalSmartTurnAnalyzerV3())) == set(vars(SharedSmartTurnAnalyzer()))
