"""An agent's `hints`: the names its callers and its bot say, as a bias for every recogniser.

Whisper tiny.en hears the shipped agents' "Acme Outdoor" as "at me outdoor" or "Acne
Outdoor"; with the agent's hints as hotwords it hears the name. The same hints become
Deepgram's keyterms and OpenAI's transcription prompt, and the emulator, which hears the
bot with the server's recogniser, reads them from the agent files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from phonebot.agents.loader import AgentFileError, agent_hints, load_agents
from phonebot.ai.offline import piper_voice
from phonebot.ai.offline.stt import normalize_transcript, transcribe
from phonebot.ai.providers import build_services
from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.config import SHIPPED_AGENTS_DIR
from phonebot.emulator.client import load_transcriber
from tests.conftest import make_settings, shipped_agent

BOT_LINE = "Thanks for calling Acme Outdoor. Goodbye!"
AGENT = """\
name: orders
default: true
instructions: You help with orders.
greeting: Hello.
"""


def test_whisper_hears_the_agents_names_with_its_hints():
    # Noise off: the same audio every run (with Piper's noise tiny.en sometimes gets it).
    pcm = piper_voice.synthesize_at(BOT_LINE, TWILIO_SAMPLE_RATE, deterministic=True)
    plain = normalize_transcript(transcribe(pcm, TWILIO_SAMPLE_RATE))
    hinted = normalize_transcript(transcribe(pcm, TWILIO_SAMPLE_RATE, hints=["Acme Outdoor"]))
    assert "acme outdoor" not in plain, plain  # why hints exist: tiny.en misses the name
    assert hinted == "thanks for calling acme outdoor goodbye", hinted


def test_every_shipped_agent_that_says_the_name_has_it_as_a_hint():
    assert shipped_agent("support").hints == ("Acme Outdoor",)
    assert agent_hints(SHIPPED_AGENTS_DIR) == ("Acme Outdoor",)


def test_the_hints_reach_each_recogniser():
    agent = replace(shipped_agent("support"), hints=("Acme Outdoor", "TrailMaster 2"))
    offline = build_services(make_settings(), agent).stt
    assert offline._hints == ("Acme Outdoor", "TrailMaster 2")
    deepgram = build_services(make_settings(deepgram_api_key="dg"), agent).stt
    assert deepgram._settings.keyterm == ["Acme Outdoor", "TrailMaster 2"]
    openai = build_services(make_settings(openai_api_key="sk-x"), agent).stt
    assert openai._settings.prompt == "Acme Outdoor, TrailMaster 2"


def test_an_agent_without_hints_sends_none():
    agent = replace(shipped_agent("support"), hints=())
    assert build_services(make_settings(openai_api_key="sk-x"), agent).stt._settings.prompt is None


def test_the_emulator_expects_the_names_of_the_agents_the_server_reads(tmp_path, monkeypatch):
    (tmp_path / "orders.yaml").write_text(AGENT + "hints: [Zephyr Kites, Acme Outdoor]\n")
    (tmp_path / "broken.yaml").write_text("name: [\n")  # the server names it; no hints here
    monkeypatch.setenv("AGENTS_DIR", str(tmp_path))
    transcriber = load_transcriber()
    try:
        assert transcriber is not None and transcriber._hints == ("Zephyr Kites", "Acme Outdoor")
    finally:
        transcriber.close()


@pytest.mark.parametrize(
    "hints",
    ["hints: ['']\n", "hints: [" + "x" * 101 + "]\n", "hints: [" + ", ".join(["a"] * 51) + "]\n"],
)
def test_empty_long_or_too_many_hints_are_refused(tmp_path: Path, hints: str):
    (tmp_path / "orders.yaml").write_text(AGENT + hints)
    with pytest.raises(AgentFileError) as raised:
        load_agents(tmp_path, make_settings())
    assert ":5: hints" in raised.value.problems[0], raised.value.problems
