"""Keypad (DTMF) input, as the conversation sees it.

Pipecat's `DTMFAggregator` collects Twilio's `dtmf` digits until `#` or a pause and hands
them on as one transcription, so "1234#" reaches the context as a single user entry
worded for the LLM: "The caller pressed 1234#".
"""

from __future__ import annotations

from pipecat.processors.aggregators.dtmf_aggregator import DTMFAggregator

KEYPAD_PREFIX = "The caller pressed "
DIGIT_PAUSE_S = 2.0


def keypad_aggregator() -> DTMFAggregator:
    return DTMFAggregator(timeout=DIGIT_PAUSE_S, prefix=KEYPAD_PREFIX)


def pressed_digits(utterance: str) -> str | None:
    """The digits of a keypad entry, or None when the utterance was speech."""
    if utterance.startswith(KEYPAD_PREFIX):
        return utterance[len(KEYPAD_PREFIX):].strip()
    return None


def spoken_digits(digits: str) -> str:
    """'12#' -> '1 2 pound': one token per key, so TTS reads keys, not a number."""
    names = {"#": "pound", "*": "star"}
    return " ".join(names.get(key, key) for key in digits)
