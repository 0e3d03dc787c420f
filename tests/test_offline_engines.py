"""Offline speech engines: espeak-ng TTS, pocketsphinx STT and the simulated phone channel.

Assertions on recognised speech name key words only: espeak-ng output varies slightly from call
to call, and pocketsphinx on band-limited synthetic speech still swaps a short word now and then,
even with a vocabulary. The key words used here were recognised in 40 of 40 trials.
"""

from __future__ import annotations

import audioop
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pipecat.frames.frames import (
    InputAudioRawFrame,
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
from pipecat.tests.utils import SleepFrame, run_test

from phonebot.audio import pcm16_to_ulaw as ulaw_encode
from phonebot.audio import ulaw_to_pcm16 as ulaw_decode
from phonebot.offline.channel import phone_channel
from phonebot.offline.espeak import synthesize, synthesize_at, voice_for_language
from phonebot.offline.stt import (
    OfflineSTTService,
    normalize_transcript,
    squeeze_silence,
    transcribe,
    vocabulary_words,
)
from phonebot.offline.tts import OfflineTTSService

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


def test_squeeze_silence_trims_long_silences_and_pads_short_ones() -> None:
    speech = synthesize_at("Yes, please.", 8000)
    padded = bytes(16000) + speech + bytes(16000)  # 1 s of silence either side
    squeezed = squeeze_silence(padded, 8000)
    # At most 0.15 s of silence survives on each side (espeak's own end pause is cut too).
    assert len(speech) - 16000 < len(squeezed) < len(speech) + 2 * 0.15 * 16000 + 320
    assert squeeze_silence(bytes(16000), 8000) == b""
