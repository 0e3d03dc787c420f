"""Which STT, LLM and TTS a call uses: the one place providers are chosen.

Each kind has an ordered table; the first provider whose settings are present wins, and
the offline engine closes every table, so a machine with no keys still answers calls.
Only the chosen provider is imported and constructed: a provider without its key is
never half-started. Providers fall back independently (an OpenAI key and no Deepgram key
means OpenAI transcription with, say, Cartesia speech).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipecat.classifiers.base_classifier import BaseClassifier
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.transcriptions.language import Language

from phonebot.agents.agent import Agent
from phonebot.ai.http_pool import HttpPool
from phonebot.ai.voice_text import voice_text_filters
from phonebot.config import Settings
from phonebot.pipecat_compat import bound_openai_client

OPENAI_TTS_SAMPLE_RATE = 24000


@dataclass(frozen=True)
class Voice:
    """The voice and language one call speaks and listens in."""

    voice: str | None
    language: Language


def call_voice(settings: Settings) -> Voice:
    """TTS_VOICE and LANGUAGE (validated by Settings); STT follows the language."""
    return Voice(voice=settings.tts_voice, language=Language(settings.language))


def _tts_extras(agent: Agent) -> dict:
    """What every TTS gets: text made speakable first (see phonebot.ai.voice_text).

    `text_filters` is deprecated in Pipecat 1.14 in favour of `text_transforms`, but the
    transforms are never reset between replies, and the filter keeps per-reply state
    (open code blocks, which warnings it has logged); keep the filter hook until then.
    """
    return {"text_filters": voice_text_filters(agent.name)}


def _secret(value) -> str:
    return value.get_secret_value() if value else ""


def _fail_fast(service: FrameProcessor, timeout_s: float) -> FrameProcessor:
    """Bound an OpenAI service's requests to `timeout_s`, with no silent retries.

    Pipecat builds the `AsyncOpenAI` client itself with the SDK defaults, a 600 s timeout
    and two retries: a hung endpoint would mean minutes of silence on the line. Failing
    fast lets phonebot.call.provider_faults apologise to the caller instead.
    """
    bound_openai_client(service, timeout_s)
    return service


def _pooled(http: HttpPool | None):
    """The process's OpenAI connection pool, or None: the service builds its own client."""
    return http.openai if http is not None else None


def _has_openai_key(settings: Settings) -> bool:
    return bool(_secret(settings.openai_api_key))


