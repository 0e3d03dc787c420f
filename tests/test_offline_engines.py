"""Offline speech engines: espeak-ng TTS, pocketsphinx STT and the simulated phone channel.

Assertions on recognised speech name key words only: espeak-ng output varies slightly from call
to call, and pocketsphinx on band-limited synthetic speech still swaps a short word now and then,
even with a vocabulary. The key words used here were recognised in 40 of 40 trials.
"""

from __future__ import annotations

import asyncio
import audioop
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from unittest.mock import AsyncMock

import numpy as np
import pytest
from pipecat.frames.frames import (
    InputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSUpdateSettingsFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.tests.utils import SleepFrame, run_test

from phonebot.ai.offline import stt
from phonebot.ai.offline.channel import phone_channel
from phonebot.ai.offline.espeak import synthesize, synthesize_at, voice_for_language
from phonebot.ai.offline.stt import (
    OfflineSTTService,
    normalize_transcript,
    squeeze_silence,
    transcribe,
    vocabulary_words,
)
from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.audio import pcm16_to_ulaw as ulaw_encode
from phonebot.audio import ulaw_to_pcm16 as ulaw_decode

PHRASES = [
    "I'd like to book an appointment",
    "What are your opening hours?",
    "Yes, please.",
    "I want to speak to a person",
    "My order has not arrived",
    "Thank you, goodbye",
]


def _rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def test_synthesize_returns_audible_speech_of_plausible_length() -> None:
    pcm, rate = synthesize("What are your opening hours?")
    seconds = len(pcm) / 2 / rate
    assert rate == 22050
    assert 1.0 < seconds < 4.0
    assert _rms(pcm) > 500


def test_synthesize_handles_blank_text_rate_and_unknown_voice() -> None:
    assert synthesize("   ")[0] == b""
    slow, _ = synthesize("one two three four five", rate_wpm=120)
    fast, _ = synthesize("one two three four five", rate_wpm=300)
    assert len(fast) < len(slow)
    with pytest.raises(ValueError):
        synthesize("hello", voice="no-such-voice")


def test_synthesize_is_safe_from_many_threads() -> None:
    texts = [f"Order number {n}" for n in range(24)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda t: synthesize(t)[0], texts))
    assert all(len(pcm) > 22050 for pcm in results)  # each well over half a second


def test_synthesize_at_resamples_to_the_phone_rate() -> None:
    pcm, rate = synthesize("Yes, please.")
    phone = synthesize_at("Yes, please.", 8000)
    assert abs(len(phone) / 2 / 8000 - len(pcm) / 2 / rate) < 0.05


@pytest.mark.parametrize(
    ("language", "voice"),
    [("en", "en-us"), ("en-GB", "en-gb"), ("es", "es"), ("pt_BR", "pt-br"), ("xx", "en-us")],
)
def test_voice_for_language(language: str, voice: str) -> None:
    assert voice_for_language(language) == voice


def test_ulaw_codec_matches_the_reference_implementation() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16).tobytes()
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)
    assert ulaw_decode(bytes(range(256))) == audioop.ulaw2lin(bytes(range(256)), 2)


def test_normalize_transcript_spells_numbers_like_espeak() -> None:
    assert normalize_transcript("A table for 2 at 7:30, please!") == (
        "a table for two at seven thirty please"
    )
    assert normalize_transcript("It’s 1,500 or 105") == (
        "it's one thousand five hundred or one hundred five"
    )


def test_vocabulary_words_reports_unknown_words() -> None:
    known, unknown = vocabulary_words(["Call Zorblax now"])
    assert known == ["call", "now"]
    assert unknown == ["zorblax"]


def test_tts_over_phone_line_is_recognised_with_vocabulary() -> None:
    pcm, rate = synthesize("What are your opening hours?")
    heard = transcribe(phone_channel(pcm, rate), 8000, vocabulary=PHRASES)
    assert {"opening", "hours"} <= set(heard.split())


def test_transcribe_tolerates_silence_and_unknown_vocabulary() -> None:
    assert transcribe(b"", 8000) == ""
    assert transcribe(bytes(8000), 8000, vocabulary=PHRASES) == ""
    # No word of this vocabulary is in the dictionary: falls back to the general model.
    assert isinstance(transcribe(synthesize_at("hello", 8000), 8000, vocabulary=["Zorblax"]), str)


