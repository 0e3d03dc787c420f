"""The "bot says" log lines: the exact text each bot turn handed to its TTS.

Whole calls read these lines back (`LiveServer.bot_lines`) to check what the bot said;
here `BotSpeechLog` watches a stand-in for the LLM that pushes the frames a call's LLM
pushes to its TTS.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TextFrame,
    TranscriptionFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from phonebot.call.bot_speech import BotSpeechLog, bot_lines, bot_says_line
from tests.conftest import make_settings

CALL_SID = "CA" + "b" * 32
OTHER_SID = "CA" + "c" * 32


@pytest.fixture
def records() -> Iterator[list[dict]]:
    """Every loguru record written while the test runs."""
    kept: list[dict] = []
    sink = logger.add(lambda message: kept.append(message.record), level="TRACE")
    yield kept
    logger.remove(sink)


class Llm(FrameProcessor):
    """Where the LLM sits: pushes on every frame it gets, as Pipecat's LLM services do."""

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def watched_llm(**settings) -> Llm:
    llm = Llm()
    BotSpeechLog(CALL_SID, make_settings(**settings)).watch(llm)
    return llm


def said(records: list[dict]) -> list[str]:
    return bot_lines((r["message"] for r in records), CALL_SID)


def levels(records: list[dict]) -> set[str]:
    return {r["level"].name for r in records if " bot says" in r["message"]}


def test_a_line_reads_back_exactly_whatever_the_text_holds():
    text = 'He said "hi"\nthen left: 100% sure — ¿sí?'
    log = [
        f"2026-01-01 00:00:00.000 | INFO     | phonebot.call.bot_speech:log:1 - {line}"
        for line in (
            bot_says_line(CALL_SID, text),
            bot_says_line(OTHER_SID, "another call's line"),
            bot_says_line(CALL_SID, "the next line"),
        )
    ]
    assert all("\n" not in line for line in log)
    assert bot_lines(log, CALL_SID) == [text, "the next line"]
    assert bot_lines(log, OTHER_SID) == ["another call's line"]


async def test_each_text_the_tts_is_given_is_one_line_in_order(records):
    silent_reply = LLMFullResponseStartFrame()
    silent_reply.skip_tts = True
    skipped_text = LLMTextFrame("Not for the caller.")
    skipped_text.skip_tts = True

    await run_test(
        watched_llm(log_bot_speech=True),
        frames_to_send=[
            TTSSpeakFrame("Hello, how can I help?"),
            # An LLM reply, streamed token by token: one line, as the TTS got it.
            LLMFullResponseStartFrame(),
            LLMTextFrame("Your order "),
            LLMTextFrame("ships today."),
            LLMTextFrame(" Anything else?"),
            LLMFullResponseEndFrame(),
            # A reply that is only a function call, and one the TTS is told to skip.
            LLMFullResponseStartFrame(),
            LLMFullResponseEndFrame(),
            silent_reply,
            skipped_text,
            LLMFullResponseEndFrame(),
            TranscriptionFrame("what the caller said", "user", "2026-01-01T00:00:00Z"),
            TextFrame("One moment."),  # plain text outside a reply: spoken on its own
            TTSSpeakFrame("Goodbye!"),
        ],
    )

    assert said(records) == [
        "Hello, how can I help?",
        "Your order ships today. Anything else?",
        "One moment.",
        "Goodbye!",
    ]
    assert levels(records) == {"INFO"}


async def test_a_reply_cut_short_still_logs_what_it_sent_in_its_place(records):
    await run_test(
        watched_llm(),
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("Let me tell you about "),
            SleepFrame(0.2),  # a system frame overtakes queued ones: let those go first
            InterruptionFrame(),  # the caller barged in before the reply's end frame
            TTSSpeakFrame("Sorry, go ahead."),
            LLMFullResponseStartFrame(),
            LLMTextFrame("Our hours are"),
            LLMFullResponseStartFrame(),  # the next reply, the last one never ended
            LLMTextFrame("Nine to five."),
            LLMFullResponseEndFrame(),
        ],
    )

    assert said(records) == [
        "Let me tell you about", "Sorry, go ahead.", "Our hours are", "Nine to five."
    ]


async def test_without_log_bot_speech_the_lines_are_debug_only(records):
    await run_test(watched_llm(), frames_to_send=[TTSSpeakFrame("Hello.")])

    assert said(records) == ["Hello."]
    assert levels(records) == {"DEBUG"}
