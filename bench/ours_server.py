"""`server.py` as the load benchmark runs it: the same server, plus its turn-timing lines.

The server logs one DEBUG line per caller turn (`Call <CallSid> turn timing {...}`, see
`phonebot.turns`), which the benchmark collects to show where each reply's time went. It
needs those lines but not the rest of DEBUG (Pipecat's pipeline events, ~135 lines per
30 s call): they would cost the measured process a little CPU for nothing, and bury the
warnings and errors that the benchmark shows from the log's tail when a step breaks.
LOG_LEVEL is one level for every logger, so this wrapper adds one loguru sink that lets
only the timing lines through, after the server has configured its own logging (which
removes all sinks first). Everything else about the server is untouched: `server.main()`
runs as is. If the lines stop arriving, `load.py` says so under the step's row.

Run: `PYTHONPATH=. python bench/ours_server.py` (environment as for `server.py`).
"""

from __future__ import annotations

import sys

from loguru import logger

import server
from phonebot.config import Settings

TIMING_MARK = " turn timing {"  # the line's fixed part; bench/load_stats.py parses it


def timing_only(record) -> bool:
    return TIMING_MARK in record["message"]


def configure_logging_with_timing(settings: Settings) -> None:
    """The server's logging, then a DEBUG sink on stderr for the turn-timing lines only."""
    configure_logging(settings)
    logger.add(sys.stderr, level="DEBUG", filter=timing_only, format="{message}")


configure_logging = server.configure_logging

if __name__ == "__main__":
    # server.main() calls configure_logging by its name in server's namespace.
    server.configure_logging = configure_logging_with_timing
    server.main()
