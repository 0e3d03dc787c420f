"""Pipecat TTS service on espeak-ng, so the bot can speak without any API key.

espeak-ng sounds robotic but synthesises a sentence in a few milliseconds on one core, ships
inside a wheel and needs no model download, which makes it the fallback voice and the voice of
the offline tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given

from phonebot.ai.offline.espeak import (
    DEFAULT_RATE_WPM,
    synthesize,
    voice_for_language,
)
from phonebot.audio import resample_pcm16

__all__ = ["OfflineTTSService", "OfflineTTSSettings"]


@dataclass
class OfflineTTSSettings(TTSSettings):
    """Settings for :class:`OfflineTTSService`.

    Parameters:
        rate_wpm: Speaking rate in words per minute (espeak-ng accepts 80-450).
    """

    rate_wpm: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class OfflineTTSService(TTSService):
    """Speaks with espeak-ng in a worker thread and emits audio at the pipeline's output rate.

    A whole sentence is synthesised at once (it takes milliseconds) and then pushed in short
    chunks, so an interruption can cut the bot off mid-sentence as with streaming services.
    """

    Settings = OfflineTTSSettings
    _settings: OfflineTTSSettings

    def __init__(
        self,
        *,
        voice: str | None = None,
        language: Language | str | None = None,
        rate_wpm: int = DEFAULT_RATE_WPM,
        chunk_ms: int = 40,
        settings: OfflineTTSSettings | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            voice: espeak-ng voice or language name (e.g. "en-us", "en-gb", "es"). Defaults to
                the voice for ``language``.
            language: Language code such as "en", "es" or "pt-BR" (or a Pipecat ``Language``);
                mapped to an espeak-ng voice when ``voice`` is not given. Defaults to English.
            rate_wpm: Speaking rate in words per minute.
            chunk_ms: Duration of each emitted audio frame.
            settings: Settings delta applied last (standard Pipecat pattern).
            **kwargs: Passed to ``TTSService`` (e.g. ``sample_rate``).
        """
        language = language or Language.EN
        default_settings = self.Settings(
            model="espeak-ng",
            voice=voice or voice_for_language(str(language)),
            language=language,
            rate_wpm=rate_wpm,
        )
        if settings is not None:
            default_settings.apply_update(settings)
        # The base class pushes TTSStartedFrame/TTSStoppedFrame around each run_tts call.
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=default_settings,
            **kwargs,
        )
        self._chunk_ms = max(10, chunk_ms)

    def can_generate_metrics(self) -> bool:
        """TTFB, processing and usage metrics are all meaningful for local synthesis."""
        return True

    def language_to_service_language(self, language: Language) -> str:
        """Map a Pipecat language to the espeak-ng voice that speaks it."""
        return voice_for_language(str(language))

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:  # pipecat_compat
        """A language change also switches the voice, unless the same update sets a voice."""
        changed = await super()._update_settings(delta)
        if "language" in changed and "voice" not in changed:
            language = self._settings.language
            if is_given(language) and language:
                self._settings.voice = str(language)
        return changed

    def _chunks(self, pcm: bytes) -> Iterator[bytes]:
        size = max(2, int(self.sample_rate * self._chunk_ms / 1000) * 2)
        for start in range(0, len(pcm), size):
            yield pcm[start : start + size]

    def _render(self, text: str) -> bytes:
        """Synthesise and resample in one worker-thread hop (both are CPU-bound)."""
        voice = str(self._settings.voice or "en-us")
        rate = self._settings.rate_wpm if is_given(self._settings.rate_wpm) else DEFAULT_RATE_WPM
        pcm, native_rate = synthesize(text, voice=voice, rate_wpm=int(rate))
        return resample_pcm16(pcm, native_rate, self.sample_rate)

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Synthesise ``text`` off the event loop and yield it as short audio frames."""
        try:
            await self.start_tts_usage_metrics(text)
            audio = await asyncio.to_thread(self._render, text)
            await self.stop_ttfb_metrics()
            for chunk in self._chunks(audio):
                yield TTSAudioRawFrame(chunk, self.sample_rate, 1, context_id=context_id)
        except Exception as e:
            logger.error(f"{self}: offline synthesis failed: {e}")
            yield ErrorFrame(error=f"offline TTS failed: {e}")
        finally:
            await self.stop_ttfb_metrics()
