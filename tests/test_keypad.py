"""Keypad digits reach the conversation as one entry per sequence; a key the agent declares
(a menu choice or a shortcut) is an entry by itself, answered at once.

Three layers: the aggregator alone (Pipecat's `run_test`; order of entries, no clock),
the agent file's `menu` and what the offline responder makes of a menu key, and a whole
call (the real server, offline engines, the Twilio emulator pressing keys).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputDTMFFrame, TranscriptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.tests.utils import run_test

from phonebot.agents.agent import opening_line
from phonebot.agents.loader import AgentFileError, load_agents
from phonebot.ai.offline.responder import OfflineResponder, Reply
from phonebot.emulator import CallResult, Dtmf, Hangup, TwilioRestEmulator, WaitForBot
from phonebot.twilio.keypad import (
    DIGIT_PAUSE_S,
    KEYPAD_PREFIX,
    answers_at_once,
    keypad_aggregator,
    pressed_digits,
    spoken_digits,
)
from tests.conftest import make_settings
from tests.live_server import LiveServer, free_port, twilio_for
from tests.test_calls import CALLER, assert_call_ended_cleanly, call_in, server_env

MENU_AGENT = """\
name: front_desk
default: true
instructions: You answer questions about Acme Outdoor's shop.
greeting: Hello, Acme Outdoor.
question: Press 1 for our opening hours.
menu:
  "1": opening hours
offline:
  answers:
    - keywords: [hours, opening]
      answer: We're open nine to six.
"""
HOURS = "We're open nine to six."


async def entries(keys: str, declared: tuple[str, ...] = ()) -> list[str]:
    """The keypad entries the aggregator hands on for `keys`, in order (the call's end
    hands on a pending entry, so an entry split off early shows as one of its own)."""
    down, _ = await run_test(
        keypad_aggregator(declared),
        frames_to_send=[InputDTMFFrame(KeypadEntry(key)) for key in keys],
    )
    return [pressed_digits(f.text) for f in down if isinstance(f, TranscriptionFrame)]


async def test_1234_pound_arrives_as_one_entry():
    assert await entries("1234#") == ["1234#"]


async def test_a_declared_key_is_an_entry_at_once_and_the_rest_waits_for_pound():
    assert await entries("142#", declared=("1",)) == ["1", "42#"]
    assert await entries("142#") == ["142#"]  # undeclared: one free entry


async def test_a_declared_key_inside_a_free_entry_does_not_split_it():
    assert await entries("41#", declared=("1",)) == ["41#"]


async def test_a_longer_declared_key_wins_over_its_start():
    assert await entries("123#", declared=("1", "12")) == ["12", "3#"]
    assert not answers_at_once("1", frozenset({"1", "12"}))
    assert answers_at_once("*0", frozenset({"*0"}))


def test_keys_are_read_one_by_one():
    assert spoken_digits("10#*") == "1 0 pound star"
    assert pressed_digits("I pressed nothing") is None


# ------------------------------------------------------------------------ the agent file


def menu_agents(tmp_path: Path, text: str = MENU_AGENT):
    (tmp_path / "front_desk.yaml").write_text(text)
    return load_agents(tmp_path, make_settings())


def test_an_agent_file_declares_its_menu_and_the_llm_is_told(tmp_path):
    agent = menu_agents(tmp_path).by_name("front_desk")
    assert agent.menu == {"1": "opening hours"}
    assert "If the caller presses 1, they chose opening hours" in agent.system_prompt()


def test_a_menu_key_must_be_keys(tmp_path):
    with pytest.raises(AgentFileError, match="menu"):
        menu_agents(tmp_path, MENU_AGENT.replace('"1": opening', '"one": opening'))


def test_offline_a_menu_key_is_answered_like_the_choice_said(tmp_path):
    agent = menu_agents(tmp_path).by_name("front_desk")
    context = LLMContext(messages=[{"role": "assistant", "content": "hi"}])
    context.add_message({"role": "user", "content": f"{KEYPAD_PREFIX}1"})
    assert OfflineResponder(agent=agent).reply_to(context) == Reply(HOURS)


# ------------------------------------------------------------------------ a whole call


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    agents = tmp_path_factory.mktemp("agents")
    (agents / "front_desk.yaml").write_text(MENU_AGENT)
    return agents


@pytest.fixture(scope="module")
def server(
    rest_port: int, agents_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(rest_port, AGENTS_DIR=str(agents_dir))
    live = LiveServer(env, tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


@pytest.fixture
async def twilio(server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(server, rest_port) as emulator:
        yield emulator


def answered_after(result: CallResult, key: str) -> float:
    """Seconds from the press of `key` (its last press) to the start of the bot's next
    utterance, as the caller heard it."""
    pressed = max(t for t, digit in result.dtmf if digit == key)
    return min(u.start for u in result.bot_utterances if u.start > pressed) - pressed


async def test_a_menu_key_is_answered_before_the_pause_and_free_entries_wait(
    server, twilio, agents_dir
):
    script = [
        WaitForBot(),
        Dtmf("1"), WaitForBot(timeout=8),  # declared: answered at once
        Dtmf("42#"), WaitForBot(timeout=8),  # free entry: one entry, ended by #
        Dtmf("7"), WaitForBot(timeout=8),  # free entry, no #: the pause ends it
        Hangup(),
    ]  # fmt: skip
    result = await call_in(server, twilio, script)

    agent = load_agents(agents_dir, make_settings()).by_name("front_desk")
    assert server.bot_lines(result.call_sid) == [
        opening_line(agent, {"caller_id": CALLER}),
        HOURS,
        "You pressed 4 2 pound.",
        "You pressed 7.",
    ]
    # Pipecat's aggregator would have waited DIGIT_PAUSE_S for more keys before the `1`
    # reached the bot; the `7`, undeclared, still does.
    assert answered_after(result, "1") < DIGIT_PAUSE_S
    assert answered_after(result, "7") >= DIGIT_PAUSE_S
    assert_call_ended_cleanly(server, result.call_sid)
