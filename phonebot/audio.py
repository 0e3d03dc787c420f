"""Telephone audio helpers: G.711 μ-law, resampling, loudness, WAV in and out.

Twilio carries 8 kHz G.711 μ-law. The codec is the one Pipecat's `ulaw_to_pcm` and
`pcm_to_ulaw` run underneath: `audioop` (the standard library's up to Python 3.12, the
`audioop-lts` package Pipecat depends on from 3.13). Pipecat's functions are async and
resample in the same call; the offline engines, the emulator and the channel simulation
need a plain synchronous conversion at one rate, so they call `audioop` directly.

PCM throughout is signed 16-bit little-endian mono unless a name says otherwise.
"""

from __future__ import annotations

import math
import sys
import warnings
import wave
from pathlib import Path

import numpy as np
import soxr

with warnings.catch_warnings():
    # Deprecated in 3.11-3.12 (removed in 3.13, where audioop-lts provides the module);
    # Pipecat imports it too, so this only keeps the warning off our own import line.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

TWILIO_SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = TWILIO_SAMPLE_RATE * FRAME_MS // 1000  # 160 samples = 160 μ-law bytes

# Frame RMS (int16 units) under which audio counts as silence: about -47 dBFS, well under
# speech (hundreds to thousands) and well over μ-law idle noise (0..~10).
SILENCE_RMS = 150.0

ULAW_SILENCE = audioop.lin2ulaw(bytes(2), 2)[0]  # 0xFF
# audioop works on native-endian samples; our PCM is little-endian.
_NATIVE_LE = sys.byteorder == "little"


def pcm16_to_array(pcm: bytes | bytearray | memoryview) -> np.ndarray:
    """View 16-bit little-endian PCM bytes as an int16 array (copy-free where possible)."""
    data = bytes(pcm)
    if len(data) % 2:
        data = data[:-1]  # a stray half-sample cannot be decoded; dropping it beats raising
    return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)


def array_to_pcm16(samples: np.ndarray) -> bytes:
    """int16 (or float in [-1, 1]) array → 16-bit little-endian PCM bytes."""
    if np.issubdtype(samples.dtype, np.floating):
        samples = np.clip(np.round(samples * 32767.0), -32768, 32767)
    return np.asarray(samples, dtype="<i2").tobytes()


def ulaw_encode(samples: np.ndarray) -> np.ndarray:
    """int16 array → uint8 μ-law array."""
    samples = np.asarray(samples, dtype=np.int16)
    codes = audioop.lin2ulaw(samples.tobytes(), 2)  # native byte order, as audioop wants
    return np.frombuffer(bytearray(codes), dtype=np.uint8).reshape(samples.shape)


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 μ-law array → int16 array."""
    codes = np.asarray(codes, dtype=np.uint8)
    pcm = audioop.ulaw2lin(codes.tobytes(), 2)
    return np.frombuffer(bytearray(pcm), dtype=np.int16).reshape(codes.shape)


def pcm16_to_ulaw(pcm: bytes | bytearray | memoryview) -> bytes:
    """16-bit little-endian PCM bytes → μ-law bytes (same sample rate)."""
    data = bytes(pcm)
    if len(data) % 2:
        data = data[:-1]  # a stray half-sample cannot be encoded; dropping it beats raising
    if not _NATIVE_LE:
        data = audioop.byteswap(data, 2)
    return audioop.lin2ulaw(data, 2)


def ulaw_to_pcm16(ulaw: bytes | bytearray | memoryview) -> bytes:
    """μ-law bytes → 16-bit little-endian PCM bytes (same sample rate)."""
    pcm = audioop.ulaw2lin(bytes(ulaw), 2)
    return pcm if _NATIVE_LE else audioop.byteswap(pcm, 2)


def resample_array(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample an int16 array with soxr (high quality, whole-buffer, no stream state)."""
    if from_rate == to_rate or samples.size == 0:
        return samples.astype(np.int16, copy=True)
    return soxr.resample(samples.astype(np.int16), from_rate, to_rate).astype(np.int16)


