"""`python server.py --workers N`: N server processes on one machine, sharing one port.

One process uses one core (the event loop, VAD and turn inference all run on it), so a
machine with several cores runs several processes. The parent (this module's Supervisor)
binds the listening socket ONCE and starts N copies of `server.py --listen-fd FD`, which
inherit it; each is an ordinary server process (create_app + GracefulServer, its own
models, its own drain) serving connections from the shared socket. An idle process takes a
new connection first (every process waits on the socket; the first to wake accepts), so
calls go to the less loaded ones. The state they must agree on (admission, replays, stream
tokens, AMD verdicts, rate limits) is in Redis, which is why N > 1 needs REDIS_URL and a
configured STREAM_SECRET or TWILIO_AUTH_TOKEN (phonebot.web.safety refuses to start without).

Why a socket bound once rather than SO_REUSEPORT: with SO_REUSEPORT the kernel hashes each
connection to a process whether it is busy or not, and another program of the same user
could bind the port too. (This is also how uvicorn's and gunicorn's own workers share it.)

Signals and exit status (the parent is what Docker or Kubernetes signals):
- SIGTERM/SIGINT to the parent is forwarded once to every worker, which drains as a single
  server does (phonebot.web.shutdown); the parent restarts none of them and waits. A second
  signal is forwarded too (the workers exit at once). Workers run in their own session, so
  Ctrl-C in a terminal reaches them only through the parent (else each would get it twice,
  and a second signal means "exit now"); they get SIGTERM if the parent itself dies.
- SIGHUP to the parent is forwarded to every worker, each of which reloads its agents
  (phonebot.web.agents_api); nothing stops. A worker asked to reload by `POST
  /agents/reload` sends SIGHUP to the parent (`ask_supervisor_to_reload`), so a request
  that reached one worker reloads them all.
- Exit status: 0 every worker drained and exited 0; 1 a worker was cut off (second
  signal, killed after `supervisor_deadline_s`, or exited non-zero while stopping);
  2 configuration refused (a worker exited 2 at startup: nothing is restarted);
  3 workers kept dying (more than MAX_RESTARTS within RESTART_WINDOW_S): the parent gave up.
- A worker dying on its own (crash, OOM kill) is logged as an error with its exit status
  and restarted: the machine keeps its capacity, and its calls' admission leases expire in
  Redis within CALL_LEASE_TTL_S so their slots come back. Its callers are cut off either
  way; restarting is about the calls to come.

The workers share one PROMETHEUS_MULTIPROC_DIR (emptied at start; a dead worker's live
gauges are dropped with prometheus-client's `mark_process_dead`), so /metrics on any
worker reports the whole machine (phonebot.ops.metrics reads it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from phonebot.config import Settings
from phonebot.web.shutdown import (
    HANDLED_SIGNALS,
    HANG_UP_SLACK_S,
    UVICORN_CLOSE_TIMEOUT_S,
    WATCHDOG_SLACK_S,
)

EXIT_OK = 0
EXIT_CUT_OFF = 1
EXIT_CONFIG = 2  # also what server.py exits with when it refuses its configuration
EXIT_GAVE_UP = 3
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# Beyond a worker's own watchdog (phonebot.web.shutdown.watchdog), before the parent kills it.
SUPERVISOR_SLACK_S = 5.0
POLL_S = 0.1
LISTEN_BACKLOG = 2048
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# prometheus-client's multiprocess mode: every worker writes its series there.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Forwarded to every worker without stopping anything: reload the agent files.
RELOAD_SIGNAL = signal.SIGHUP
# The supervisor's pid, in its workers' environment: whom `ask_supervisor_to_reload` signals.
SUPERVISOR_PID_ENV = "PHONEBOT_SUPERVISOR_PID"


def worker_exit_deadline_s(settings: Settings) -> float:
    """The longest a worker takes from SIGTERM to exit: its drain (grace, goodbye, hang-up)
    plus uvicorn's close, after which its own watchdog ends it. Also the floor for an
    orchestrator's kill timeout (deploy/k8s terminationGracePeriodSeconds)."""
    drain = settings.shutdown_grace_s + settings.shutdown_goodbye_timeout_s + HANG_UP_SLACK_S
    return drain + UVICORN_CLOSE_TIMEOUT_S + WATCHDOG_SLACK_S


