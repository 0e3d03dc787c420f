"""Reading AGENTS_DIR: every `*.yaml` file validated into an `Agent`, or every problem named.

A problem reads `agents/support.yaml:12: tools.0.url: Input should be a valid URL`: the
file, the line (PyYAML's node marks, found by following pydantic's error location down
the composed document) and the field. All files are read and all problems reported at
once, so one fix-and-restart round is enough. Nothing is half-loaded: `load_agents`
returns a complete `AgentSet` or raises `AgentFileError`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from phonebot.agents.agent import (
    Agent,
    KeywordAnswer,
    OutcomeField,
    OutcomeRule,
)
from phonebot.agents.knowledge import KnowledgeBase
from phonebot.agents.selection import AgentSet
from phonebot.agents.spec import AgentSpec
from phonebot.agents.tools import PythonTool, load_python_tool
from phonebot.config import Settings, is_secret_field

AGENT_FILE_PATTERNS = ("*.yaml", "*.yml")
# File fields that are settings under another name (TTS_VOICE, LANGUAGE, TRANSFER_TARGET).
SETTING_FIELDS = {
    "voice": "tts_voice",
    "language": "language",
    "transfer_target": "transfer_target",
}
# Settings of the server process, not of one call: an agent can't change them (they are
# read once at start, or say where the server listens, keeps records or shares state).
PROCESS_SETTINGS = frozenset({
    "public_url", "host", "port", "log_level", "log_format", "log_bot_speech",
    "log_turn_timing", "log_resource_usage", "log_resource_usage_every_s",
    "tracemalloc_frames", "env", "agent_name", "organization_name", "pipecat_cloud_ws_url",
    "twilio_account_sid", "twilio_phone_number", "twilio_api_base_url", "webhook_auth",
    "agents_dir", "database_url", "call_records", "records_queue_size", "events_webhook_url",
    "recordings_dir", "recordings_s3_url", "recording_retention_days", "workers",
    "max_concurrent_calls", "max_calls_per_process", "call_lease_ttl_s", "state_key_prefix",
    "redis_timeout_s", "campaign_scheduler", "campaign_tick_s", "max_request_body_bytes",
    "max_campaign_body_bytes", "trusted_proxy_hops", "auth_failure_limit", "auth_lockout_s",
    "shutdown_grace_s", "shutdown_goodbye_timeout_s", "stream_handshake_timeout_s",
    "replay_cache_ttl_s", "replay_cache_size", "dialout_allowed_countries",
})  # fmt: skip
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# YAML 1.1 (PyYAML) reads a bare yes/no/on/off as a boolean.
BOOLEAN_HINT = ' (YAML reads a bare yes, no, on or off as true/false: quote it ("yes"))'


class AgentFileError(ValueError):
    """The agent files can't be used; `problems` has one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    def report(self) -> str:
        count = len(self.problems)
        return f"{count} problem(s) in the agent files:\n" + "\n".join(
            f"  {problem}" for problem in self.problems
        )


def agent_files(directory: Path) -> list[Path]:
    found = itertools.chain.from_iterable(directory.glob(p) for p in AGENT_FILE_PATTERNS)
    return sorted(path for path in found if path.is_file())


def load_agents(directory: Path, settings: Settings) -> AgentSet:
    """Every agent in `directory`, checked one by one and together (names, matches, one
    default); raises AgentFileError naming each problem."""
    if not directory.is_dir():
        raise AgentFileError([f"{directory}: AGENTS_DIR is not a directory"])
    files = agent_files(directory)
    if not files:
        raise AgentFileError([f"{directory}: no agent files (*.yaml) in AGENTS_DIR"])
    agents, problems = [], []
    for path in files:
        try:
            agents.append(load_agent_file(path, settings))
        except AgentFileError as error:
            problems += error.problems
    if not problems:  # checked together only once each file is right on its own
        problems = set_problems(agents)
    if problems:
        raise AgentFileError(problems)
    return AgentSet(tuple(agents), str(directory))