def resample_pcm16(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Resample 16-bit PCM bytes between sample rates: the project's one resampler."""
    if from_rate == to_rate:
        return bytes(pcm)
    return array_to_pcm16(resample_array(pcm16_to_array(pcm), from_rate, to_rate))


def rms(samples: np.ndarray | bytes) -> float:
    """Root mean square of int16 samples (array or PCM bytes); 0.0 for empty input."""
    array = pcm16_to_array(samples) if isinstance(samples, (bytes, bytearray)) else samples
    if array.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(array.astype(np.float64)))))


def rms_dbfs(samples: np.ndarray | bytes) -> float:
    """RMS in dB relative to int16 full scale; -inf for digital silence."""
    value = rms(samples)
    return 20.0 * math.log10(value / 32768.0) if value > 0 else float("-inf")


def is_silent(samples: np.ndarray | bytes, threshold: float = SILENCE_RMS) -> bool:
    """True when the RMS is under `threshold` (int16 units)."""
    return rms(samples) < threshold


def silence(seconds: float, sample_rate: int = TWILIO_SAMPLE_RATE) -> bytes:
    """Digital silence as 16-bit PCM bytes."""
    return bytes(2 * round(seconds * sample_rate))


def tone(
    frequency: float,
    seconds: float,
    sample_rate: int = TWILIO_SAMPLE_RATE,
    amplitude: float = 0.3,
) -> bytes:
    """A sine tone as 16-bit PCM; handy stand-in for speech in tests."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return array_to_pcm16(amplitude * np.sin(2 * np.pi * frequency * t))


# A slow major arpeggio, each note fading in and out: calm, unmistakably "please hold", and
# made here (no music file to license or ship). Quiet, so the line doesn't shout at a caller.
HOLD_NOTES_HZ = (261.63, 329.63, 392.00, 523.25, 392.00, 329.63)
HOLD_NOTE_S = 0.5
HOLD_AMPLITUDE = 0.12


def hold_music(sample_rate: int = TWILIO_SAMPLE_RATE) -> bytes:
    """One loop (3 s) of the hold music a caller hears while the bot calls a person
    (phonebot.call.warm_transfer), as 16-bit PCM."""
    n = round(HOLD_NOTE_S * sample_rate)
    envelope = np.sin(np.pi * np.arange(n) / n) ** 2  # no clicks between notes
    t = np.arange(n) / sample_rate
    notes = [HOLD_AMPLITUDE * envelope * np.sin(2 * np.pi * hz * t) for hz in HOLD_NOTES_HZ]
    return array_to_pcm16(np.concatenate(notes))


def _wav_samples(raw: bytes, sample_width: int) -> np.ndarray:
    """Frames of a PCM WAV (8/16/24/32-bit) → float64 in [-1, 1), all channels interleaved."""
    if sample_width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if sample_width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    if sample_width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value & 0x800000, value - 0x1000000, value)
        return value.astype(np.float64) / 8388608.0
    if sample_width == 4:
        return np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0
    raise ValueError(f"unsupported WAV sample width: {sample_width} bytes")


def read_wav(path: str | Path, target_rate: int = TWILIO_SAMPLE_RATE) -> bytes:
    """Read a PCM WAV file as mono 16-bit PCM at `target_rate` (channels are averaged)."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width = wav.getnchannels(), wav.getsampwidth()
            rate, raw = wav.getframerate(), wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise ValueError(f"{path}: not a PCM WAV file ({error})") from None
    samples = _wav_samples(raw, width)
    mono = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
    pcm = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    return array_to_pcm16(resample_array(pcm, rate, target_rate))


def write_stereo_wav(
    path: str | Path, left: np.ndarray, right: np.ndarray, sample_rate: int = TWILIO_SAMPLE_RATE
) -> Path:
    """Write two int16 tracks as one stereo 16-bit WAV, zero-padding the shorter one."""
    length = max(len(left), len(right))
    stereo = np.zeros((length, 2), dtype="<i2")
    stereo[: len(left), 0] = left
    stereo[: len(right), 1] = right
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(target), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(stereo.tobytes())
    return target