def _deepgram_stt(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from pipecat.services.deepgram.stt import DeepgramSTTService

    # The agent's hints as keyterms (Deepgram's nova-3 boost for names and product words).
    hints = {"keyterm": list(agent.hints)} if agent.hints else {}
    return DeepgramSTTService(
        api_key=_secret(settings.deepgram_api_key),
        settings=DeepgramSTTService.Settings(language=call_voice(settings).language, **hints),
    )


def _openai_stt(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from pipecat.services.openai.stt import OpenAISTTService

    service = OpenAISTTService(
        api_key=_secret(settings.openai_api_key),
        base_url=settings.openai_stt_base_url,
        settings=OpenAISTTService.Settings(
            model=settings.openai_stt_model,
            language=call_voice(settings).language,
            # The agent's hints as the transcription prompt (OpenAI's way to spell names).
            prompt=", ".join(agent.hints) or None,
        ),
        http_client=_pooled(http),
    )
    return _fail_fast(service, settings.speech_timeout_s)


def _offline_stt(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from phonebot.ai.offline.stt import OfflineSTTService

    # Whisper (packaged tiny.en, or OFFLINE_STT_MODEL): open English speech, biased
    # towards the agent's hints.
    return OfflineSTTService(model=settings.offline_stt_model, hints=agent.hints)


def _openai_llm(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from phonebot.ai.pooled_llm import PooledOpenAILLMService

    service = PooledOpenAILLMService(
        http_client=_pooled(http),
        # Local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) accept any key.
        api_key=_secret(settings.openai_api_key) or "not-needed",
        base_url=settings.openai_base_url,
        settings=PooledOpenAILLMService.Settings(model=settings.openai_model),
    )
    return _fail_fast(service, settings.llm_timeout_s)


def _offline_llm(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from phonebot.ai.offline.responder import OfflineResponder

    return OfflineResponder(agent=agent)


def _cartesia_tts(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from pipecat.services.cartesia.tts import CartesiaTTSService

    voice = call_voice(settings)
    return CartesiaTTSService(
        api_key=_secret(settings.cartesia_api_key),
        settings=CartesiaTTSService.Settings(
            voice=voice.voice or settings.cartesia_voice_id, language=voice.language
        ),
        **_tts_extras(agent),
    )


def _openai_tts(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from pipecat.services.openai.tts import OpenAITTSService

    service = OpenAITTSService(
        api_key=_secret(settings.openai_api_key),
        base_url=settings.openai_tts_base_url,
        settings=OpenAITTSService.Settings(
            model=settings.openai_tts_model,
            voice=call_voice(settings).voice or settings.openai_tts_voice,
        ),
        sample_rate=OPENAI_TTS_SAMPLE_RATE,
        http_client=_pooled(http),
        **_tts_extras(agent),
    )
    return _fail_fast(service, settings.speech_timeout_s)


def _offline_tts(settings: Settings, agent: Agent, http: HttpPool | None) -> FrameProcessor:
    from phonebot.ai.offline.tts import OfflineTTSService

    # Piper's joe for English, espeak-ng otherwise or when OFFLINE_TTS=espeak (see the module).
    voice = call_voice(settings)
    return OfflineTTSService(
        voice=voice.voice,
        language=voice.language,
        engine=settings.offline_tts,
        **_tts_extras(agent),
    )


@dataclass(frozen=True)
class Provider:
    """One row of a provider table: a name, when it applies, how to build it."""

    name: str
    is_configured: Callable[[Settings], bool]
    build: Callable[[Settings, Agent, HttpPool | None], FrameProcessor]


def _always(settings: Settings) -> bool:
    return True


STT_PROVIDERS: Sequence[Provider] = (
    Provider("deepgram", lambda s: bool(_secret(s.deepgram_api_key)), _deepgram_stt),
    Provider("openai", _has_openai_key, _openai_stt),
    Provider("offline", _always, _offline_stt),
)
LLM_PROVIDERS: Sequence[Provider] = (
    Provider("openai", lambda s: _has_openai_key(s) or bool(s.openai_base_url), _openai_llm),
    Provider("offline", _always, _offline_llm),
)
TTS_PROVIDERS: Sequence[Provider] = (
    Provider("cartesia", lambda s: bool(_secret(s.cartesia_api_key)), _cartesia_tts),
    Provider("openai", _has_openai_key, _openai_tts),
    Provider("offline", _always, _offline_tts),
)


def choose(table: Sequence[Provider], settings: Settings) -> Provider:
    return next(provider for provider in table if provider.is_configured(settings))


@dataclass(frozen=True)
class ProviderChoice:
    """The providers this server's settings select, by name."""

    stt: str
    llm: str
    tts: str

    @property
    def offline(self) -> bool:
        """True when any part of the pipeline runs on an offline engine."""
        return "offline" in (self.stt, self.llm, self.tts)

    def describe(self) -> str:
        return f"STT={self.stt} LLM={self.llm} TTS={self.tts}"


def chosen_providers(settings: Settings) -> ProviderChoice:
    return ProviderChoice(
        stt=choose(STT_PROVIDERS, settings).name,
        llm=choose(LLM_PROVIDERS, settings).name,
        tts=choose(TTS_PROVIDERS, settings).name,
    )


@dataclass
class CallServices:
    """The three AI services one call's pipeline runs."""

    stt: FrameProcessor
    llm: FrameProcessor
    tts: FrameProcessor


def build_services(settings: Settings, agent: Agent, http: HttpPool | None = None) -> CallServices:
    """The call's services; those that speak HTTP share `http`, the process's pool (None:
    each builds its own client, as a call outside the server does)."""
    return CallServices(
        stt=choose(STT_PROVIDERS, settings).build(settings, agent, http),
        llm=choose(LLM_PROVIDERS, settings).build(settings, agent, http),
        tts=choose(TTS_PROVIDERS, settings).build(settings, agent, http),
    )


def greeting_classifier(services: CallServices) -> BaseClassifier:
    """Who answered a dial-out (`machine_detection: "bot"`): the call's LLM through
    Pipecat's `LLMClassifier`, or keywords when the LLM is the offline responder, which
    cannot run inference."""
    from pipecat.classifiers.llm.classifier import LLMClassifier

    from phonebot.ai.offline.greetings import KeywordGreetingClassifier
    from phonebot.ai.offline.responder import OfflineResponder

    if isinstance(services.llm, OfflineResponder) or not isinstance(services.llm, LLMService):
        return KeywordGreetingClassifier()
    return LLMClassifier(llm=services.llm)
