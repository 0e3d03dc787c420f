"""Persona selection by call parameters, openings, keyword answers, provider choice."""

from __future__ import annotations

import pytest

from phonebot.ai.personas import (
    CAMPAIGNS,
    DIALIN_PERSONAS,
    OUTBOUND_DEFAULT,
    keyword_answer,
    opening_line,
    select_persona,
)
from phonebot.ai.providers import chosen_providers
from tests.conftest import make_settings


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"session_type": "support"}, DIALIN_PERSONAS["support"]),
        ({"session_type": "sales"}, DIALIN_PERSONAS["sales"]),
        ({"session_type": "astrology"}, DIALIN_PERSONAS["general"]),
        ({}, DIALIN_PERSONAS["general"]),
        ({"campaign_id": "summer_sale", "call_type": "outbound"}, CAMPAIGNS["summer_sale"]),
        ({"campaign_id": "unknown", "call_type": "outbound"}, OUTBOUND_DEFAULT),
        ({"call_type": "outbound"}, OUTBOUND_DEFAULT),
    ],
)
def test_persona_follows_the_call_parameters(parameters, expected):
    assert select_persona(parameters) is expected


def test_dialin_opening_mentions_the_caller_number():
    line = opening_line(DIALIN_PERSONAS["support"], {"caller_id": "+15557654321"})
    assert line.startswith("Hello, you've reached Acme Outdoor support.")
    assert "I see you're calling from the number ending in 4 3 2 1." in line
    assert line.endswith("What can I help you with?")


def test_opening_without_caller_id_or_outbound_skips_the_number():
    assert "calling from" not in opening_line(DIALIN_PERSONAS["general"], {})
    outbound = {"caller_id": "+15550001111", "call_type": "outbound"}
    line = opening_line(CAMPAIGNS["summer_sale"], outbound)
    assert "calling from" not in line
    assert "summer sale" in line


def test_keyword_answers_come_from_the_persona():
    support = DIALIN_PERSONAS["support"]
    assert "order number" in keyword_answer(support, "My order has not arrived")
    assert "appointment" in keyword_answer(support, "I'd like to book an appointment")
    assert keyword_answer(support, "tell me a joke") is None


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, ("offline", "offline", "offline")),
        ({"openai_api_key": "sk-x"}, ("openai", "openai", "openai")),
        ({"openai_base_url": "http://127.0.0.1:11434/v1"}, ("offline", "openai", "offline")),
        (
            {"openai_api_key": "sk-x", "deepgram_api_key": "dg", "cartesia_api_key": "ca"},
            ("deepgram", "openai", "cartesia"),
        ),
        ({"deepgram_api_key": "dg"}, ("deepgram", "offline", "offline")),
    ],
)
def test_each_provider_falls_back_on_its_own(keys, expected):
    choice = chosen_providers(make_settings(**keys))
    assert (choice.stt, choice.llm, choice.tts) == expected
    assert choice.offline == ("offline" in expected)