def supervisor_deadline_s(settings: Settings) -> float:
    """How long the parent waits for draining workers before it kills what is left."""
    return worker_exit_deadline_s(settings) + SUPERVISOR_SLACK_S


def listening_socket(host: str, port: int) -> socket.socket:
    """The one socket every worker accepts on, bound here so all share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def inherited_socket(fd: int) -> socket.socket:
    """A worker's view of the parent's listening socket (`server.py --listen-fd FD`)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM (a drain) when the parent dies, so a killed
    supervisor leaves no orphans serving the port. Best effort: Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepare_worker() -> None:
    """In the worker before exec: die with the parent, and start with SIGHUP ignored (kept
    across exec) until its app reloads on it; a reload forwarded while a worker is still
    importing would otherwise kill it."""
    _die_with_parent()
    signal.signal(RELOAD_SIGNAL, signal.SIG_IGN)


@dataclass
class Worker:
    index: int
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass
class Supervisor:
    """Starts `count` workers on `sock`, restarts the ones that die, forwards signals.

    `command` is the worker's argv without the socket argument (`--listen-fd FD` and
    `--worker-index I` are appended).
    """

    command: list[str]
    count: int
    sock: socket.socket
    deadline_s: float
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    workers: dict[int, Worker] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)
    crashes: deque[float] = field(default_factory=deque)
    signals: list[int] = field(default_factory=list)
    stopping_since: float | None = None
    forced: bool = False
    outcome: int | None = None  # set when the parent decides to stop on its own
    metrics_dir: Path | None = None

    def run(self) -> int:
        """Supervise until every worker has exited; returns the exit status (module doc)."""
        handled = (*HANDLED_SIGNALS, RELOAD_SIGNAL)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            with shared_metrics_dir(self.env.get(MULTIPROC_ENV)) as folder:
                self.metrics_dir = folder
                self.env[MULTIPROC_ENV] = str(folder)
                self.env[SUPERVISOR_PID_ENV] = str(os.getpid())
                for index in range(1, self.count + 1):
                    self._start(index)
                logger.info(f"Supervisor (pid {os.getpid()}): {self.count} workers started")
                while self.workers:
                    self._handle_signals()
                    self._reap()
                    self._kill_if_overdue()
                    time.sleep(POLL_S)
            return self._exit_status()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()

    def _on_signal(self, sig: int, frame: object) -> None:
        self.signals.append(sig)  # handled in the loop, not inside the signal handler

    def _start(self, index: int) -> None:
        fd = self.sock.fileno()
        argv = [*self.command, "--listen-fd", str(fd), "--worker-index", str(index)]
        process = subprocess.Popen(
            argv, env=self.env, pass_fds=(fd,), start_new_session=True,
            preexec_fn=_prepare_worker,
        )  # fmt: skip
        self.workers[index] = Worker(index, process)
        logger.info(f"Worker {index}/{self.count} started (pid {process.pid})")

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            name = signal.Signals(sig).name
            if sig == RELOAD_SIGNAL:
                self._forward_reload()
                continue
            if self.stopping_since is None:
                logger.info(f"{name}: draining {len(self.workers)} worker(s); none restarted")
                self.stopping_since = time.monotonic()
            else:
                logger.warning(f"{name} again: workers exit now, cutting off their calls")
                self.forced = True
            self._forward(sig)

    def _forward_reload(self) -> None:
        """SIGHUP to every worker: each reloads its agents and logs the result. Not while
        stopping: a draining worker starts no new call, so new files are of no use to it."""
        if self.stopping_since is not None:
            logger.warning("SIGHUP while the workers stop: not forwarded")
            return
        logger.info(f"SIGHUP: {len(self.workers)} worker(s) reload their agents")
        self._forward(RELOAD_SIGNAL)

    def _forward(self, sig: int) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[index]
            worker_exited(worker.pid, self.metrics_dir)
            if self.stopping_since is not None:
                self.exits[index] = code
                log = logger.info if code == 0 else logger.warning
                log(f"Worker {index} (pid {worker.pid}) stopped: {describe_exit(code)}")
            elif code == EXIT_CONFIG:
                logger.error(f"Worker {index} refused its configuration; stopping all workers")
                self._stop_all(EXIT_CONFIG)
            else:
                self._restart_or_give_up(worker, code)

    def _restart_or_give_up(self, worker: Worker, code: int) -> None:
        logger.error(
            f"Worker {worker.index} (pid {worker.pid}) died unexpectedly "
            f"({describe_exit(code)}); its calls were cut off"
        )
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > RESTART_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) > MAX_RESTARTS:
            logger.error(
                f"{len(self.crashes)} worker deaths within {RESTART_WINDOW_S:g} s; giving up"
            )
            self._stop_all(EXIT_GAVE_UP)
            return
        self._start(worker.index)

    def _stop_all(self, outcome: int) -> None:
        """Drain the remaining workers, then exit with `outcome`."""
        self.outcome = outcome
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self._forward(signal.SIGTERM)

    def _kill_if_overdue(self) -> None:
        if self.stopping_since is None:
            return
        if time.monotonic() - self.stopping_since <= self.deadline_s:
            return
        for worker in self.workers.values():
            logger.error(f"Worker {worker.index} (pid {worker.pid}) overdue; killing it")
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        self.forced = True
        self.stopping_since = time.monotonic()  # the kill lands within the next poll or two

    def _exit_status(self) -> int:
        if self.outcome is not None:
            return self.outcome
        if self.forced or any(code != 0 for code in self.exits.values()):
            return EXIT_CUT_OFF
        return EXIT_OK


