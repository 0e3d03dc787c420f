"""Agent files: loading, every kind of mistake named with its file and line, selection by
call parameters, openings, keyword answers; provider choice."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from phonebot.agents.agent import keyword_answer, opening_line
from phonebot.agents.loader import AgentFileError, load_agents
from phonebot.agents.registry import shown_target
from phonebot.agents.spec import ToolSpec
from phonebot.ai.providers import chosen_providers
from tests.conftest import make_settings, shipped_agent, shipped_agents


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"session_type": "support"}, shipped_agent("support")),
        ({"session_type": "sales"}, shipped_agent("sales")),
        ({"session_type": "astrology"}, shipped_agent("general")),
        ({"session_type": "sales", "call_type": "outbound"}, shipped_agent("outbound")),
        ({"agent": "sales", "call_type": "outbound"}, shipped_agent("sales")),
        ({"agent": "nobody", "session_type": "support"}, shipped_agent("support")),
        ({}, shipped_agent("general")),
        ({"campaign_id": "summer_sale", "call_type": "outbound"}, shipped_agent("summer_sale")),
        ({"campaign_id": "unknown", "call_type": "outbound"}, shipped_agent("outbound")),
        ({"call_type": "outbound"}, shipped_agent("outbound")),
    ],
)
def test_the_agent_follows_the_call_parameters(parameters, expected):
    assert shipped_agents().select(parameters) is expected


def test_dialin_opening_mentions_the_caller_number():
    line = opening_line(shipped_agent("support"), {"caller_id": "+15557654321"})
    assert line.startswith("Hello, you've reached Acme Outdoor support.")
    assert "I see you're calling from the number ending in 4 3 2 1." in line
    assert line.endswith("What can I help you with?")


def test_opening_without_caller_id_or_outbound_skips_the_number():
    assert "calling from" not in opening_line(shipped_agent("general"), {})
    outbound = {"caller_id": "+15550001111", "call_type": "outbound"}
    line = opening_line(shipped_agent("summer_sale"), outbound)
    assert "calling from" not in line
    assert "summer sale" in line


def test_keyword_answers_come_from_the_agent_file():
    support = shipped_agent("support")
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


# --- files with mistakes: each named with its file, line and field -----------------------

GOOD = """\
name: orders
default: true
instructions: You help with orders.
greeting: Hello.
"""


def write_agents(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(textwrap.dedent(text))
    return directory


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(AgentFileError) as raised:
        load_agents(directory, make_settings())
    return raised.value.problems


def test_a_good_file_loads_with_a_version_that_follows_its_content(tmp_path: Path):
    directory = write_agents(tmp_path, orders=GOOD)
    first = load_agents(directory, make_settings()).by_name("orders")
    assert first is not None and first.default and len(first.version) == 12
    (directory / "orders.yaml").write_text(GOOD.replace("Hello.", "Hi there."))
    second = load_agents(directory, make_settings()).by_name("orders")
    assert second is not None and second.version != first.version
    assert second.greeting == "Hi there."


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (GOOD + "tools:\n  - name: look\n    description: d\n    url: not a url\n"
         "    parameters: {type: object}\n", 8, "tools.0.url"),
        (GOOD + "settings:\n  silence_timout_s: 3\n", 6, "settings.silence_timout_s"),
        (GOOD + "settings:\n  silence_timeout_s: -1\n", 6, "settings.silence_timeout_s"),
        (GOOD + "language: klingon\n", 5, "language"),
        (GOOD + "keypad:\n  '0': dance\n", 6, "keypad.0"),
        (GOOD + "keypad:\n  '0': transfer\nmenu:\n  '0': sales\n", 8, "menu"),
        (GOOD + "greting: Hi\n", 5, "greting"),
        (GOOD + "tools:\n  - name: end_call\n    description: d\n    url: https://x.test/\n"
         "    parameters: {type: object}\n", 6, "tools.0.name"),
        (GOOD + "tools:\n  - name: look\n    description: d\n    url: https://x.test/\n"
         "    parameters: {type: objekt}\n", 9, "tools.0.parameters"),
        (GOOD + "tools:\n  - name: look\n    description: d\n"
         "    python: phonebot_no_such_module:look\n", 8, "tools.0.python"),
        (GOOD + "outcome_fields:\n  - name: interested\n    description: d\n"
         "    values: [yes, no]\n", 8, "outcome_fields.0.values.0"),
        (GOOD + "tools:\n  - {name: a, description: d, python: json:dumps}\n"
         "  - {name: a, description: d, python: json:loads}\n", 6, "tools"),
        (GOOD + "outcome_fields:\n  - {name: interested, description: d, values: ['yes']}\n"
         "analysis:\n  success_when: {interestd: 'yes'}\n", 8, "analysis"),
        (GOOD + "outcome_fields:\n  - {name: interested, description: d, values: ['yes']}\n"
         "analysis:\n  success_when: {interested: 'si'}\n", 8, "analysis"),
        (GOOD + "offline:\n  outcome_rules:\n    - {keywords: [x], set: {nope: '1'}}\n",
         6, "offline"),
        (GOOD + "analysis:\n  fields:\n    - {name: a, description: d}\n"
         "    - {name: a, description: d}\n", 7, "analysis.fields"),
        (GOOD + "settings:\n  openai_api_key: sk-x\n", 6, "settings.openai_api_key"),
        (GOOD + "settings:\n  database_url: sqlite:///x.db\n", 6, "settings.database_url"),
    ],
)  # fmt: skip
def test_a_mistake_is_named_with_its_file_line_and_field(tmp_path, text, line, field):
    directory = write_agents(tmp_path, orders=text)
    problem = problems_of(directory)[0]
    assert problem.startswith(f"{directory / 'orders.yaml'}:{line}: {field}"), problem


def test_yes_and_no_read_as_booleans_are_explained(tmp_path: Path):
    text = GOOD + "outcome_fields:\n  - name: interested\n    description: d\n    values: [yes]\n"
    [problem] = problems_of(write_agents(tmp_path, orders=text))
    assert 'quote it ("yes")' in problem


def test_every_unknown_setting_is_named(tmp_path: Path):
    text = GOOD + "settings:\n  silence_timout_s: 3\n  max_call_duraton_s: 60\n"
    problems = problems_of(write_agents(tmp_path, orders=text))
    assert [p.split(": ")[1] for p in problems] == [
        "settings.silence_timout_s", "settings.max_call_duraton_s"
    ]


def test_bad_yaml_is_named_with_its_line(tmp_path: Path):
    directory = write_agents(tmp_path, orders=GOOD + "greeting: [unclosed\n")
    [problem] = problems_of(directory)
    assert f"{directory / 'orders.yaml'}:6: not valid YAML" in problem


def test_agents_that_could_tie_on_one_call_are_refused(tmp_path: Path):
    directory = write_agents(
        tmp_path,
        orders=GOOD,
        billing=GOOD.replace("orders", "billing").replace("default: true", "match: {a: '1'}"),
        returns=GOOD.replace("orders", "returns").replace("default: true", "match: {b: '2'}"),
        outbound=GOOD.replace("orders", "outbound").replace(
            "default: true", "match: {a: '2'}"
        ),
    )
    problems = problems_of(directory)
    # {a: 1} and {a: 2} never meet on one call; {b: 2} meets each of them.
    assert len(problems) == 2, problems
    assert "billing.yaml and" in problems[0] and "{'a': '1', 'b': '2'}" in problems[0]
    assert "outbound.yaml and" in problems[1] and "{'a': '2', 'b': '2'}" in problems[1]
    # One more key makes one of them more specific: no tie left.
    (directory / "returns.yaml").write_text(
        GOOD.replace("orders", "returns").replace("default: true", "match: {b: '2', c: '3'}")
    )
    assert load_agents(directory, make_settings()).select({"a": "1", "b": "2"}).name == "billing"


def test_names_twice_and_defaults_not_one_are_refused(tmp_path: Path):
    directory = write_agents(tmp_path, orders=GOOD, copy=GOOD)
    problems = problems_of(directory)
    assert any("name 'orders' is also" in p for p in problems)
    assert any("exactly one agent needs `default: true`" in p and "found 2" in p
               for p in problems)  # fmt: skip


def test_a_missing_knowledge_file_is_named(tmp_path: Path):
    directory = write_agents(tmp_path, orders=GOOD + "knowledge:\n  - faq.md\n")
    [problem] = problems_of(directory)
    assert problem.startswith(f"{directory / 'orders.yaml'}:6: knowledge.0: no such file 'faq.md'")


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path):
    directory = write_agents(
        tmp_path, orders=GOOD + "greting: Hi\n", sales=GOOD.replace("orders", "sales") + "x: 1\n"
    )
    problems = problems_of(directory)
    assert [p.split(": ")[1] for p in problems] == ["greting", "x"]  # both files, in order


def test_a_tool_url_is_shown_without_its_credentials_or_query():
    tool = ToolSpec(name="look", description="d", parameters={"type": "object"},
                    url="https://user:pw@tools.example.com:8443/orders?key=s3cret")  # fmt: skip
    assert shown_target(tool) == "https://tools.example.com:8443/orders?…"
