"""The processes under test: our server, the Pipecat-example baseline, the instant AI API.

Each runs as its own subprocess from a scratch working directory (so no developer `.env`
leaks in), on a free loopback port, with its log kept in a file for when a step breaks.
`ProcessMeter` reads the server's CPU time and RSS from /proc: the load generator runs on
the same machine, so only the server's own processes are measured, its worker processes
included (`--server-workers K`: ours supervises K copies of `server.py`, the baseline runs
K uvicorn workers; both are children of the process started here).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from phonebot.config import mask

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def instant_env(ai_base_url: str) -> dict[str, str]:
    """Point every OpenAI service (LLM, STT, TTS) at the instant AI API."""
    return {
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": ai_base_url,
        "OPENAI_STT_BASE_URL": ai_base_url,
        "OPENAI_TTS_BASE_URL": ai_base_url,
    }


def ours_env(max_calls: int) -> dict[str, str]:
    """Our server tuned for a benchmark: no call cap in the way, no re-prompts mid-script.

    The caller scripts pause for at most a few seconds, so the silence timeout is set well
    past that; a re-prompt would be a bot turn the script didn't ask for.
    """
    return {
        "MAX_CONCURRENT_CALLS": str(max(500, 2 * max_calls)),
        "SILENCE_TIMEOUT_S": "60",
        "PIPELINE_IDLE_TIMEOUT_S": "60",
        "SHUTDOWN_GRACE_S": "0",
        # INFO keeps the log to a few lines per call; LOG_TURN_TIMING writes the per-turn
        # timing lines (phonebot.call.turns) at INFO, for where each reply's time went.
        "LOG_LEVEL": "INFO",
        "LOG_TURN_TIMING": "true",
    }


@dataclass
class ServerProcess:
    """A subprocess serving HTTP on `port`; `ready_path` answers once it can take calls."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str = "/health"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServerProcess:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.log_path = workdir / "server.log"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(workdir)),
            "PYTHONPATH": str(ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            **self.env,
        }
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at startup:\n{self.log_tail()}")
            try:
                httpx.get(self.base_url + self.ready_path, timeout=1)
                return  # any HTTP answer: the server is up
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {STARTUP_TIMEOUT_S:g} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_size(self) -> int:
        """Bytes logged so far: where the next run's log lines will start."""
        if self.log_path is None or not self.log_path.exists():
            return 0
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        """The lines logged after `offset` (from `log_size`)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").splitlines()

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The instant LLM's answer after its echo: a short reply (~4 s spoken with the echo), so a
# steady caller's turn (phrase, reply, pause) fits in the 6-10 s the steady pattern asks for.
ANSWER = "We are open nine to five."


def ai_api_process(transcript: str, answer: str = ANSWER) -> ServerProcess:
    """`python -m phonebot.emulator.ai_api`: instant, deterministic OpenAI look-alike.

    Every transcription returns `transcript` and every reply is the echo plus `answer`,
    so every reply is the same length on both servers whatever the caller said.
    """
    port = free_port()
    command = [sys.executable, "-m", "phonebot.emulator.ai_api", "--port", str(port)]
    command += ["--transcript", transcript, "--answer", answer]
    return ServerProcess("ai-api", command, {}, ready_path="/_emulator/requests", port=port)


def workers_env(workers: int, redis_url: str | None, max_calls: int) -> dict[str, str]:
    """`WORKERS=K`; with K > 1 our server also needs what its processes share: Redis and a
    stream secret (phonebot.web.safety refuses to start without), and no per-process cap."""
    env = {"WORKERS": str(workers)}
    if workers > 1:
        if redis_url is None:
            raise ValueError("several server workers need a Redis (REDIS_URL)")
        cap = str(max(500, 2 * max_calls))
        env |= {"REDIS_URL": redis_url, "STREAM_SECRET": secrets.token_hex(32)}
        env |= {"MAX_CALLS_PER_PROCESS": cap}
    return env


def env_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """`--server-env` / `--compare-env` arguments (NAME=VALUE) as a mapping; ValueError
    naming the first one without a name and an `=`."""
    bad = next((pair for pair in pairs if not pair.partition("=")[0] or "=" not in pair), None)
    if bad is not None:  # the argument may be a key given without its name: not echoed
        raise ValueError(f"expected NAME=VALUE (e.g. WORKERS=2), got {mask(bad)!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def ours_process(
    max_calls: int,
    extra_env: dict[str, str],
    workers: int = 1,
    redis_url: str | None = None,
    name: str = "ours",
) -> ServerProcess:
    """`python server.py` (WORKERS=`workers`), logging the per-turn timing lines (`ours_env`);
    `name` tells it apart in messages and its log folder (`ours-variant`, …)."""
    command = [sys.executable, str(ROOT / "server.py")]
    env = {**ours_env(max_calls), **workers_env(workers, redis_url, max_calls), **extra_env}
    return ServerProcess(name, command, env)


def baseline_process(extra_env: dict[str, str], workers: int = 1) -> ServerProcess:
    """`bench/baseline_server.py`, with `workers` uvicorn worker processes."""
    command = [sys.executable, str(BENCH / "baseline_server.py")]
    return ServerProcess("baseline", command, {**extra_env, "WORKERS": str(workers)}, "/")


# ------------------------------------------------------------------ measuring


# Indexes into `_stat_of`'s fields (proc(5) fields 14-17, counted after the command name):
OWN_TIMES = (11, 12)  # utime, stime: the process's (or the thread's) own CPU
REAPED_TIMES = (13, 14)  # cutime, cstime: its children that it has waited for


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    return _stat_of(Path(f"/proc/{pid}/stat"))


def _stat_of(path: Path) -> list[str]:
    stat = path.read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants: a server that forks helpers is measured whole."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(parents.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time of a process tree: utime + stime (+ reaped children's), in seconds."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = _stat(member)
        except OSError:
            continue
        total += sum(int(fields[k]) for k in (*OWN_TIMES, *REAPED_TIMES))
    return total / CLOCK_TICKS


def main_thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each process's main thread in `pid`'s tree: the thread that runs a
    server's event loop (the models' inference threads are others). Why: a process
    saturates when its loop does, long before the process's CPU reaches its cores."""
    seconds = {}
    for member in process_tree(pid):
        try:
            fields = _stat_of(Path(f"/proc/{member}/task/{member}/stat"))
        except OSError:
            continue
        seconds[member] = sum(int(fields[k]) for k in OWN_TIMES) / CLOCK_TICKS
    return seconds


