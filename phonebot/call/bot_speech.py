"""What the bot says: one log line per text a call hands to its TTS.

Tests, and anyone debugging a call, need the exact words of each bot turn, not a guess
from its audio. The line is written as the text leaves the LLM for the TTS:

- a `TTSSpeakFrame` (greeting, re-prompt, goodbye, transfer line, voicemail message) is
  one line; queued at the pipeline's source, it passes through the LLM on its way;
- an LLM reply, streamed token by token, is gathered between `LLMFullResponseStartFrame`
  and `LLMFullResponseEndFrame` and written as one line when it ends (Pipecat's LLM
  services push the end frame even when the reply is cut short, so the line then holds
  what had been sent);
- text the TTS is told to skip (`skip_tts`, set on each of a reply's text frames) and
  replies with no text (a function call) write nothing;
- the pre-rendered apology and goodbye played when the TTS itself is broken bypass the
  TTS, so `phonebot.call.provider_faults` writes their line with `log_bot_says`.

The line is `Call <CallSid> bot says: "<text>"`, the text JSON-quoted so that a reply with
line breaks or quotes stays one line and `bot_lines` reads it back exactly. It records
what the bot asked its TTS to say, not that the caller heard all of it: a caller who
talks over the bot cuts it short, which only the audio shows.

The text is call content (an LLM reply can repeat what the caller said), so it is logged
at INFO only with `LOG_BOT_SPEECH=true`, and otherwise at DEBUG, the level at which
Pipecat already logs the same text ("Generating TTS [...]", without the CallSid).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from loguru import logger
from pipecat.frames.frames import (
    AggregatedTextFrame,
    CancelFrame,
    EagerTranscriptionFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TextFrame,
    TranscriptionFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameProcessor

from phonebot.config import Settings

# Transcriptions are text frames the TTS never speaks (Pipecat's TTSService skips them).
_NOT_SPOKEN = (TranscriptionFrame, InterimTranscriptionFrame, EagerTranscriptionFrame)
_LINE = re.compile(r"Call (?P<call_sid>\S+) bot says: (?P<text>\".*\")$")


def bot_says_line(call_sid: str, text: str) -> str:
    """The log message for one text the bot handed to its TTS."""
    return f"Call {call_sid} bot says: {json.dumps(text, ensure_ascii=False)}"


def log_bot_says(call_sid: str, text: str, settings: Settings) -> None:
    """Log one text of the bot's: at INFO with LOG_BOT_SPEECH, else at DEBUG."""
    logger.log("INFO" if settings.log_bot_speech else "DEBUG", bot_says_line(call_sid, text))


def bot_lines(log_lines: Iterable[str], call_sid: str) -> list[str]:
    """The texts call `call_sid`'s bot said, in order, read back from its log lines.

    Lines of other calls, and whatever precedes "Call " (loguru's time, level and
    source), are ignored.
    """
    texts = []
    for line in log_lines:
        start = line.find(f"Call {call_sid} bot says: ")
        if start >= 0 and (match := _LINE.match(line, start)):
            texts.append(json.loads(match.group("text")))
    return texts


class BotSpeechLog:
    """Writes a call's "bot says" lines from what its LLM service pushes to the TTS.

    It listens to the LLM's own `on_before_push_frame` event (public Pipecat API, run
    synchronously in push order, as `phonebot.call.provider_faults.RecoveryWatch` does) rather
    than being a processor between the LLM and the TTS, which would add a queue hop and a
    task wake-up to every frame passing there (see `phonebot.call.pipeline_cost`). It watches
    whatever hands the TTS its text: the LLM, or on a dial-out navigating a phone menu the
    navigator's tag reader after it (phonebot.call.ivr), so a key press is not "said".
    """

    def __init__(self, call_sid: str, settings: Settings):
        self._call_sid = call_sid
        self._settings = settings
        self._reply: list[str] | None = None  # an LLM reply's text so far, while it streams

    def watch(self, speaker: FrameProcessor) -> None:
        """Log what `speaker` (the LLM, or the phone-menu navigator's tag reader after it)
        hands the TTS."""
        speaker.add_event_handler("on_before_push_frame", self._on_push)

    def _on_push(self, llm: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, TTSSpeakFrame):
            self._say(frame.text)
        elif isinstance(frame, TextFrame):
            self._on_text(frame)
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._end_reply()  # a reply that never ended: keep what it had sent
            self._reply = []
        elif isinstance(frame, (LLMFullResponseEndFrame, InterruptionFrame, CancelFrame)):
            self._end_reply()

    def _on_text(self, frame: TextFrame) -> None:
        if frame.skip_tts or isinstance(frame, _NOT_SPOKEN):
            return
        if self._reply is None:
            self._say(frame.text)  # text outside an LLM reply: the TTS speaks it alone
        elif isinstance(frame, AggregatedTextFrame) and self._reply:
            # Whole sentences (the phone-menu navigator aggregates before the TTS): the TTS
            # speaks each on its own; the line keeps them apart.
            self._reply.append(f" {frame.text.lstrip()}")
        else:
            self._reply.append(frame.text)  # joined as the TTS's aggregator joins it

    def _end_reply(self) -> None:
        reply, self._reply = self._reply, None
        if reply:
            self._say("".join(reply))

    def _say(self, text: str) -> None:
        if text := text.strip():
            log_bot_says(self._call_sid, text, self._settings)