def load_agent_file(path: Path, settings: Settings) -> Agent:
    """One file: YAML, then the schema, then what the schema can't see (settings values,
    Python tools that must import, knowledge files that must exist)."""
    raw = path.read_bytes()
    try:
        node, data = parse_yaml(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise AgentFileError([_yaml_problem(path, error)]) from None
    if not isinstance(data, dict):
        raise AgentFileError([f"{path}:1: the file must be a mapping (name: …, instructions: …)"])
    try:
        spec = AgentSpec.model_validate(data)
    except ValidationError as error:
        raise AgentFileError(_schema_problems(path, node, error)) from None
    python_tools, tool_problems = _python_tools(spec)
    knowledge, knowledge_problems = _knowledge(path, spec)
    problems = _settings_problems(spec, settings) + tool_problems + knowledge_problems
    if problems:
        raise AgentFileError([f"{path}:{_line(node, loc)}: {text}" for loc, text in problems])
    digest = hashlib.sha256(raw + (knowledge.digest.encode() if knowledge else b""))
    version = digest.hexdigest()[:12]
    agent = agent_from_spec(spec, knowledge, version=version, source=str(path))
    return replace(agent, python_tools=python_tools)


def agent_hints(directory: Path) -> tuple[str, ...]:
    """Every agent's `hints` in `directory`, for a listener that does not know which agent
    answers (the emulator hearing the bot). Best effort: a file that does not load adds
    nothing here, and the server names its problems when it loads the set."""
    hints: dict[str, None] = {}  # in order, once each
    for path in agent_files(directory) if directory.is_dir() else []:
        try:
            spec = AgentSpec.model_validate(parse_yaml(path.read_text("utf-8"))[1])
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError):
            continue
        hints.update(dict.fromkeys(spec.hints))
    return tuple(hints)


def parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (its marks give problems their lines) and its data, from
    one parse, with libyaml's safe loader when PyYAML was built with it (~10x faster)."""
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def agent_from_spec(
    spec: AgentSpec, knowledge: KnowledgeBase | None = None, *, version: str = "", source: str = ""
) -> Agent:
    """The runtime `Agent` of a validated file."""
    optional = {
        "goodbye": spec.goodbye,
        "voicemail": spec.voicemail_message,
        "opt_out_confirmation": spec.opt_out_confirmation,
    }
    return Agent(
        name=spec.name,
        instructions=spec.instructions,
        greeting=spec.greeting,
        question=spec.question,
        answers=tuple(KeywordAnswer(a.keywords, a.answer) for a in spec.offline.answers),
        hints=spec.hints,
        overrides=setting_overrides(spec),
        keypad=dict(spec.keypad),
        menu=dict(spec.menu),
        ivr_goal=spec.ivr_goal,
        outcome_fields=tuple(
            OutcomeField(f.name, f.description, f.values) for f in spec.outcome_fields
        ),  # fmt: skip
        outcome_rules=tuple(
            OutcomeRule(r.keywords, tuple(r.set.items()), r.answer)
            for r in spec.offline.outcome_rules
        ),  # fmt: skip
        recording_notice=spec.recording_notice,
        tools=spec.tools,
        knowledge=knowledge,
        analysis=spec.analysis,
        match=dict(spec.match),
        default=spec.default,
        version=version,
        source=source,
        description=spec.description or "",
        **{name: value for name, value in optional.items() if value is not None},
    )


def setting_overrides(spec: AgentSpec) -> dict[str, object]:
    """The settings a file changes for its calls: `settings`, plus `voice`, `language` and
    `transfer_target`, which are settings too (TTS_VOICE, LANGUAGE, TRANSFER_TARGET)."""
    overrides: dict[str, object] = dict(spec.settings)
    for field, setting in SETTING_FIELDS.items():
        if (value := getattr(spec, field)) is not None:
            overrides[setting] = value
    return overrides


