"""How soon the Silero VAD hears a caller barging in, and whether noise fools it.

Feeds phone audio (espeak phrases and synthetic line noise, through 8 kHz μ-law, in the
server's 60 ms inbound batches) to the VAD exactly as a call's user aggregator does, with
Pipecat's default parameters and with ours (`phonebot.call.barge_in.vad_params`), and prints
when speech is confirmed after its onset, or that it never was (noise must never be):

    .venv/bin/python bench/barge_in_vad.py

The end-to-end figure (caller onset → `clear` on the wire) is what
`tests/test_calls.py::test_talking_over_the_bot_clears_twilio_playback` checks; this
isolates the VAD's share of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipecat.audio.vad.vad_analyzer import VADParams, VADState  # noqa: E402

from phonebot.ai.inference import SharedSileroVADAnalyzer  # noqa: E402
from phonebot.ai.offline.espeak import synthesize_at  # noqa: E402
from phonebot.audio import ulaw_decode, ulaw_encode  # noqa: E402
from phonebot.call.barge_in import vad_params  # noqa: E402
from phonebot.config import Settings  # noqa: E402
from phonebot.pipecat_compat import run_silero  # noqa: E402
from phonebot.twilio.transport import INBOUND_BATCH_MS  # noqa: E402

RATE = 8000
LEAD_S = 0.5
PHRASES = ("wait wait I have a question", "hello", "stop", "excuse me", "no that's wrong")


def phone_line(samples: np.ndarray) -> np.ndarray:
    """What the server decodes: 16-bit audio through Twilio's 8 kHz μ-law."""
    return ulaw_decode(ulaw_encode(np.clip(samples, -32768, 32767).astype(np.int16)))


def speech_at(text: str) -> tuple[np.ndarray, float]:
    """`text` after LEAD_S of silence, and its onset (first sample over 5 % of the peak)."""
    voice = np.frombuffer(synthesize_at(text, RATE), dtype=np.int16).astype(np.float64)
    onset = int(np.argmax(np.abs(voice) > 0.05 * np.abs(voice).max()))
    return phone_line(np.concatenate([np.zeros(int(LEAD_S * RATE)), voice])), LEAD_S + onset / RATE


def noises(seed: int = 1) -> dict[str, np.ndarray]:
    """Steady line hiss, and hiss with a cough-like burst (broadband, fast decay)."""
    rng = np.random.default_rng(seed)
    out = {}
    for rms in (100, 300, 1000):
        out[f"hiss rms {rms}"] = phone_line(rng.normal(0, rms, 3 * RATE))
    for seconds in (0.1, 0.2, 0.3):
        n = int(seconds * RATE)
        burst = rng.normal(0, 8000, n) * np.exp(-np.linspace(0, 4, n))
        line = rng.normal(0, 300, int(2 * RATE))
        line[int(LEAD_S * RATE) : int(LEAD_S * RATE) + n] += burst
        out[f"cough {seconds:g} s over hiss"] = phone_line(line)
    return out


def confirmed_at(samples: np.ndarray, params: VADParams) -> float | None:
    """When the VAD first reports SPEAKING (end of the batch that confirmed it), or None."""
    vad = SharedSileroVADAnalyzer(sample_rate=RATE, params=params)
    vad.set_sample_rate(RATE)
    batch = INBOUND_BATCH_MS * RATE // 1000
    pcm = samples.astype(np.int16).tobytes()
    for start in range(0, len(samples), batch):
        if run_silero(vad, pcm[start * 2 : (start + batch) * 2]) == VADState.SPEAKING:
            return (start + batch) / RATE
    return None


def main() -> None:
    configs = {"pipecat default": VADParams(), "phonebot": vad_params(Settings())}
    for name, params in configs.items():
        print(f"== {name}: {params}")
        delays = []
        for text in PHRASES:
            samples, onset = speech_at(text)
            at = confirmed_at(samples, params)
            delay = None if at is None else at - onset
            delays.append(delay)
            shown = "never" if delay is None else f"{delay * 1000:.0f} ms"
            print(f"  speech {text!r:32} confirmed {shown} after onset")
        for label, samples in noises().items():
            at = confirmed_at(samples, params)
            print(f"  noise  {label:32} {'no speech' if at is None else f'SPEECH at {at:.2f} s'}")
        heard = [d for d in delays if d is not None]
        if heard:
            print(f"  median {np.median(heard) * 1000:.0f} ms, max {max(heard) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
