"""Simulated telephone channel (8 kHz G.711 mu-law) for offline benchmarks and tests.

Lets the benchmark and tests push synthetic speech through the same degradation a Twilio
call applies, with the project's one G.711 codec and resampler (`phonebot.audio`).
"""

from __future__ import annotations

from phonebot.audio import TWILIO_SAMPLE_RATE, pcm16_to_ulaw, resample_pcm16, ulaw_to_pcm16

__all__ = ["PHONE_SAMPLE_RATE", "phone_channel"]

PHONE_SAMPLE_RATE = TWILIO_SAMPLE_RATE


def phone_channel(pcm: bytes, sample_rate: int) -> bytes:
    """What the far end hears: resample to 8 kHz, then a mu-law encode/decode round trip."""
    return ulaw_to_pcm16(pcm16_to_ulaw(resample_pcm16(pcm, sample_rate, PHONE_SAMPLE_RATE)))
