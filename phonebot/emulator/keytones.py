"""Keys pressed in the bot's audio: a DTMF tone decoder, as the phone menu at the far end has.

Media Streams has no message for sending a key towards Twilio: a bot presses keys by playing
the tones in its audio (Pipecat's `OutputDTMFFrame`, rendered from its bundled WAVs), and the
menu that answered the call hears them like any keypad. The emulator plays that menu, so it
decodes the tones the same way: per 20 ms frame, the Goertzel power at the eight DTMF
frequencies (ITU-T Q.23: rows 697/770/852/941 Hz, columns 1209/1336/1477/1633 Hz). A frame
holds a key when one row and one column carry most of the frame's energy, each clearly above
the others of its group, neither far weaker than the other (twist); a press is two frames or
more of the same key, and ends at a frame without it, so a held key is one press.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

ROWS = (697.0, 770.0, 852.0, 941.0)
COLUMNS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")
# Of the frame's energy, the share the two tones must carry together (speech and music spread
# theirs over the band; a keypad tone is nearly all in its two frequencies).
TONE_SHARE = 0.7
# Each group's strongest frequency over its runner-up, in power: 4 = 6 dB.
GROUP_MARGIN = 4.0
# The weaker tone at least this share of the stronger (ITU-T Q.24 allows 8 dB of twist).
MAX_TWIST = 10 ** (-8 / 10)
# Quieter frames are silence or line noise (about -40 dBm0 on 16-bit samples).
MIN_RMS = 100.0
FRAMES_FOR_A_PRESS = 2  # 40 ms: Q.24 asks a receiver to accept tones of 40 ms and more


@lru_cache(maxsize=8)
def _probes(n: int, rate: int) -> np.ndarray:
    """The eight DTMF frequencies' complex exponentials over `n` samples, rows then columns:
    one matrix product gives every Goertzel bin of a frame (the same sums, vectorised)."""
    t = np.arange(n) / rate
    return np.exp(-2j * np.pi * np.outer(ROWS + COLUMNS, t))


def _powers(samples: np.ndarray, energy: float, rate: int) -> np.ndarray:
    """Each DTMF frequency's power, normalised so a pure tone's is its share of the frame's
    `energy` (> 0, the sum of its squared samples; 1.0 for a sine alone); rows first, then
    columns."""
    bins = _probes(len(samples), rate) @ samples
    return 2.0 * np.abs(bins) ** 2 / (len(samples) * energy)


def key_in_frame(frame: np.ndarray, rate: int) -> str | None:
    """The keypad key whose tone fills `frame` (16-bit samples), or None.

    The frame's energy is summed once: it gates quiet frames (its RMS) and normalises the
    tones' powers. Every frame of the bot's audio comes through here in the emulated
    caller, so in a load run this is the load generator's own CPU, taken from the server's.
    """
    if len(frame) == 0:
        return None
    samples = frame.astype(np.float64)
    energy = float(np.dot(samples, samples))
    if math.sqrt(energy / len(samples)) < MIN_RMS:  # also a frame of zeros
        return None
    powers = _powers(samples, energy, rate)
    rows, columns = powers[: len(ROWS)], powers[len(ROWS) :]
    row, column = int(np.argmax(rows)), int(np.argmax(columns))
    low, high = rows[row], columns[column]
    if low + high < TONE_SHARE or min(low, high) < MAX_TWIST * max(low, high):
        return None
    if any(p * GROUP_MARGIN > low for i, p in enumerate(rows) if i != row):
        return None
    if any(p * GROUP_MARGIN > high for i, p in enumerate(columns) if i != column):
        return None
    return KEYPAD[row][column]


class KeyToneListener:
    """Feeds on consecutive frames of one audio track; says when a key press begins."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._key: str | None = None
        self._run = 0
        self._began = 0  # the first sample of the current run of frames
        self._reported = False

    def feed(
        self, frame: np.ndarray, at: int, level: float | None = None
    ) -> tuple[float, str] | None:
        """The press this frame confirms (once per press): when it began, in seconds, and
        its key; else None. `at` is the frame's first sample on the track; `level`, the
        frame's RMS if the caller has it already: a quiet frame is then no key at once."""
        quiet = level is not None and level < MIN_RMS
        key = None if quiet else key_in_frame(frame, self.rate)
        if key != self._key:
            self._key, self._run, self._began, self._reported = key, 0, at, False
        if key is None:
            return None
        self._run += 1
        if self._run >= FRAMES_FOR_A_PRESS and not self._reported:
            self._reported = True
            return self._began / self.rate, key
        return None


def keys_in(audio: np.ndarray, rate: int, frame_samples: int) -> list[tuple[float, str]]:
    """Every key press in `audio`, with when it began (seconds)."""
    listener = KeyToneListener(rate)
    presses = (
        listener.feed(audio[start : start + frame_samples], start)
        for start in range(0, len(audio) - frame_samples + 1, frame_samples)
    )
    return [press for press in presses if press is not None]
