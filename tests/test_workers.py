"""`python server.py --workers N`: N processes sharing one port (phonebot.web.workers).

The supervisor's rules (signals forwarded once per signal, no restart while stopping, a
dead worker restarted, a crash loop or a refused configuration ending it, the exit status)
are tested with tiny stand-in workers: fast and exact. Then the real thing: two
`server.py` workers on one Redis both serve the port, SIGTERM drains both and exits 0,
and two workers without REDIS_URL are refused.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loguru import logger

from phonebot.config import Settings
from phonebot.web.workers import (
    EXIT_CONFIG,
    EXIT_CUT_OFF,
    EXIT_GAVE_UP,
    EXIT_OK,
    MAX_RESTARTS,
    Supervisor,
    listening_socket,
    supervisor_deadline_s,
    worker_exit_deadline_s,
)
from tests.conftest import AUTH_TOKEN
from tests.live_server import ROOT, LiveServer, free_port

pytest_plugins = ["tests.redis_server"]

# A stand-in worker: says hello on the inherited socket, then behaves as FAKE_MODE says.
FAKE_WORKER = r"""
import os, signal, socket, sys, threading, time
fd = int(sys.argv[sys.argv.index("--listen-fd") + 1])
index = sys.argv[sys.argv.index("--worker-index") + 1]
sock = socket.socket(fileno=fd)
mode = os.environ["FAKE_MODE"]
print(f"fake worker {index} pid {os.getpid()} mode {mode}", flush=True)
if mode == "config":
    sys.exit(2)
if mode == "crash":
    time.sleep(0.1)
    os._exit(7)
signals = []
def on_signal(sig, frame):
    signals.append(sig)
    print(f"fake worker {index} got {signal.Signals(sig).name} #{len(signals)}", flush=True)
    if len(signals) == 2:
        os._exit(1)
signal.signal(signal.SIGTERM, on_signal if mode != "hang" else signal.SIG_IGN)
signal.signal(signal.SIGINT, on_signal)
def serve():
    while True:
        connection, _ = sock.accept()
        connection.sendall(str(os.getpid()).encode())
        connection.close()
threading.Thread(target=serve, daemon=True).start()
while not signals or mode == "hang":
    time.sleep(0.02)
time.sleep(float(os.environ.get("FAKE_DRAIN_S", "0.3")))  # "draining"
sys.exit(0)
"""


class FakeFleet:
    """A Supervisor of stand-in workers run on a thread, with the log it writes."""

    def __init__(
        self, mode: str, count: int = 2, deadline_s: float = 10.0, drain_s: float = 0.3
    ) -> None:
        self.sock = listening_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        env = {**os.environ, "FAKE_MODE": mode, "FAKE_DRAIN_S": str(drain_s)}
        self.supervisor = Supervisor([sys.executable, "-c", FAKE_WORKER], count, self.sock,
                                     deadline_s, env=env)
        self.lines: list[str] = []
        self.sink = logger.add(lambda m: self.lines.append(m.rstrip()), format="{message}")
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.status = self.supervisor.run()

    def start(self) -> FakeFleet:
        # Signals are delivered to the main thread in Python, so the supervisor's handlers
        # are replaced by direct appends in these tests (`signal`).
        self.thread.start()
        return self

    def signal(self, sig: int) -> None:
        self.supervisor.signals.append(sig)

    def pids(self) -> set[int]:
        return {worker.pid for worker in self.supervisor.workers.values()}

    def wait_workers(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` workers run and have had time to install their signal handlers
        (a SIGTERM before that kills a worker: exit status 1, not a drain)."""
        deadline = time.monotonic() + timeout_s
        while len(self.supervisor.workers) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)

    def wait(self, timeout_s: float = 20.0) -> int | None:
        self.thread.join(timeout_s)
        logger.remove(self.sink)
        return self.status

    def ask_pid(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            return int(connection.recv(32))


@pytest.fixture
def fleets() -> Iterator[list[FakeFleet]]:
    started: list[FakeFleet] = []
    yield started
    for fleet in started:
        for worker in fleet.supervisor.workers.values():
            worker.process.kill()
        fleet.thread.join(5)


def run_fleet(fleets: list[FakeFleet], mode: str, **kwargs) -> FakeFleet:
    fleet = FakeFleet(mode, **kwargs)
    fleets.append(fleet)
    return fleet.start()


# Supervisor.run installs signal handlers, which only the main thread may do.
@pytest.fixture(autouse=True)
def _signals_from_any_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signal, "signal", lambda sig, handler: None)


def test_workers_share_the_port_and_drain_on_one_forwarded_sigterm(fleets):
    fleet = run_fleet(fleets, "serve")
    fleet.wait_workers(2)
    pids = fleet.pids()
    answered = {fleet.ask_pid() for _ in range(40)}
    assert answered <= pids and answered, (answered, pids)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == EXIT_OK
    text = "\n".join(fleet.lines)
    assert "SIGTERM: draining 2 worker(s)" in text
    assert text.count("stopped: exit status 0") == 2
    assert "started (pid" in text and text.count("started (pid") == 2  # none restarted


