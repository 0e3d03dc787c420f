"""Hold log records written before logging is configured, when the logs are JSON.

Importing Pipecat logs a banner through loguru's default text handler, long before
`phonebot.ops.logs.configure_logging` runs (it needs the settings, which come after every
import). With LOG_FORMAT=json that one text line would be the first line a log collector
gets. So `server.py` imports this module first: with LOG_FORMAT=json (environment or
`./.env`, as `phonebot.config.get_settings` reads them) loguru's default handler is
replaced by a list, and `configure_logging` writes what it held in the configured format.

Otherwise loguru's default handler is replaced by the same one without `diagnose` and
`backtrace`, so no log line printed before `configure_logging` (or on Pipecat Cloud, where
it never runs) shows a frame's local variables. Only the standard library, python-dotenv
and loguru are imported here, so nothing can log before the swap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dotenv import dotenv_values
from loguru import logger

_held: list[dict] = []
_holding = False


def wants_json() -> bool:
    value = os.environ.get("LOG_FORMAT") or dotenv_values(Path.cwd() / ".env").get("LOG_FORMAT")
    return (value or "").strip().lower() == "json"


def hold_until_configured() -> None:
    """Swap loguru's default stderr handler for a list (configure_logging empties it)."""
    global _holding
    if _holding:
        return
    logger.remove()
    logger.add(lambda message: _held.append(message.record), level="DEBUG")
    _holding = True


def take_held() -> list[dict]:
    """The records held so far, oldest first; holding stops."""
    global _holding
    held = list(_held)
    _held.clear()
    _holding = False
    return held


def safe_default_handler() -> None:
    """Loguru's default stderr handler, without `diagnose` (which prints the crashed frame's
    local variables, keys included) and `backtrace`: what runs before, or without,
    `configure_logging` (the bot on Pipecat Cloud) must not print them either."""
    logger.remove()
    logger.add(sys.stderr, level="DEBUG", diagnose=False, backtrace=False)


if wants_json():
    hold_until_configured()
else:
    safe_default_handler()
