"""What the throw-away test servers (tests/redis_server.py, tests/pg_server.py) share."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def skip_or_fail(skip_line: str, ci_failure: str) -> NoReturn:
    """A server the test needs is not installed: skip with one line, except under CI=true,
    where it fails: CI installs it (.ci/run), so a missing server there is a broken setup."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(ci_failure)
    pytest.skip(skip_line)