@contextlib.contextmanager
def shared_metrics_dir(given: str | None) -> Iterator[Path]:
    """The workers' PROMETHEUS_MULTIPROC_DIR: `given`, or a temporary folder removed after.

    Emptied first: an earlier run's files would add their counts to this one's.
    """
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="phonebot-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    try:
        yield folder
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


def worker_exited(pid: int, folder: Path | None) -> None:
    """A worker is gone: drop its live gauges from /metrics (its counters stay)."""
    if folder is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(folder))


def run_workers(settings: Settings, count: int, server_script: Path) -> int:
    """The parent of `python server.py --workers N`: bind, start, supervise; exit status."""
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as error:
        logger.error(f"Cannot listen on {settings.host}:{settings.port}: {error}")
        return EXIT_CONFIG
    logger.info(f"Listening on {settings.host}:{settings.port} for {count} workers")
    if settings.database_url.get_secret_value().startswith("sqlite"):
        # Works (SQLite locks across processes) but every record write and campaign claim
        # of every worker then queues for one file lock: say so once, at start.
        logger.warning(
            f"{count} workers share one SQLite file for call records and campaigns; "
            "set DATABASE_URL to PostgreSQL for several processes (docs/scaling.md)"
        )
    command = [sys.executable, str(server_script)]
    # WORKERS in the workers' environment too, so each applies the same configuration
    # checks and metrics mode as the parent (`--workers N` may have set it on the command line).
    env = {**os.environ, "WORKERS": str(count)}
    return Supervisor(command, count, sock, supervisor_deadline_s(settings), env=env).run()


def ask_supervisor_to_reload() -> bool:
    """In a worker of `server.py --workers N`: SIGHUP to the supervisor, which forwards it
    to every worker (each reloads its agents); False in a one-process server.

    Only the process that started this one, and said so in SUPERVISOR_PID_ENV, is
    signalled: never a pid that merely appears in an inherited environment.
    """
    parent = os.getppid()
    if os.environ.get(SUPERVISOR_PID_ENV) != str(parent):
        return False
    try:
        os.kill(parent, RELOAD_SIGNAL)
    except OSError as error:
        logger.warning(f"Could not ask the supervisor (pid {parent}) to reload: {error}")
        return False
    logger.info(f"Asked the supervisor (pid {parent}) to reload every worker's agents")
    return True
