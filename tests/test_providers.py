"""Only the chosen providers are built; a provider without its key is never started."""

from __future__ import annotations

import sys

from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService

from phonebot.offline.responder import OfflineResponder
from phonebot.offline.stt import OfflineSTTService
from phonebot.offline.tts import OfflineTTSService
from phonebot.personas import DIALIN_PERSONAS
from phonebot.providers import build_services
from tests.conftest import make_settings


def test_no_keys_builds_the_offline_engines():
    services = build_services(make_settings(), DIALIN_PERSONAS["support"])
    assert isinstance(services.stt, OfflineSTTService)
    assert isinstance(services.llm, OfflineResponder)
    assert isinstance(services.tts, OfflineTTSService)


def test_each_key_builds_only_its_own_provider():
    settings = make_settings(deepgram_api_key="dg-key", openai_base_url="http://127.0.0.1:9/v1")
    services = build_services(settings, DIALIN_PERSONAS["general"])
    assert isinstance(services.stt, DeepgramSTTService)
    assert isinstance(services.llm, OpenAILLMService)
    assert isinstance(services.tts, OfflineTTSService)
    assert "pipecat.services.cartesia.tts" not in sys.modules
