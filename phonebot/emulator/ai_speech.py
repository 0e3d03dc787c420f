"""A speech-like test signal for the AI API emulator's TTS, built once and sliced per request.

Under load (100 concurrent calls) the emulator must not synthesise anything per request, yet
VAD, echo and level checks downstream must hear speech, not silence or a pure tone. So one
MAX_SPEECH_S signal of voiced, vowel-like syllables is generated once, and every reply is a
zero-copy prefix of it, cut on a syllable boundary (where the envelope is silent).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 24000  # OpenAI TTS `pcm`: 24 kHz, 16-bit little-endian, mono
SECONDS_PER_CHAR = 0.065
MAX_SPEECH_S = 8.0
SYLLABLE_S = 0.2


@lru_cache(maxsize=1)
def speech_master() -> bytes:
    """MAX_SPEECH_S of syllables, ~0.3 s of numpy work done once per process.

    A harmonic series on a wandering ~130 Hz pitch, shaped by per-syllable formants and a
    syllable-rate envelope (with word gaps): Silero VAD rates ~80% of its frames as speech.
    """
    rng = np.random.default_rng(7)
    per_syllable = int(SYLLABLE_S * SAMPLE_RATE)
    count = int(MAX_SPEECH_S / SYLLABLE_S)
    x = np.tile(np.arange(per_syllable) / per_syllable, count)
    index = np.repeat(np.arange(count), per_syllable)
    word_end = (np.arange(count) % 3 == 2)[index]  # every third syllable trails off
    envelope = np.sin(np.pi * np.minimum(x / np.where(word_end, 0.7, 1.0), 1.0)) ** 1.5
    f0 = np.repeat(rng.uniform(105, 150, count), per_syllable)
    f0 = np.convolve(f0, np.ones(1200) / 1200, mode="same")  # glide between syllables
    vowels = np.array([(750, 1200), (500, 1900), (300, 2300), (500, 900), (350, 800)])
    f1, f2 = vowels[rng.integers(0, len(vowels), count)][index].T
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    signal = np.zeros_like(phase)
    for k in range(1, 30):
        freq = k * f0
        gain = np.exp(-(((freq - f1) / 150) ** 2)) + 0.6 * np.exp(-(((freq - f2) / 220) ** 2))
        signal += (gain + 0.03) / k**0.5 * np.sin(k * phase)
    signal *= envelope
    signal *= 0.5 / np.max(np.abs(signal))
    return (signal * 32767).astype("<i2").tobytes()


def speech_pcm(text: str) -> memoryview:
    """~65 ms per character of cached speech, rounded to whole syllables (no copy)."""
    seconds = min(len(text.strip()) * SECONDS_PER_CHAR, MAX_SPEECH_S)
    syllables = max(1, round(seconds / SYLLABLE_S))
    return memoryview(speech_master())[: syllables * int(SYLLABLE_S * SAMPLE_RATE) * 2]
