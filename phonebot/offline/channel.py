"""Simulated telephone channel (8 kHz G.711 mu-law) for offline benchmarks and tests.

Kept here, next to the offline engines, so the benchmark and tests can push synthetic speech
through the same degradation a Twilio call applies without depending on the transport code.
The codec is vectorised numpy, bit-exact with the standard G.711 tables (and with the
deprecated ``audioop``, which Python 3.13 removes).
"""

from __future__ import annotations

import numpy as np

from phonebot.offline.espeak import resample_pcm

__all__ = ["PHONE_SAMPLE_RATE", "phone_channel", "ulaw_decode", "ulaw_encode"]

PHONE_SAMPLE_RATE = 8000
_BIAS = 0x84
_CLIP = 8159  # 14-bit magnitude limit


def ulaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian PCM -> G.711 mu-law bytes (one byte per sample).

    Follows the reference (Sun g711.c / audioop) integer algorithm on 14-bit samples, so the
    output matches what telephony stacks produce byte for byte.
    """
    x = np.frombuffer(pcm[: len(pcm) & ~1], dtype="<i2").astype(np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(x), _CLIP) + (_BIAS >> 2)
    segment = np.floor(np.log2(magnitude)).astype(np.int32) - 5
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    code = np.where(segment > 7, 0x7F, (segment << 4) | mantissa)  # full scale saturates
    return (code ^ mask).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> bytes:
    """G.711 mu-law bytes -> 16-bit little-endian PCM."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + _BIAS) << exponent) - _BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype("<i2").tobytes()


def phone_channel(pcm: bytes, sample_rate: int) -> bytes:
    """What the far end hears: resample to 8 kHz, then a mu-law encode/decode round trip."""
    return ulaw_decode(ulaw_encode(resample_pcm(pcm, sample_rate, PHONE_SAMPLE_RATE)))
