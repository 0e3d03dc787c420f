"""What the emulated caller does, as a list of steps run in order on the 20 ms clock.

While any step runs, a frame goes out every 20 ms (speech or silence), exactly as a real
phone line keeps streaming; the steps only decide what is in the frames and when to move
on. Build scripts in code (tests) or from the command line (`phonebot.emulator.client`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from phonebot.audio import TWILIO_SAMPLE_RATE, read_wav, tone

DTMF_DIGITS = frozenset("0123456789*#ABCD")


def words_of(text: str) -> set[str]:
    """The words of `text`, case and punctuation aside (a speech menu's choices, what the
    bot said to it)."""
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@dataclass(frozen=True)
class Speak:
    """Send `pcm` (16-bit mono at `sample_rate`) as the caller's voice; `text` is a label."""

    pcm: bytes
    sample_rate: int = TWILIO_SAMPLE_RATE
    text: str | None = None

    @classmethod
    def from_wav(cls, path: str | Path, text: str | None = None) -> Speak:
        """Speak the contents of a WAV file (any PCM rate/width/channels)."""
        return cls(read_wav(path, TWILIO_SAMPLE_RATE), TWILIO_SAMPLE_RATE, text or Path(path).name)

    @classmethod
    def tone(cls, seconds: float, frequency: float = 440.0, amplitude: float = 0.3) -> Speak:
        """A sine burst standing in for speech (tests that need 'some voice', not words)."""
        label = f"[tone {frequency:g} Hz {seconds:g} s]"
        return cls(tone(frequency, seconds, TWILIO_SAMPLE_RATE, amplitude), text=label)

    @classmethod
    def noise(
        cls,
        seconds: float,
        rms: float = 300.0,
        *,
        cough_at: float | None = None,
        cough_s: float = 0.2,
        seed: int = 0,
    ) -> Speak:
        """Line hiss (white noise at `rms`), optionally with a cough at `cough_at` s.

        The cough is a broadband burst with a sharp attack and a fast decay (peak RMS
        8000), the kind of sound that must not cut the bot off. Seeded: the same call
        makes the same noise.
        """
        rng = np.random.default_rng(seed)
        samples = rng.normal(0.0, rms, round(seconds * TWILIO_SAMPLE_RATE))
        label = f"[line hiss rms {rms:g}, {seconds:g} s"
        if cough_at is not None:
            start, n = round(cough_at * TWILIO_SAMPLE_RATE), round(cough_s * TWILIO_SAMPLE_RATE)
            burst = rng.normal(0.0, 8000.0, n) * np.exp(-np.linspace(0.0, 4.0, n))
            samples[start : start + n] += burst[: max(0, len(samples) - start)]
            label += f", cough {cough_s:g} s at {cough_at:g} s"
        pcm = np.clip(samples, -32768, 32767).astype(np.int16).tobytes()
        return cls(pcm, text=label + "]")

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True)
class Pause:
    """Stay quiet for `seconds` (silence frames keep flowing)."""

    seconds: float


@dataclass(frozen=True)
class Dtmf:
    """Press keys: one `dtmf` event per digit, then `interval` seconds of silence each."""

    digits: str
    interval: float = 0.25

    def __post_init__(self) -> None:
        bad = set(self.digits) - DTMF_DIGITS
        if not self.digits or bad:
            raise ValueError(f"DTMF digits must be from 0-9 * # A-D, got {self.digits!r}")


@dataclass(frozen=True)
class WaitForBot:
    """Wait for the bot's reply to the caller's latest speech (or its greeting).

    `until="speech"` returns once the bot starts talking; `"done"` once it has talked and
    then been quiet for `quiet` seconds. No bot speech within `timeout` raises
    `NoBotAudioError` (or just moves on when `require=False`); a reply still going after
    `max_wait` seconds is left running and the script moves on.
    """

    timeout: float = 10.0
    until: Literal["speech", "done"] = "done"
    quiet: float = 0.8
    max_wait: float = 60.0
    require: bool = True


@dataclass(frozen=True)
class WaitForHangup:
    """Expect the bot to end the call (close the stream or complete it via REST) in time."""

    timeout: float = 15.0


@dataclass(frozen=True)
class Menu:
    """A phone menu (IVR) on the called side: say `prompt`, then wait up to `timeout` s for
    a key the bot presses (tones in its audio, decoded as a real menu does:
    phonebot.emulator.keytones) or, for a menu that asks to "say" a choice, for what the bot
    says (heard by the offline recogniser, as a speech-enabled menu hears a caller). A key
    in `options`, or a word of `spoken` in the bot's words, runs that option's steps (a
    nested `Menu`, a person answering, …); nothing or anything else plays the prompt again,
    up to `repeats` more times, then `otherwise` runs (a real menu hangs up or goes to an
    operator)."""

    prompt: Speak
    options: Mapping[str, Sequence[Step]]
    timeout: float = 10.0
    repeats: int = 2
    otherwise: Sequence[Step] = ()
    spoken: Mapping[str, Sequence[Step]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [key for key in self.options if len(key) != 1 or key not in DTMF_DIGITS]
        if bad:
            raise ValueError(f"menu options must be single keys from 0-9 * # A-D, got {bad}")
        if any(not words_of(choice) for choice in self.spoken):
            raise ValueError(f"spoken menu choices need words, got {list(self.spoken)}")


@dataclass(frozen=True)
class Hangup:
    """Hang up: Twilio's `stop` message then a close, or (send_stop=False) an abrupt close."""

    send_stop: bool = True


Step = Speak | Pause | Dtmf | WaitForBot | WaitForHangup | Menu | Hangup
