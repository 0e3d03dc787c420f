"""Shared fixtures: settings built in the test, never from a developer's environment."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from functools import cache

import pytest
from loguru import logger

from phonebot.agents.agent import Agent
from phonebot.agents.loader import load_agents
from phonebot.agents.selection import AgentSet
from phonebot.config import SHIPPED_AGENTS_DIR, Settings

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT_SID = "AC" + "0" * 32
DIALOUT_KEY = "test-dialout-key-abcdef"


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Drop every setting from the real environment so tests see only what they pass."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    # Apps built in the test process keep call records in pytest's temp folder, never in a
    # phonebot.db in the working directory (the repository).
    records = tmp_path_factory.getbasetemp() / "phonebot.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{records}")


@cache
def shipped_agents() -> AgentSet:
    """The example agents in the repository's agents/ (what a fresh clone runs with)."""
    return load_agents(SHIPPED_AGENTS_DIR, make_settings())


def shipped_agent(name: str) -> Agent:
    agent = shipped_agents().by_name(name)
    assert agent is not None, f"no shipped agent {name!r}"
    return agent


def make_settings(**overrides) -> Settings:
    values = {
        "twilio_account_sid": ACCOUNT_SID,
        "twilio_auth_token": AUTH_TOKEN,
        "twilio_phone_number": "+15550001111",
        "dialout_api_key": DIALOUT_KEY,
        "stream_secret": "test-stream-secret",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every loguru line logged during the test, as "LEVEL message"."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.rstrip("\n")), format="{level} {message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that call configure_logging: it writes to pytest's captured stderr, which
    is closed after the test, so loguru and stdlib logging go back to the real stderr."""
    yield
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.__stderr__)
    logging.basicConfig(handlers=[logging.StreamHandler(sys.__stderr__)], force=True)


@pytest.fixture
def settings() -> Settings:
    return make_settings()