@pytest.mark.asyncio
async def test_offline_tts_service_in_a_pipeline() -> None:
    down, _ = await run_test(
        OfflineTTSService(language="en", chunk_ms=20),
        frames_to_send=[TTSSpeakFrame("I'd like to book an appointment.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=8000),
    )
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert any(isinstance(f, TTSStartedFrame) for f in down)
    assert any(isinstance(f, TTSStoppedFrame) for f in down)
    assert audio and all(f.sample_rate == 8000 and len(f.audio) <= 320 for f in audio)
    pcm = b"".join(f.audio for f in audio)
    assert 1.0 < len(pcm) / 2 / 8000 < 4.0
    assert {"book", "appointment"} <= set(transcribe(pcm, 8000, vocabulary=PHRASES).split())


@pytest.mark.asyncio
async def test_offline_stt_service_in_a_pipeline() -> None:
    # No worker running yet: starting them (1-3 s) must not hold up the pipeline's start,
    # which run_test allows 1 s.
    stt.shutdown_decoder_pool()
    speech = phone_channel(*synthesize("My order has not arrived"))
    frame_bytes = 320  # 20 ms at 8 kHz
    audio_frames = [
        InputAudioRawFrame(audio=speech[i : i + frame_bytes], sample_rate=8000, num_channels=1)
        for i in range(0, len(speech), frame_bytes)
    ]
    down, _ = await run_test(
        OfflineSTTService(vocabulary=PHRASES),
        frames_to_send=[
            VADUserStartedSpeakingFrame(),
            *audio_frames,
            VADUserStoppedSpeakingFrame(),
            SleepFrame(sleep=0.5),
        ],
        pipeline_params=PipelineParams(audio_in_sample_rate=8000),
    )
    transcripts = [f for f in down if isinstance(f, TranscriptionFrame)]
    assert len(transcripts) == 1
    assert {"order", "arrived"} <= set(transcripts[0].text.split())
    assert transcripts[0].timestamp


async def test_the_service_starts_without_waiting_for_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers take 1-3 s to start: a call (and its greeting) must not wait for them."""
    never = Future()  # a worker start that never ends
    monkeypatch.setattr(stt, "_submit", lambda *args, **kwargs: (None, never))
    monkeypatch.setattr(SegmentedSTTService, "start", AsyncMock())  # Pipecat's part
    await asyncio.wait_for(OfflineSTTService(vocabulary=PHRASES).start(StartFrame()), 0.5)
    assert not never.done()  # the warm-up was handed to the (never starting) pool


@pytest.mark.asyncio
async def test_offline_tts_language_update_switches_voice() -> None:
    tts = OfflineTTSService()
    await run_test(
        tts,
        frames_to_send=[
            TTSUpdateSettingsFrame(delta=OfflineTTSService.Settings(language="es")),
            TTSSpeakFrame("Hola, buenos días."),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=8000),
    )
    assert tts._settings.voice == "es"


def test_a_transcript_does_not_depend_on_what_the_decoder_heard_before() -> None:
    """Decoders are shared by calls: one call's audio must not change another's transcript.

    The decoder's score is compared too: it moves with any carried-over state, where the
    text changes only for borderline audio.
    """
    vocabulary = [*PHRASES, "history check"]  # a decoder of this test's own
    speech = [phone_channel(*synthesize(p)) for p in PHRASES[:3]]
    decoder = stt._get_decoder(vocabulary).decoder

    def heard(pcm: bytes) -> tuple[str, float]:
        return transcribe(pcm, 8000, vocabulary=vocabulary), decoder.hyp().best_score

    first = heard(speech[0])
    heard(speech[1])
    heard(speech[2])
    assert heard(speech[0]) == first


def test_squeeze_silence_trims_long_silences_and_pads_short_ones() -> None:
    speech = synthesize_at("Yes, please.", 8000)
    padded = bytes(16000) + speech + bytes(16000)  # 1 s of silence either side
    squeezed = squeeze_silence(padded, 8000)
    # At most 0.15 s of silence survives on each side (espeak's own end pause is cut too).
    assert len(speech) - 16000 < len(squeezed) < len(speech) + 2 * 0.15 * 16000 + 320
    assert squeeze_silence(bytes(16000), 8000) == b""


# ------------------------------------------------------------- decoding in worker processes


def _long_speech() -> bytes:
    """~8 s of phone audio: a decode long enough (0.3-0.5 s) to stall a loop it blocks."""
    return b"".join(phone_channel(*synthesize(phrase)) for phrase in PHRASES)


async def _max_loop_gap(work: Awaitable[object]) -> tuple[float, float]:
    """Run ``work`` beside a 10 ms ticker: (longest tick gap, duration of the work) in s."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await work
    duration = time.perf_counter() - started
    done.set()
    await ticker
    return max(gaps), duration


async def test_decoding_in_a_worker_keeps_the_event_loop_responsive() -> None:
    """pocketsphinx holds the GIL while decoding: in a thread (the old asyncio.to_thread) this
    decode stalled the loop for 0.15-0.3 s, which is every call's audio pacing."""
    await stt.start_decoder_pool(PHRASES)
    gap, duration = await _max_loop_gap(
        stt.transcribe_in_worker(_long_speech(), 8000, vocabulary=PHRASES)
    )
    assert duration > 0.1, "the decode must be long enough to have stalled the loop"
    assert gap < 0.05


async def test_worker_decoding_equals_in_process_decoding() -> None:
    await stt.start_decoder_pool(PHRASES)
    assert len(stt._decoder_pool()._processes) == min(2, os.cpu_count() or 1)
    speech = [phone_channel(*synthesize(p)) for p in PHRASES[:3]] + [bytes(8000)]
    in_worker = [await stt.transcribe_in_worker(s, 8000, vocabulary=PHRASES) for s in speech]
    assert in_worker == [transcribe(s, 8000, vocabulary=PHRASES) for s in speech]
    assert in_worker[-1] == "" and all(in_worker[:-1])


async def test_dead_workers_fail_the_decode_in_flight_and_the_next_gets_a_new_pool() -> None:
    await stt.start_decoder_pool(PHRASES)
    pool = stt._decoder_pool()
    in_flight = asyncio.ensure_future(
        stt.transcribe_in_worker(_long_speech(), 8000, vocabulary=PHRASES)
    )
    await asyncio.sleep(0.05)  # submitted (a 0.3-0.5 s decode)
    for pid in pool._processes:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        await in_flight
    heard = await stt.transcribe_in_worker(
        phone_channel(*synthesize("Yes, please.")), 8000, vocabulary=PHRASES
    )
    assert "please" in heard.split()
    assert stt._decoder_pool() is not pool


async def test_workers_dead_while_idle_cost_no_request() -> None:
    await stt.start_decoder_pool(PHRASES)
    pool = stt._decoder_pool()
    for pid in pool._processes:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not pool._broken and time.monotonic() < deadline:  # the pool notices the deaths
        await asyncio.sleep(0.05)
    heard = await stt.transcribe_in_worker(
        phone_channel(*synthesize("Yes, please.")), 8000, vocabulary=PHRASES
    )
    assert "please" in heard.split()
    assert stt._decoder_pool() is not pool


_EXIT_SCRIPT = """
import asyncio, os, signal, sys
from phonebot.ai.offline import stt

async def main():
    await stt.start_decoder_pool(["yes please"])
    print(*stt._decoder_pool()._processes, flush=True)
    # A decode still running when the server exits...
    asyncio.get_running_loop().create_task(
        stt.transcribe_in_worker(bytes(160000), 8000, vocabulary=["yes please"]))
    await asyncio.sleep(0)
    if sys.argv[1] == "killed":  # ...or is killed, with no chance to stop its workers.
        os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    """Running (an exited worker may linger as a zombie if nothing reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _run_server_like(tmp_path: Path, ending: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run _EXIT_SCRIPT as a main module (as server.py is): its result and its workers."""
    script = tmp_path / "exit_with_pool.py"
    script.write_text(_EXIT_SCRIPT)
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, str(script), ending],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == min(2, os.cpu_count() or 1), done.stderr
    return done, workers


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_the_pool_shuts_down_cleanly_at_exit(tmp_path: Path) -> None:
    done, workers = _run_server_like(tmp_path, "exits")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert _wait_gone(workers, timeout=2) == []


def test_workers_do_not_outlive_a_killed_server(tmp_path: Path) -> None:
    done, workers = _run_server_like(tmp_path, "killed")
    assert done.returncode == -signal.SIGKILL
    assert _wait_gone(workers) == []
