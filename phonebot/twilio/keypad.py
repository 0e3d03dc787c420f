"""Keypad (DTMF) input, as the conversation sees it.

Pipecat's `DTMFAggregator` collects Twilio's `dtmf` digits until `#` or a pause and hands
them on as one transcription, so "1234#" reaches the context as a single user entry
worded for the LLM: "The caller pressed 1234#".

A key the agent declares (a `menu` choice, or a `keypad` shortcut such as `0` → transfer)
is a whole entry by itself: waiting for `#` or the 2 s pause would leave a caller who
pressed `1` for "opening hours" in silence for 2 s, and no caller types `#` after a menu
choice. `KeypadAggregator` hands such an entry on the moment its last key arrives; any
other entry (an order number typed key by key) still ends on `#` or the pause. Only a
whole entry counts: with `1` declared, "41#" is a free entry, not a `4` then a `1`. A
declared key that starts a longer declared one (`1` and `12`) waits like a free entry.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipecat.frames.frames import Frame, InputDTMFFrame
from pipecat.processors.aggregators.dtmf_aggregator import DTMFAggregator
from pipecat.processors.frame_processor import FrameDirection

from phonebot.pipecat_compat import end_keypad_entry, keypad_entry

KEYPAD_PREFIX = "The caller pressed "
DIGIT_PAUSE_S = 2.0


class KeypadAggregator(DTMFAggregator):
    """Pipecat's aggregator, ending an entry at once when it is one of `declared`."""

    def __init__(self, declared: Iterable[str] = (), **kwargs) -> None:
        super().__init__(timeout=DIGIT_PAUSE_S, prefix=KEYPAD_PREFIX, **kwargs)
        self._declared_keys = frozenset(declared)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)  # adds the key to the entry
        if isinstance(frame, InputDTMFFrame) and answers_at_once(
            keypad_entry(self), self._declared_keys
        ):
            await end_keypad_entry(self)


def answers_at_once(entry: str, declared: frozenset[str]) -> bool:
    """Whether `entry` is a declared key that no longer declared key starts with."""
    return entry in declared and not any(
        len(key) > len(entry) and key.startswith(entry) for key in declared
    )


def keypad_aggregator(declared: Iterable[str] = ()) -> KeypadAggregator:
    """The call's keypad aggregator; `declared` are the agent's menu and shortcut keys."""
    return KeypadAggregator(declared)


def pressed_digits(utterance: str) -> str | None:
    """The digits of a keypad entry, or None when the utterance was speech."""
    if utterance.startswith(KEYPAD_PREFIX):
        return utterance[len(KEYPAD_PREFIX):].strip()
    return None


def spoken_digits(digits: str) -> str:
    """'12#' -> '1 2 pound': one token per key, so TTS reads keys, not a number."""
    names = {"#": "pound", "*": "star"}
    return " ".join(names.get(key, key) for key in digits)
