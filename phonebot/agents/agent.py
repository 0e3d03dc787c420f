"""An agent as a call uses it: built from its file (phonebot.agents.loader), never changed.

A call picks its `Agent` when it starts (`AgentSet.select`) and keeps that object to the
end, so reloading the files never changes a call halfway through. The helpers below are
what the call does with it: the opening line, the system prompt, the offline keyword
answers and outcome rules, and the check of recorded outcomes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from phonebot.agents.knowledge import KnowledgeBase
from phonebot.agents.spec import AnalysisSpec, ToolSpec
from phonebot.agents.tools import PythonTool
from phonebot.twilio.amd import AMD_PARAMETER
from phonebot.twilio.caller_id import presented_caller_id

# What said_any reads as a space: everything but letters, digits and apostrophes.
_PUNCTUATION = re.compile(r"[^\w\s']")

PHONE_STYLE = (
    "You are talking on a phone line: everything you write is spoken aloud. "
    "Use short sentences, ask one question at a time, never use lists, markdown, "
    "emojis or URLs, and write numbers the way you would say them."
)
TOOL_FAILURE_STYLE = (
    " If a function answers with an error, apologise briefly, say you could not check "
    "that right now, and carry on helping."
)

# The call parameter that carries a dial-out's phone-menu goal (`ivr_goal`).
IVR_GOAL_PARAMETER = "ivr_goal"
DEFAULT_VOICEMAIL = "Hi, sorry we missed you. We'll try again soon. Goodbye!"
DEFAULT_OPT_OUT_CONFIRMATION = (
    "I'm sorry to have bothered you. I've taken your number off our list, so you won't "
    "be called again. Goodbye!"
)


@dataclass(frozen=True)
class KeywordAnswer:
    """An answer the offline responder gives when the caller says one of the keywords."""

    keywords: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class OutcomeField:
    """One thing a call finds out, recorded by the LLM's `record_outcome` function.

    `values` lists the allowed answers (e.g. yes/no); empty means free text (e.g. when to
    call back). The LLM sees `description` in the function's schema.
    """

    name: str
    description: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutcomeRule:
    """Offline: when the callee says one of `keywords`, record `fields` (first rule wins,
    so "not interested" goes before "interested")."""

    keywords: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]
    answer: str | None = None  # said once recorded (None: the agent's keyword answer)


@dataclass(frozen=True)
class Agent:
    """A role the bot plays: its instructions, how it opens, what it can do and know.

    `match` and `default` say which calls it takes (phonebot.agents.selection); `version`
    is a hash of its file and knowledge, logged with every call that uses it.
    """

    name: str
    instructions: str
    greeting: str
    question: str = ""
    answers: tuple[KeywordAnswer, ...] = field(default_factory=tuple)
    goodbye: str = "Thanks for calling. Goodbye!"
    # Names and words the speech recogniser should expect (a bias, not a limit).
    hints: tuple[str, ...] = ()
    # Settings this agent changes for its calls, by setting name, e.g.
    # {"tts_voice": "en-gb", "transfer_target": "+15551230000", "silence_timeout_s": 6}.
    overrides: dict[str, object] = field(default_factory=dict)
    # Keypad shortcuts: digit -> action the bot takes at once ("transfer", "end").
    keypad: dict[str, str] = field(default_factory=dict)
    # Keypad menu: key -> the choice it stands for, in words; answered at once.
    menu: dict[str, str] = field(default_factory=dict)
    # On dial-out, what to reach through a phone menu that answers (None: no navigation
    # unless the dial names a goal); see `ivr_goal`.
    ivr_goal: str | None = None
    # Left on an answering machine when dial-out asked for machine detection.
    voicemail: str = DEFAULT_VOICEMAIL
    # What a call with this agent finds out (`record_outcome`), stored on the call's
    # record (`outcomes`) and its campaign contact; the rules are the offline responder's.
    outcome_fields: tuple[OutcomeField, ...] = field(default_factory=tuple)
    outcome_rules: tuple[OutcomeRule, ...] = field(default_factory=tuple)
    # Said when the callee asks not to be called again (`opt_out`), before hanging up.
    opt_out_confirmation: str = DEFAULT_OPT_OUT_CONFIRMATION
    # Said right after the greeting when the call is recorded (RECORD_CALLS); None = the
    # agent does not announce recordings. Check your local law on announcing them.
    recording_notice: str | None = None
    # The user's functions (HTTP endpoints or Python), their passages, their analysis.
    tools: tuple[ToolSpec, ...] = field(default_factory=tuple)
    # The Python tools among them, by name, built once when the file loaded.
    python_tools: Mapping[str, PythonTool] = field(default_factory=dict)
    knowledge: KnowledgeBase | None = None
    analysis: AnalysisSpec | None = None
    match: dict[str, str] = field(default_factory=dict)
    default: bool = False
    version: str = ""
    source: str = ""  # the file it came from
    description: str = ""  # what it is for, in words (GET /agents, the agents page)

    def announcing_recording(self) -> Agent:
        """This agent with its recording notice in the greeting (for a recorded call)."""
        if not self.recording_notice:
            return self
        return replace(self, greeting=f"{self.greeting} {self.recording_notice}")

    def system_prompt(self) -> str:
        shortcuts = "".join(
            f" If the caller presses {digit}, call the {action}_call function."
            for digit, action in self.keypad.items()
        ) + "".join(
            f" If the caller presses {digit}, they chose {choice}: answer that."
            for digit, choice in self.menu.items()
        )
        failures = TOOL_FAILURE_STYLE if self.tools else ""
        known = self.knowledge.prompt_section() if self.knowledge is not None else ""
        return f"{self.instructions} {PHONE_STYLE}{shortcuts}{failures}{known}"


def spoken_number_ending(number: str, digits: int = 4) -> str:
    """'+15551234567' -> '4 5 6 7': the tail of a number, spaced so TTS reads digits."""
    tail = [ch for ch in number if ch.isdigit()][-digits:]
    return " ".join(tail)


def ivr_goal(agent: Agent, parameters: Mapping[str, str]) -> str | None:
    """What a dial-out navigates a phone menu towards: the dial's `ivr_goal` parameter
    (API, command line, campaign), else the agent file's; None on a dial-in, and on a
    dial-out that asked for answering-machine detection (a menu is a machine to it: the
    dial-out refuses both together, and an agent file's goal gives way)."""
    if parameters.get("call_type") != "outbound" or AMD_PARAMETER in parameters:
        return None
    return parameters.get(IVR_GOAL_PARAMETER) or agent.ivr_goal


def opening_line(agent: Agent, parameters: Mapping[str, str]) -> str:
    """The agent's greeting, telling a dial-in caller which number we see them on.

    A withheld number (`phonebot.twilio.caller_id`) is no number: the line is left out.
    """
    sentences = [agent.greeting]
    ending = spoken_number_ending(presented_caller_id(parameters.get("caller_id")))
    if ending and parameters.get("call_type", "inbound") == "inbound":
        sentences.append(f"I see you're calling from the number ending in {ending}.")
    if agent.question:
        sentences.append(agent.question)
    return " ".join(sentences)


def keyword_answer(agent: Agent, utterance: str) -> str | None:
    """The first keyword answer whose keyword the caller said, if any."""
    for entry in agent.answers:
        if said_any(entry.keywords, utterance):
            return entry.answer
    return None


def outcome_rule(agent: Agent, utterance: str) -> OutcomeRule | None:
    """The first outcome rule whose keyword the callee said, if any."""
    for rule in agent.outcome_rules:
        if said_any(rule.keywords, utterance):
            return rule
    return None


def outcome_problems(agent: Agent, fields: Mapping[str, object]) -> list[str]:
    """Why `fields` can't be recorded for this agent (unknown field, value not allowed,
    empty); empty list when they can. Told to the LLM so it can correct itself."""
    known = {f.name: f for f in agent.outcome_fields}
    problems = []
    for name, value in fields.items():
        spec = known.get(name)
        if spec is None:
            problems.append(f"unknown outcome field {name!r}; known: {sorted(known)}")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be a non-empty string")
        elif spec.values and value not in spec.values:
            problems.append(f"{name} must be one of {list(spec.values)}, not {value!r}")
    if not fields:
        problems.append("no outcome fields given")
    return problems


def said_any(keywords: tuple[str, ...], utterance: str) -> bool:
    """Whether the utterance holds one of the keywords: a whole word, or a phrase.

    Punctuation is not part of a word: recognisers write "Yes." and "your hours?".
    """
    spoken = _PUNCTUATION.sub(" ", utterance.lower().replace("\u2019", "'"))
    words = set(spoken.replace("'", " ").split())
    text = f" {' '.join(spoken.split())} "
    return any((" " in k and f" {k} " in text) or k in words for k in keywords)
