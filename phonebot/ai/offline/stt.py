"""Offline speech recognition: Whisper tiny.en (faster-whisper) on each caller turn.

Why Whisper: it hears open speech on a phone line, where the recogniser it replaces
(pocketsphinx) only heard the few phrases it was limited to, and not reliably (15 % word
accuracy on ordinary caller sentences; Whisper tiny.en: 99-100 %, ``bench/offline_engines.py``).
So nothing needs a vocabulary any more: an agent's words, the offline bot's lines and
anything a caller says are heard by the same general model. The model, its hash check and
how it decodes a turn are in ``phonebot.ai.offline.whisper``.

Transcripts are Whisper's own text ("Could somebody call me back after 2 o'clock?"), as a
cloud STT's are: what the records show and what an LLM reads. To compare a reference with
a transcript (tests, benchmarks), put both through :func:`normalize_transcript`.

Phone audio is 8 kHz; Whisper reads 16 kHz, so each turn is resampled with the project's
resampler (``phonebot.audio.resample_pcm16``). Decoding runs on ``decode_executor``'s
threads (CTranslate2 releases the GIL), so the event loop, and every call's audio pacing,
keeps running meanwhile; ``transcribe`` itself stays a plain blocking function for scripts,
benchmarks and the emulator.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, StartFrame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt

from phonebot.ai.offline.whisper import (
    DECODE_THREADS,
    MODEL_SAMPLE_RATE,
    decode_executor,
    model_files,
    recognise,
    shared_model,
)
from phonebot.audio import pcm16_to_array, resample_pcm16
from phonebot.ops.threads import start_every_thread
from phonebot.pipecat_compat import stt_user_id

__all__ = [
    "MODEL_SAMPLE_RATE",
    "OfflineSTTService",
    "hint_options",
    "normalize_transcript",
    "start_decoder_pool",
    "to_model_audio",
    "transcribe",
    "transcribe_in_thread",
    "word_errors",
    "warm_up",
]


# ------------------------------------------------------------------ comparable text

_UNIT_WORDS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
)
_TENS_WORDS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_UNITS = {word: value for value, word in enumerate(_UNIT_WORDS)}
_TENS = {word: 10 * value for value, word in enumerate(_TENS_WORDS, start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
# Ordinals are read as their number plus "th", so "21st" and "twenty first" compare equal.
_ORDINALS = {
    "first": "one",
    "second": "two",
    "third": "three",
    "fifth": "five",
    "eighth": "eight",
    "ninth": "nine",
    "twelfth": "twelve",
}
_ORDINAL_TH = re.compile(r"^([a-z]+?)(?:ie)?th$")
_DIGITS_ORDINAL = re.compile(r"(\d)(?:st|nd|rd|th)\b")
_TOKEN = re.compile(r"\d+|[a-z]+(?:'[a-z]+)*")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DOLLARS = re.compile(r"\$(\d+)")
_SPELLINGS = {"ok": "okay", "%": "percent", "&": "and"}


@dataclass
class _Number:
    """A number being read from words: ``done`` (past thousands) + ``low`` (below them)."""

    done: int = 0
    low: int = 0
    last: str = ""  # what the last word was: "unit", "teen", "tens", "hundred", "scale"

    def take(self, word: str) -> bool:
        """Add ``word`` if it carries the number on ("twenty" + "five"), else False."""
        kind, value = _kind(word)
        if not _continues(self.last, kind) or (self.last and value == 0 and kind == "unit"):
            return False
        if kind == "hundred":
            self.low = max(self.low, 1) * 100
        elif kind == "scale":
            self.done += max(self.low, 1) * value
            self.low = 0
        else:
            self.low += value
        self.last = kind
        return True

    @property
    def digits(self) -> str:
        return str(self.done + self.low)


def _kind(word: str) -> tuple[str, int]:
    if word in _UNITS:
        value = _UNITS[word]
        return ("unit" if value < 10 else "teen"), value
    if word in _TENS:
        return "tens", _TENS[word]
    return ("hundred" if word == "hundred" else "scale"), _SCALES[word]


def _continues(last: str, kind: str) -> bool:
    """Whether a word of ``kind`` goes on from one of ``last`` in a spoken number."""
    if kind in ("unit", "teen", "tens"):
        return last in ("", "hundred", "scale") or (kind == "unit" and last == "tens")
    if kind == "hundred":
        return last in ("", "unit", "teen", "tens")
    return last != "scale"


def _is_number_word(word: str) -> bool:
    return word in _UNITS or word in _TENS or word in _SCALES


def _spell_ordinal(word: str) -> list[str]:
    """ "fifth" -> ["five", "th"], "twentieth" -> ["twenty", "th"]; other words as they are."""
    if word in _ORDINALS:
        return [_ORDINALS[word], "th"]
    match = _ORDINAL_TH.match(word)
    if match:
        stem = match.group(1)
        for number in (stem, stem + "y"):
            if _is_number_word(number) and number not in _SCALES:
                return [number, "th"]
    return [word]


def _joins(number: _Number | None, following: list[str]) -> bool:
    """Whether an "and" sits inside a number ("one hundred and five")."""
    inside = number is not None and number.last in ("hundred", "scale")
    return inside and bool(following) and _is_number_word(following[0])


class _Digits:
    """Adjacent numbers, in words or digits, being joined into one digit string."""

    def __init__(self) -> None:
        self.text = ""
        self.number: _Number | None = None  # the one being read from words

    def add(self, token: str) -> None:
        if token.isdigit():
            self._close()
            self.text += token
        elif self.number is None or not self.number.take(token):
            self._close()
            self.number = _Number()
            self.number.take(token)

    def flush(self) -> list[str]:
        """The digits so far, as one token (none if there were none); starts a new run."""
        self._close()
        text, self.text = self.text, ""
        return [text] if text else []

    def _close(self) -> None:
        if self.number is not None:
            self.text += self.number.digits
            self.number = None


def _numbers_as_digits(tokens: list[str]) -> list[str]:
    """Every run of numbers, in words or digits, as one digit string.

    Adjacent numbers are joined, the way a phone number or a code is read: "four five six
    seven", "4 5 6 7" and "4567" all become "4567"; "seven thirty" and "7:30" become "730".
    "and" inside a number ("one hundred and five") is dropped.
    """
    out: list[str] = []
    digits = _Digits()
    for i, token in enumerate(tokens):
        if token == "and" and _joins(digits.number, tokens[i + 1 : i + 2]):
            continue
        if token.isdigit() or _is_number_word(token):
            digits.add(token)
        else:
            out += [*digits.flush(), token]
    return out + digits.flush()


def normalize_transcript(text: str) -> str:
    """Lower-case words, no punctuation, numbers as digits: a reference and a transcript in
    one comparable form.

    Whisper writes "4567", "2 o'clock", "$9" and "21st" where a script says "four five six
    seven", "two o'clock", "nine dollars" and "twenty first"; both sides come out the same.
    """
    text = text.lower().replace("\u2019", "'")
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _DECIMAL_POINT.sub(" point ", text)
    text = _DOLLARS.sub(r"\1 dollars", text)
    text = _DIGITS_ORDINAL.sub(r"\1 th", text)
    for symbol in ("%", "&"):
        text = text.replace(symbol, f" {_SPELLINGS[symbol]} ")
    tokens = [t for token in _TOKEN.findall(text) for t in _spell_ordinal(token)]
    return " ".join(_numbers_as_digits([_SPELLINGS.get(t, t) for t in tokens]))


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions): the
    numerator of the word error rate the benchmark and the tests report."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            cost = min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_word != hyp_word))
            diagonal, row[j] = row[j], cost
    return row[-1]


# ------------------------------------------------------------------ recognition


def to_model_audio(pcm: bytes, sample_rate: int) -> np.ndarray:
    """16-bit mono PCM at any rate as Whisper's input: float32 in [-1, 1) at 16 kHz."""
    resampled = resample_pcm16(pcm[: len(pcm) & ~1], sample_rate, MODEL_SAMPLE_RATE)
    return pcm16_to_array(resampled).astype(np.float32) / 32768.0


