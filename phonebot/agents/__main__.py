"""`python -m phonebot.agents check [--dir DIR]`: every agent, what picks it, its tools,
knowledge and analysis, then every problem; exit 1 on any (phonebot.agents.cli)."""

import sys

from loguru import logger

# A report, not a server log: warnings and errors only (Pipecat's import banner is INFO).
logger.remove()
logger.add(sys.stderr, level="WARNING")

from phonebot.agents.cli import main  # noqa: E402  (after the log level is set)

if __name__ == "__main__":
    sys.exit(main())