def set_problems(agents: Iterable[Agent]) -> list[str]:
    """What is wrong with the agents together: a name used twice, two agents that could
    both be the best match for one call, not exactly one default agent."""
    agents = list(agents)
    problems = []
    by_name: dict[str, Agent] = {}
    for agent in agents:
        if (other := by_name.setdefault(agent.name, agent)) is not agent:
            problems.append(f"{agent.source}: name {agent.name!r} is also {other.source}'s")
    for one, two in itertools.combinations(agents, 2):
        if _ambiguous(one, two):
            both = dict(sorted({**one.match, **two.match}.items()))
            problems.append(
                f"{one.source} and {two.source}: both match a call with {both}; make one "
                "more specific (add a key to its `match`)"
            )
    defaults = [agent.source for agent in agents if agent.default]
    if len(defaults) != 1:
        problems.append(
            f"exactly one agent needs `default: true` (for calls nothing else matches); "
            f"found {len(defaults)}: {defaults}"
        )
    return problems


def _ambiguous(one: Agent, two: Agent) -> bool:
    """Equally specific matches that agree on every key they share: a call can carry both."""
    if not one.match or len(one.match) != len(two.match):
        return False
    return all(two.match.get(key, value) == value for key, value in one.match.items())


def _settings_problems(spec: AgentSpec, settings: Settings) -> list[tuple[tuple, str]]:
    """Overrides must be per-call settings, with values the settings accept."""
    problems = []
    for name in spec.settings:
        if name not in Settings.model_fields:
            problems.append((("settings", name), f"settings.{name}: not a setting"))
        elif name in PROCESS_SETTINGS or is_secret_field(name):  # keys stay in the env
            problems.append((("settings", name), f"settings.{name}: a server-wide setting, "
                             "not one an agent can change for its calls"))  # fmt: skip
    if problems:
        return problems
    overrides = setting_overrides(spec)
    if not overrides:
        return []
    try:
        Settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as error:
        return [_override_problem(spec, item) for item in error.errors()]
    return []


def _override_problem(spec: AgentSpec, item: Any) -> tuple[tuple, str]:
    name = str(item["loc"][0]) if item["loc"] else "settings"
    field_of = {setting: (field,) for field, setting in SETTING_FIELDS.items()}
    loc = ("settings", name) if name in spec.settings else field_of.get(name, ("settings",))
    return loc, f"{'.'.join(loc)}: {item['msg']}"


def _python_tools(spec: AgentSpec) -> tuple[dict[str, PythonTool], list[tuple[tuple, str]]]:
    """The file's Python tools, built once here (imported, schema read), or why not."""
    tools, problems = {}, []
    for index, tool in enumerate(spec.tools):
        if tool.python is None:
            continue
        loaded, problem = load_python_tool(tool)
        if loaded is not None:
            tools[tool.name] = loaded
        else:
            problems.append((("tools", index, "python"), f"tools.{index}.python: {problem}"))
    return tools, problems


def _knowledge(path: Path, spec: AgentSpec) -> tuple[KnowledgeBase | None, list[tuple]]:
    """The agent's knowledge base, or the problems (located) that stop it loading."""
    if not spec.knowledge:
        return None, []
    files = [(path.parent / name).resolve() for name in spec.knowledge]
    missing = [
        (("knowledge", index), f"knowledge.{index}: no such file {name!r} (relative to the "
         "agent file)")
        for index, (name, file) in enumerate(zip(spec.knowledge, files, strict=True))
        if not file.is_file()
    ]  # fmt: skip
    if missing:
        return None, missing
    try:
        return KnowledgeBase.from_files(files), []
    except (OSError, ValueError) as error:
        return None, [(("knowledge",), f"knowledge: {error}")]


def _yaml_problem(path: Path, error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    line = f"{mark.line + 1}" if mark is not None else "1"
    what = getattr(error, "problem", None) or str(error)
    return f"{path}:{line}: not valid YAML: {what}"


def _schema_problems(path: Path, node: yaml.Node | None, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if not str(part).startswith("function-after"))
        where = ".".join(str(part) for part in loc) or "(file)"
        hint = BOOLEAN_HINT if isinstance(item.get("input"), bool) else ""
        problems.append(f"{path}:{_line(node, loc)}: {where}: {item['msg']}{hint}")
    return problems


def _line(node: yaml.Node | None, loc: tuple) -> int:
    """The 1-based line of the deepest node on `loc` (a pydantic error location)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: object) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if getattr(key, "value", None) == str(part):
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None
