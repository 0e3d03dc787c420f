"""Offline speech engines: espeak-ng (the fallback voice), the G.711 codec, and the offline
voice heard by the offline recogniser.

The recogniser itself (Whisper) is tested in tests/test_offline_stt.py, Piper's voice in
tests/test_offline_tts.py.
"""

from __future__ import annotations

import audioop
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pipecat.frames.frames import (
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from phonebot.ai.offline.espeak import synthesize, synthesize_at, voice_for_language
from phonebot.ai.offline.stt import normalize_transcript, transcribe
from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.audio import pcm16_to_ulaw as ulaw_encode
from phonebot.audio import ulaw_to_pcm16 as ulaw_decode


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
    heard = normalize_transcript(transcribe(pcm, 8000))
    assert heard == "i'd like to book an appointment", heard


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
