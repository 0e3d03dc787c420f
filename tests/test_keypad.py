"""Keypad digits reach the conversation as one entry per sequence."""

from __future__ import annotations

from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputDTMFFrame, TranscriptionFrame
from pipecat.tests.utils import run_test

from phonebot.twilio.keypad import KEYPAD_PREFIX, keypad_aggregator, pressed_digits, spoken_digits


async def test_1234_pound_arrives_as_one_entry():
    keys = [KeypadEntry(k) for k in "1234#"]
    down, _ = await run_test(
        keypad_aggregator(), frames_to_send=[InputDTMFFrame(key) for key in keys]
    )
    entries = [f.text for f in down if isinstance(f, TranscriptionFrame)]
    assert entries == [f"{KEYPAD_PREFIX}1234#"]
    assert pressed_digits(entries[0]) == "1234#"


def test_keys_are_read_one_by_one():
    assert spoken_digits("10#*") == "1 0 pound star"
    assert pressed_digits("I pressed nothing") is None
