"""Which agent takes a call: the one the call names, else the most specific match, else
the default.

A call's facts are its Stream parameters plus `direction` (inbound or outbound). An agent
matches when every pair in its `match` is among them; the one with the most pairs wins
(the loader refuses two agents that could tie), and the `default: true` agent takes the
rest. An `agent` parameter (set by /dialout, dialout.py or a campaign's `"agent"`) names
the agent outright.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from loguru import logger

from phonebot.agents.agent import Agent

AGENT_PARAMETER = "agent"


@dataclass(frozen=True)
class AgentSet:
    """The agents loaded together from one AGENTS_DIR; never changed once built."""

    agents: tuple[Agent, ...]
    directory: str = ""
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def by_name(self, name: str) -> Agent | None:
        return next((agent for agent in self.agents if agent.name == name), None)

    @property
    def default(self) -> Agent:
        return next(agent for agent in self.agents if agent.default)

    def select(self, parameters: Mapping[str, str]) -> Agent:
        """The agent for a call with these Stream parameters."""
        named = parameters.get(AGENT_PARAMETER)
        if named:
            if (agent := self.by_name(named)) is not None:
                return agent
            logger.warning(f"No agent named {named!r}; choosing by the call's parameters")
        facts = {**parameters, "direction": parameters.get("call_type", "inbound")}
        matching = [
            agent
            for agent in self.agents
            if agent.match and all(facts.get(k) == v for k, v in agent.match.items())
        ]
        if not matching:
            return self.default
        return max(matching, key=lambda agent: len(agent.match))