def busiest_loop_cpu(start: dict[int, float], end: dict[int, float]) -> float | None:
    """The largest main-thread CPU between two `main_thread_cpu` readings (the processes
    in both), in seconds; None if none was in both."""
    deltas = [end[pid] - start[pid] for pid in end.keys() & start.keys()]
    return max(deltas, default=None)


@dataclass(frozen=True)
class MachineCpu:
    """A reading of the whole machine (/proc/stat) and of this benchmark's processes.

    Why: on a shared or virtual machine, what else runs moves a run's figures more than
    most changes to the server do (a filesystem scan during one steady run at 40 calls
    made a 19 s episode of 1.2-2.3 s replies, where the rest of the run answered in
    0.3-0.7 s). The difference between the two readings over a run says whether anything
    outside the benchmark (its server, AI emulator and callers are all descendants of
    this process) took CPU meanwhile; steal is what the hypervisor gave to other guests.
    """

    busy_s: float  # user + nice + system + irq + softirq, every core
    steal_s: float
    own_s: float  # this process's tree: the server, the AI emulator, the callers

    @classmethod
    def read(cls, root: int | None = None, stat_path: Path = Path("/proc/stat")) -> MachineCpu:
        fields = stat_path.read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(value) / CLOCK_TICKS for value in fields[:8]
        )
        own = cpu_seconds(os.getpid() if root is None else root)
        # A tick that lands in an interrupt is also charged to the running task's stime
        # (tick-based accounting), so irq and softirq count as busy like it.
        busy = user + nice + system + irq + softirq
        return cls(busy_s=busy, steal_s=steal, own_s=own)

    def outside_since(self, start: MachineCpu) -> tuple[float, float]:
        """CPU seconds (outside processes, stolen) between `start` and this reading.

        Not clamped at zero: a slightly negative figure is the tick granularity of the
        two counts, and hiding it would hide an accounting error too."""
        busy = self.busy_s - start.busy_s
        own = self.own_s - start.own_s
        return busy - own, self.steal_s - start.steal_s


def rss_by_process(pid: int) -> dict[int, float]:
    """Resident set size (VmRSS) of each process of a tree, in MB."""
    sizes = {}
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                sizes[member] = int(line.split()[1]) / 1024
    return sizes


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process tree, in MB."""
    return sum(rss_by_process(pid).values())


QUIET_CORES = 0.1  # a server using less than this is idle (timers, the loop-lag probe)
QUIET_TIMEOUT_S = 60.0


def wait_until_quiet(servers: list[ServerProcess], timeout_s: float = QUIET_TIMEOUT_S) -> list[str]:
    """Wait until every live server's processes use under `QUIET_CORES`, measured over a
    second, so a server still working through an earlier run (a baseline grinding on calls
    it failed) does not take CPU from the next run; the names still busy at `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = [server for server in servers if server.alive()]
        # Keyed by process, not name: servers may share one (until 2026-12-07 ours with
        # --compare-env, --records-off or --mode both were all "ours"), and keying by it
        # compared one server's CPU with another's.
        before = {server.pid: cpu_seconds(server.pid) for server in live}
        time.sleep(1.0)
        busy = [s.name for s in live if cpu_seconds(s.pid) - before[s.pid] > QUIET_CORES]
        if not busy or time.monotonic() >= deadline:
            return busy


@dataclass
class ProcessMeter:
    """CPU over a window and RSS samples of one process tree (the server, never the
    callers): the sum over its processes, and the largest single process."""

    pid: int
    cpu_start: float = 0.0
    rss: list[float] = field(default_factory=list)
    rss_largest: list[float] = field(default_factory=list)

    def begin(self) -> None:
        self.cpu_start = cpu_seconds(self.pid)
        self.rss, self.rss_largest = [], []

    def sample(self) -> None:
        sizes = rss_by_process(self.pid)
        self.rss.append(sum(sizes.values()))
        self.rss_largest.append(max(sizes.values(), default=0.0))

    def cpu_used(self) -> float:
        return cpu_seconds(self.pid) - self.cpu_start

    def peak_rss(self) -> float:
        return max(self.rss, default=rss_mb(self.pid))

    def peak_process_rss(self) -> float:
        """The largest RSS any one of the server's processes reached."""
        return max(self.rss_largest, default=max(rss_by_process(self.pid).values(), default=0.0))
