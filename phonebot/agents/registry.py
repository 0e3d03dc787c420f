"""The app's agents, reloadable: SIGHUP or `POST /agents/reload` reads AGENTS_DIR again.

A reload swaps the whole `AgentSet` at once, or nothing: a bad file keeps the set in use
and says why. Calls hold the `Agent` they started with, so a reload never changes a live
call; only calls that start afterwards see the new files.

`describe` is how the agents are shown, one shape for `GET /agents`, the agents page and
`python -m phonebot.agents check`: what picks each agent, its tools and their targets,
its knowledge, what it records and how its calls are judged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from loguru import logger
from pydantic import BaseModel, Field

from phonebot.agents.agent import Agent
from phonebot.agents.loader import AgentFileError, load_agents
from phonebot.agents.selection import AgentSet
from phonebot.agents.spec import ToolSpec
from phonebot.config import Settings


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: `loaded` agents now in use, or the `problems` that kept the old."""

    loaded: bool
    agents: tuple[str, ...]
    problems: tuple[str, ...] = ()


class AgentRegistry:
    """The agent set in use, and how to read it again from `settings.agents_dir`."""

    def __init__(self, settings: Settings, agents: AgentSet | None = None) -> None:
        self._settings = settings
        self.current = agents if agents is not None else load_agents(self.directory, settings)
        # SIGHUP and POST /agents/reload may overlap: one reload at a time, each reading
        # the files as they are when it starts.
        self._reloading = threading.Lock()

    @property
    def directory(self) -> Path:
        return Path(self._settings.agents_dir)

    def reload(self) -> ReloadResult:
        """Read AGENTS_DIR again; on any problem keep the agents in use (and log why).

        Blocking (files, the knowledge index, imports of Python tools): a server runs it in
        a thread, so live calls keep the event loop."""
        with self._reloading:
            try:
                fresh = load_agents(self.directory, self._settings)
            except AgentFileError as error:
                logger.error(f"Agents not reloaded, the old set stays: {error.report()}")
                names = tuple(agent.name for agent in self.current.agents)
                return ReloadResult(False, names, tuple(error.problems))
            self.current = fresh
        names = tuple(agent.name for agent in fresh.agents)
        versions = ", ".join(f"{a.name}@{a.version}" for a in fresh.agents)
        logger.info(f"Agents reloaded from {self.directory}: {versions}")
        return ReloadResult(True, names)


# --- how the agents are shown -------------------------------------------------------------


class ToolInfo(BaseModel):
    """One of the agent's own functions, and where a call to it goes."""

    name: str
    kind: Literal["http", "python"]
    target: str = Field(description="The URL it POSTs to, or module:function")
    timeout_s: float
    filler: str | None = Field(description="Said once if the tool is slow")


class KnowledgeInfo(BaseModel):
    files: list[str]
    passages: int
    use: Literal["prompt", "searched"] = Field(
        description="prompt: small enough to sit in the system prompt; searched: the LLM "
        "calls search_knowledge"
    )


class OutcomeFieldInfo(BaseModel):
    name: str
    description: str
    values: list[str] = Field(description="The allowed answers; empty: free text")


class AnalysisInfo(BaseModel):
    """The post-call analysis the agent asks for (absent: none)."""

    summary: bool
    success: str | None = Field(description="What a successful call is, in words")
    success_when: dict[str, str] = Field(description="Offline: outcome values meaning success")
    fields: list[str]

    def described(self) -> str:
        """One line for the terminal and the page: what the analysis holds."""
        parts = ["summary"] if self.summary else []
        if self.success:
            parts.append(f'success "{self.success}"')
        if self.success_when:
            pairs = ", ".join(f"{name}={value}" for name, value in self.success_when.items())
            parts.append(f"success offline when {pairs}")
        if self.fields:
            parts.append(f"fields: {', '.join(self.fields)}")
        return "; ".join(parts) or "nothing asked"


class AgentInfo(BaseModel):
    name: str
    description: str | None
    default: bool = Field(description="Takes every call no other agent matches")
    match: dict[str, str] = Field(description="Call parameters that pick it, all of them")
    picked_by: str = Field(description="The same in words: the pairs, default, or only when named")
    version: str = Field(description="Hash of its file and knowledge, logged with each call")
    source: str = Field(description="The file it came from")
    tools: list[ToolInfo]
    knowledge: KnowledgeInfo | None
    outcome_fields: list[OutcomeFieldInfo]
    analysis: AnalysisInfo | None


class AgentsInfo(BaseModel):
    """The agent set in use: where it was read from, when, and every agent."""

    directory: str
    loaded_at: datetime
    agents: list[AgentInfo]


def describe(agents: AgentSet) -> AgentsInfo:
    return AgentsInfo(
        directory=agents.directory,
        loaded_at=agents.loaded_at,
        agents=[describe_agent(agent) for agent in agents.agents],
    )


def describe_agent(agent: Agent) -> AgentInfo:
    return AgentInfo(
        name=agent.name,
        description=agent.description or None,
        default=agent.default,
        match=dict(agent.match),
        picked_by=picked_by(agent),
        version=agent.version,
        source=agent.source,
        tools=[
            ToolInfo(name=tool.name, kind=tool.kind, target=shown_target(tool),
                     timeout_s=tool.timeout_s, filler=tool.filler)
            for tool in agent.tools
        ],  # fmt: skip
        knowledge=_knowledge(agent),
        outcome_fields=[
            OutcomeFieldInfo(name=f.name, description=f.description, values=list(f.values))
            for f in agent.outcome_fields
        ],
        analysis=_analysis(agent),
    )


def picked_by(agent: Agent) -> str:
    """Which calls get this agent, in words: `direction=inbound, session_type=support`,
    `default`, or `only when named` (the `agent` parameter, /dialout's or a campaign's)."""
    pairs = ", ".join(f"{key}={value}" for key, value in sorted(agent.match.items()))
    ways = [pairs] * bool(pairs) + ["default"] * agent.default
    return "; ".join(ways) or "only when named"


def _knowledge(agent: Agent) -> KnowledgeInfo | None:
    if agent.knowledge is None:
        return None
    passages = agent.knowledge.passages
    files = list(dict.fromkeys(passage.source for passage in passages))
    use = "searched" if agent.knowledge.searched() else "prompt"
    return KnowledgeInfo(files=files, passages=len(passages), use=use)


def _analysis(agent: Agent) -> AnalysisInfo | None:
    spec = agent.analysis
    if spec is None:
        return None
    return AnalysisInfo(
        summary=spec.summary,
        success=spec.success,
        success_when=dict(spec.success_when),
        fields=[field.name for field in spec.fields],
    )


def shown_target(tool: ToolSpec) -> str:
    """Where a tool goes, safe to show: a URL without its user, password or query string
    (which may carry a key), or the Python function's name."""
    if tool.url is None:
        return str(tool.python)
    url = tool.url
    port = f":{url.port}" if url.port and str(url.port) not in ("80", "443") else ""
    hidden = "?…" if url.query else ""
    return f"{url.scheme}://{url.host}{port}{url.path or ''}{hidden}"
