"""The phone bot's server: `python server.py [--workers N]`.

uvicorn on PORT (default 8000) serving the app of `phonebot.web.app` (its routes are listed
there); `--workers N` (or WORKERS=N) > 1 runs N processes sharing the port
(`phonebot.web.workers`). SIGTERM drains calls before exiting, a second one exits now
(`phonebot.web.shutdown`); SIGHUP reloads the agent files (`phonebot.web.agents_api`).
"""

from __future__ import annotations

# First: with LOG_FORMAT=json, what Pipecat logs on import is held for the JSON log.
import phonebot.ops.log_start  # noqa: F401  # isort: skip

import argparse
import os
import signal
import sys
from pathlib import Path

import uvicorn
from loguru import logger

from phonebot.agents.loader import AgentFileError, load_agents
from phonebot.config import Settings, get_settings
from phonebot.db.engine import UnsupportedDatabase
from phonebot.ops.logs import configure_logging
from phonebot.twilio.stream_guard import MAX_MEDIA_MESSAGE_BYTES
from phonebot.web.app import create_app
from phonebot.web.safety import UnsafeConfiguration, require_safe_configuration
from phonebot.web.services import app_services
from phonebot.web.shutdown import UVICORN_CLOSE_TIMEOUT_S, Drain, GracefulServer
from phonebot.web.workers import EXIT_CONFIG, inherited_socket, run_workers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The phone bot's server (docs/deploy.md; several processes: docs/scaling.md)."
    )
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="server processes sharing the port (default: WORKERS, 1); N > 1 needs REDIS_URL",
    )  # fmt: skip
    # Set by the supervisor (phonebot.web.workers) on the workers it starts, not by hand.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """uvicorn, with our signal handling: SIGTERM drains calls, a second one exits now.

    With `--workers N` (or WORKERS=N) > 1 this process binds the port and supervises N
    copies of itself that share it (`phonebot.web.workers`); each copy, started with
    `--listen-fd`, is the one-process server (`serve`).
    """
    args = parse_args(argv)
    # Until the app (or the supervisor) reloads on SIGHUP, one must not kill the server:
    # a `systemctl reload` during the start is a reload of files just read.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = get_settings()
    if args.workers is not None:
        settings = settings.model_copy(update={"workers": args.workers})
    configure_logging(settings)
    if settings.workers > 1 and args.listen_fd is None:
        sys.exit(supervise(settings))
    sys.exit(serve(settings, args.listen_fd, args.worker_index))


def supervise(settings: Settings) -> int:
    """Run `settings.workers` copies of this script on one port; their exit status."""
    try:
        require_safe_configuration(settings)  # REDIS_URL, STREAM_SECRET: refused early
        load_agents(Path(settings.agents_dir), settings)  # one report, not one per worker
    except UnsafeConfiguration as problem:
        logger.error(str(problem))
        return EXIT_CONFIG
    except AgentFileError as problem:
        logger.error(f"The server refuses to start: {problem.report()}")
        return EXIT_CONFIG
    return run_workers(settings, settings.workers, Path(__file__).resolve())


def serve(settings: Settings, listen_fd: int | None, worker_index: int) -> int:
    """One process: the app on uvicorn, on PORT or on the supervisor's socket; its exit
    status (EXIT_CONFIG for settings the app refuses)."""
    try:
        app = create_app(settings)
    except (UnsafeConfiguration, UnsupportedDatabase) as problem:
        logger.error(str(problem))
        return EXIT_CONFIG
    except AgentFileError as problem:
        logger.error(f"The server refuses to start: {problem.report()}")
        return EXIT_CONFIG
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=MAX_MEDIA_MESSAGE_BYTES,
        timeout_graceful_shutdown=UVICORN_CLOSE_TIMEOUT_S,
        # X-Forwarded-For is read in one place only, `phonebot.web.guards.client_ip`, and
        # only for TRUSTED_PROXY_HOPS: uvicorn's own reading (on by default, trusting
        # 127.0.0.1) would let a loopback client pick its address, whatever that says.
        proxy_headers=False,
        server_header=False,  # `server: uvicorn` tells a stranger what to probe for
        # uvicorn's C event loop: at 40 steady calls in one process the loop's own work
        # (readiness, socket writes) was a fifth of its time, and uvloop cut the server's
        # CPU by ~13 % and the p95 reply from ~1 s to ~0.6 s (docs/scaling.md "Capacity per
        # core"). Not httptools: a call's media never goes through the HTTP parser (one
        # request per webhook), and with it a webhook flood (tests/test_abuse.py) was
        # parsed in bites big enough to break a live call's greeting.
        loop="uvloop",
        http="h11",
    )
    services = app_services(app)
    server = GracefulServer(config, Drain(settings, services.admission, services.calls))
    sockets = None
    if listen_fd is not None:
        sockets = [inherited_socket(listen_fd)]
        logger.info(f"Worker {worker_index}/{settings.workers} (pid {os.getpid()}) serving")
    server.run(sockets=sockets)
    return server.exit_code


if __name__ == "__main__":
    main()