def transcribe(
    pcm: bytes, sample_rate: int, *, model: str | None = None, hints: Sequence[str] = ()
) -> str:
    """The words in 16-bit mono PCM, as Whisper writes them ("" for silence or noise).

    Blocking (~0.6 s of CPU per turn with tiny.en, however short the turn). ``model`` is an
    ``OFFLINE_STT_MODEL`` value: None for the packaged tiny.en. ``hints`` (an agent's names
    and words) go to Whisper as hotwords: tiny.en hears "Acme Outdoor" as "at me outdoor"
    without them.
    """
    if len(pcm) < 2:
        return ""
    audio = to_model_audio(pcm, sample_rate)
    return recognise(shared_model(model_files(model)), audio, **hint_options(hints))


def hint_options(hints: Sequence[str]) -> dict[str, str]:
    """Whisper's decoding options for an agent's hints: hotwords, which faster-whisper puts
    in the prompt before the turn (a bias: silence and noise still decode to nothing, see
    bench/offline_engines.py)."""
    return {"hotwords": ", ".join(hints)} if hints else {}


def warm_up(model: str | None = None) -> None:
    """Load (and check) the model now, so the first turn does not wait for it."""
    shared_model(model_files(model))


async def transcribe_in_thread(
    pcm: bytes, sample_rate: int, *, model: str | None = None, hints: Sequence[str] = ()
) -> str:
    """:func:`transcribe` on the decoding threads, so the event loop keeps running meanwhile."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        decode_executor(), lambda: transcribe(pcm, sample_rate, model=model, hints=hints)
    )


async def start_decoder_pool(model: str | None = None) -> None:
    """For a server's start-up: every decoding thread started, the model loaded and checked.

    A model that fails its check raises here, so the server does not start on it.
    """
    await asyncio.to_thread(start_every_thread, decode_executor(), DECODE_THREADS)
    await asyncio.get_running_loop().run_in_executor(decode_executor(), warm_up, model)


def _log_failure(future: Future) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logger.error(f"offline STT: the model did not load: {error}")


class OfflineSTTService(SegmentedSTTService):
    """Pipecat STT on Whisper: transcribes each VAD-delimited turn on the decoding threads.

    Needs a VAD upstream (as every ``SegmentedSTTService`` does). English only: tiny.en is an
    English model, and so is the offline responder.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        hints: Sequence[str] = (),
        settings: STTSettings | None = None,
        **kwargs,
    ) -> None:
        """Create the service.

        Args:
            model: ``OFFLINE_STT_MODEL``: a faster-whisper model directory, or None for the
                packaged Whisper tiny.en.
            hints: The agent's names and words to expect (Whisper hotwords).
            settings: Standard Pipecat STT settings; only ``language`` English is meaningful.
            **kwargs: Passed to ``SegmentedSTTService`` (e.g. ``sample_rate``).
        """
        default_settings = STTSettings(model=model or "whisper-tiny.en", language=Language.EN)
        if settings is not None:
            default_settings.apply_update(settings)
        # Speech end to final transcript: the VAD's 0.2 s, then ~0.6 s of CPU per segment,
        # queued behind the call's previous segment (0.65-1.72 s measured through the server
        # on the 2-core test machine). PhoneTurnStopStrategy waits at most this long for a
        # VAD segment's transcript before ending the turn without it.
        kwargs.setdefault("ttfs_p99_latency", 2.0)
        super().__init__(settings=default_settings, **kwargs)
        self._model = model
        self._hints = tuple(hints)

    @property
    def wants_wav_segments(self) -> bool:
        """Receive raw 16-bit PCM: it is resampled and handed to Whisper as samples."""
        return False

    def can_generate_metrics(self) -> bool:
        """Processing time is measured around each turn's decode."""
        return True

    async def start(self, frame: StartFrame) -> None:
        """Have the model loaded before the first turn, without waiting for it.

        The server loads it at start-up (``start_decoder_pool``); elsewhere (tests, scripts)
        the call and its greeting must not wait ~0.3 s for it. A failure is logged here and
        reported again by each turn.
        """
        await super().start(frame)
        try:
            decode_executor().submit(warm_up, self._model).add_done_callback(_log_failure)
        except RuntimeError as e:  # the interpreter is shutting down
            logger.warning(f"{self}: offline STT warm-up not started: {e}")

    @traced_stt
    async def _handle_transcription(
        self, transcript: str, is_final: bool, language: Language | None = None
    ) -> None:
        """Tracing hook (the decorator records the transcript)."""

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame, None]:
        """Transcribe one turn (raw 16-bit PCM at ``self.sample_rate``)."""
        await self.start_processing_metrics()
        try:
            text = await transcribe_in_thread(
                audio, self.sample_rate, model=self._model, hints=self._hints
            )
        except Exception as e:  # a model failure must not kill the pipeline
            await self.stop_processing_metrics()
            yield ErrorFrame(error=f"{self}: offline transcription failed: {e}")
            return
        await self.stop_processing_metrics()
        if not text:
            return
        await self._handle_transcription(text, True, Language.EN)
        logger.debug(f"{self}: transcription [{text}]")
        yield TranscriptionFrame(text, stt_user_id(self), time_now_iso8601(), Language.EN)
