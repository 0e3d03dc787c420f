"""A throw-away Redis server for the shared-state tests: `redis_server` fixture.

Test modules load it with `pytest_plugins = ["tests.redis_server"]` and ask for
`redis_server`: a fresh `redis-server` on a free loopback port in a temporary folder, with
persistence off (`--save '' --appendonly no`), stopped after the test. One per test: it
starts in a few milliseconds, and tests that stop or restart it (the outage tests) can't
disturb each other. `.stop()`, `.start()` and `.restart()` keep the same port, so a client
built from `.url` sees a real outage and a real recovery, not a new server.

Without redis-server the test skips with one line, except under CI=true, where it fails:
CI installs it (.ci/run), so a missing server there is a broken setup, not a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.redis_server import NOT_INSTALLED, RedisMissing, RedisServer, start_redis
from tests.server_procs import skip_or_fail

MISSING = f"{NOT_INSTALLED}: Redis tests skipped"


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started redis-server, stopped and removed on exit; skips/fails when missing."""
    try:
        server = start_redis()
    except RedisMissing:
        skip_or_fail(MISSING, "CI=true but redis-server is not installed (.ci/run installs it)")
    except (OSError, RuntimeError) as error:
        pytest.fail(f"could not start redis-server: {error}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis for this test, stopped and removed afterwards."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def module_redis_server() -> Iterator[RedisServer]:
    """One Redis for a module's tests (e.g. behind server processes started once); tests
    that stop or restart Redis use `redis_server` instead."""
    with running_redis() as server:
        yield server
