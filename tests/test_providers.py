"""Only the chosen providers are built; a provider without its key is never started."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService

from phonebot.ai.offline.responder import OfflineResponder
from phonebot.ai.offline.stt import OfflineSTTService
from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.ai.providers import build_services
from phonebot.ai.voice_text import VoiceTextFilter
from phonebot.config import for_agent
from phonebot.pipecat_compat import tts_text_filters
from tests.conftest import make_settings, shipped_agent, shipped_agents


def test_no_keys_builds_the_offline_engines():
    services = build_services(make_settings(), shipped_agent("support"))
    assert isinstance(services.stt, OfflineSTTService)
    assert isinstance(services.llm, OfflineResponder)
    assert isinstance(services.tts, OfflineTTSService)


def test_each_key_builds_only_its_own_provider():
    settings = make_settings(deepgram_api_key="dg-key", openai_base_url="http://127.0.0.1:9/v1")
    services = build_services(settings, shipped_agent("general"))
    assert isinstance(services.stt, DeepgramSTTService)
    assert isinstance(services.llm, OpenAILLMService)
    assert isinstance(services.tts, OfflineTTSService)
    assert "pipecat.services.cartesia.tts" not in sys.modules


def test_voice_and_language_come_from_the_persona_then_the_settings():
    general = shipped_agent("general")
    by_setting = build_services(make_settings(language="es", tts_voice="es-419"), general)
    assert (by_setting.tts._settings.voice, by_setting.tts._settings.language) == ("es-419", "es")

    persona = dataclasses.replace(general, overrides={"tts_voice": "en-gb", "language": "en"})
    settings = for_agent(make_settings(language="es", tts_voice="fr-fr"), persona)
    by_persona = build_services(settings, persona)
    assert by_persona.tts._settings.voice == "en-gb"


def test_persona_overrides_are_validated_settings():
    general = shipped_agent("general")
    shorter = dataclasses.replace(general, overrides={"silence_timeout_s": "5"})
    assert for_agent(make_settings(), shorter).silence_timeout_s == 5.0
    assert for_agent(make_settings(), general) == make_settings()
    with pytest.raises(ValueError, match="unknown settings"):
        for_agent(make_settings(), dataclasses.replace(general, overrides={"nope": 1}))
    undialable = dataclasses.replace(general, overrides={"transfer_target": "x"})
    with pytest.raises(ValueError, match="E.164"):
        for_agent(make_settings(), undialable)


def test_every_persona_override_is_a_valid_setting():
    for agent in shipped_agents().agents:
        for_agent(make_settings(), agent)


def test_stt_language_follows_the_call_language():
    settings = make_settings(openai_api_key="sk-test", language="es")
    services = build_services(settings, shipped_agent("general"))
    assert services.stt._settings.language == "es"


def test_an_unknown_language_is_refused_at_startup():
    with pytest.raises(ValueError, match="language"):
        make_settings(language="klingon")


def test_every_tts_cleans_text_before_speaking():
    for keys in ({}, {"openai_api_key": "sk-test"}, {"cartesia_api_key": "ca-test"}):
        tts = build_services(make_settings(**keys), shipped_agent("support")).tts
        assert [type(f) for f in tts_text_filters(tts)] == [VoiceTextFilter]


async def test_calls_share_the_processs_connection_pool(monkeypatch) -> None:
    """Every OpenAI service of every call uses the app's one pool (phonebot.ai.http_pool):
    no TLS context is built per call (a third of the CPU while 40 calls start at once),
    and the timeout and no-retry bound still hold on the pooled clients."""
    import ssl

    from phonebot.ai.http_pool import HttpPool

    pool = HttpPool.build()
    contexts = []
    create = ssl.create_default_context

    def counted(*args, **kwargs):
        contexts.append(1)
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    settings = make_settings(openai_api_key="sk-test")
    calls = [build_services(settings, shipped_agent("support"), pool) for _ in range(2)]
    assert contexts == []
    for services in calls:
        for service in (services.stt, services.llm, services.tts):
            client = service._client  # the AsyncOpenAI client the service sends with
            assert client._client is pool.openai
            assert client.max_retries == 0 and client.timeout is not None
    build_services(settings, shipped_agent("support"))  # no pool: clients of its own
    assert len(contexts) == 3
    await pool.aclose()