def test_a_second_signal_is_forwarded_and_the_exit_says_calls_were_cut_off(fleets):
    fleet = run_fleet(fleets, "serve", drain_s=30)
    fleet.wait_workers(2)
    fleet.signal(signal.SIGTERM)  # the workers start a 30 s "drain"
    time.sleep(0.5)
    fleet.signal(signal.SIGTERM)  # forwarded: each worker's second signal, exit at once
    started = time.monotonic()
    assert fleet.wait() == EXIT_CUT_OFF
    assert time.monotonic() - started < 10
    assert any("SIGTERM again: workers exit now" in line for line in fleet.lines)
    assert sum("stopped: exit status 1" in line for line in fleet.lines) == 2


def test_workers_that_outlive_the_deadline_are_killed(fleets):
    fleet = run_fleet(fleets, "hang", deadline_s=1.0)
    fleet.wait_workers(2)
    fleet.signal(signal.SIGTERM)
    started = time.monotonic()
    assert fleet.wait() == EXIT_CUT_OFF
    assert time.monotonic() - started < 10
    assert sum("overdue; killing it" in line for line in fleet.lines) == 2
    assert sum("stopped: killed by SIGKILL" in line for line in fleet.lines) == 2


def test_a_worker_that_dies_is_logged_and_restarted(fleets):
    fleet = run_fleet(fleets, "serve")
    fleet.wait_workers(2)
    victim = next(iter(fleet.supervisor.workers.values()))
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        victim.pid in fleet.pids() or len(fleet.supervisor.workers) < 2
    ):
        time.sleep(0.05)
    assert len(fleet.pids()) == 2 and victim.pid not in fleet.pids()
    assert any(
        f"Worker {victim.index} (pid {victim.pid}) died unexpectedly (killed by SIGKILL)" in line
        for line in fleet.lines
    ), fleet.lines
    time.sleep(1.0)  # the new worker installs its handlers
    answered = {fleet.ask_pid() for _ in range(40)}
    assert answered <= fleet.pids(), (answered, fleet.pids())  # none from the dead one
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == EXIT_OK


def test_workers_dying_over_and_over_make_the_supervisor_give_up(fleets):
    fleet = run_fleet(fleets, "crash", count=1)
    assert fleet.wait() == EXIT_GAVE_UP
    assert sum("died unexpectedly (exit status 7)" in line for line in fleet.lines) == (
        MAX_RESTARTS + 1
    )
    assert any("giving up" in line for line in fleet.lines)


def test_a_worker_refusing_its_configuration_stops_all_without_restarts(fleets):
    fleet = run_fleet(fleets, "config")
    assert fleet.wait() == EXIT_CONFIG
    assert not any("died unexpectedly" in line for line in fleet.lines)


def test_workers_share_a_fresh_prometheus_multiprocess_dir(fleets, tmp_path: Path):
    stale = tmp_path / "gauge_livesum_123.db"
    stale.write_bytes(b"old run")
    fleet = FakeFleet("serve")
    fleet.supervisor.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    fleets.append(fleet)
    fleet.start()
    fleet.wait_workers(2)
    assert not stale.exists()
    for worker in fleet.supervisor.workers.values():
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
        assert f"PROMETHEUS_MULTIPROC_DIR={tmp_path}".encode() in environ
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == EXIT_OK


def test_the_kill_deadline_covers_a_workers_whole_drain():
    settings = Settings(shutdown_grace_s=30, shutdown_goodbye_timeout_s=10)
    # grace + goodbye + hang-up slack (5) + uvicorn close (5) + watchdog slack (5)
    assert worker_exit_deadline_s(settings) == 55
    assert supervisor_deadline_s(settings) > worker_exit_deadline_s(settings)


# --- the real server -------------------------------------------------------------


def workers_env(redis_url: str | None) -> dict[str, str]:
    env = {"WORKERS": "2", "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "STREAM_SECRET": "s" * 32,
           "SHUTDOWN_GRACE_S": "1"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def pids_serving(server: LiveServer, want: int, attempts: int = 200) -> set[int]:
    """PIDs answering /health (a field of it) on the shared port, until `want` are seen."""
    seen: set[int] = set()
    for _ in range(attempts):
        # A new connection each time: the workers race to accept each one.
        seen.add(httpx.get(f"{server.base_url}/health", timeout=5).json()["pid"])
        if len(seen) >= want:
            break
    return seen


def test_two_workers_on_redis_serve_one_port_and_drain_on_sigterm(redis_server, tmp_path: Path):
    """(A dead worker's restart is tested with the stand-ins above: a real one takes as
    long to load its models as the whole server, and the supervisor is the same.)"""
    server = LiveServer(workers_env(redis_server.url), tmp_path)
    try:
        parent = server._process.pid
        pids = pids_serving(server, 2)
        assert len(pids) == 2 and parent not in pids, pids
        for pid in pids:
            assert server.wait_for_log(f"(pid {pid}) serving")
        # LiveServer's records are a SQLite file: one file lock for every worker, said once.
        assert server.log_text().count("2 workers share one SQLite file") == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0, server.log_text()[-3000:]
        assert server.log_text().count("stopped: exit status 0") == 2
        assert server.log_text().count("Shutdown: no calls left; exiting") == 2
    finally:
        server.stop()


def test_two_workers_without_redis_are_refused_with_exit_2(tmp_path: Path):
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HOST": "127.0.0.1",
        "PORT": str(free_port()), **workers_env(None),
    }
    done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--workers", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "REDIS_URL" in done.stderr
    assert "started (pid" not in done.stderr
