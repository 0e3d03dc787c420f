"""`load.py --processes 1,2`: several server processes behind a load balancer, one Redis.

For each P in `--processes`, the benchmark starts P `server.py` processes on their own
ports, sharing one real Redis (`redis-server` on a free port in a temporary folder,
persistence off) through `REDIS_URL` and one `STREAM_SECRET`, behind HAProxy
(`bench/balancer.py`, `leastconn`: a media stream is long, so the process holding fewer
calls gets the next one). The calls ring the balancer, which spreads every request on its
own: a call's webhook and its media stream may land on different processes, as Twilio's
would behind a production balancer.

The question is how many calls each P holds at the target latency: p95 reply ≤
`TARGET_P95_FACTOR` × the 1-call p95 (measured once, through the balancer with one
process, `--runs` runs) with no failed or dropped call and underrun ≤ 1 %. N grows through
`PROCESS_STEPS` until a step misses; one step half-way between the last held and the first
missed N then narrows it. The ratio of the held N with P processes to the held N with one
is the scaling figure (issue 11's target: ≥ 1.8× with 2 processes on 2 cores).

Redis round-trips per call: each process counts the state operations it sends
(`/health` → `state.round_trips`); the run's increase, summed over the processes, less
what the idle cluster sends over as long (the balancer's health checks), over the calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from balancer import Balancer, start_haproxy
from load_calls import start_workers
from load_report import TARGET_P95_FACTOR, TARGET_UNDERRUN, RunData, StepResult, step_result
from load_server import ProcessMeter, ServerProcess, ours_process, rss_mb
from load_stats import turn_timings

from bench.redis_server import start_redis

PROCESS_STEPS = (10, 20, 30, 40, 50, 60, 80, 100, 120, 160, 200)
QUICK_PROCESS_STEPS = (2, 4)
TARGET_RATIO = 1.8  # issue 11: calls held with 2 processes vs 1, on this 2-core machine
IDLE_WINDOW_S = 5.0


# ------------------------------------------------------------------ the cluster


def cluster_env(redis_url: str, secret: str, max_calls: int) -> dict[str, str]:
    """What every process of a cluster shares: Redis, the stream secret, caps out of the way."""
    return {
        "REDIS_URL": redis_url,
        "STREAM_SECRET": secret,
        "MAX_CONCURRENT_CALLS": str(max(500, 2 * max_calls)),
        "MAX_CALLS_PER_PROCESS": str(max(500, 2 * max_calls)),
    }


@dataclass
class Cluster:
    """P server processes behind one balancer; calls ring `base_url` (the balancer)."""

    servers: list[ServerProcess]
    balancer: Balancer | None = None
    idle_round_trips_per_s: float | None = None

    @property
    def processes(self) -> int:
        return len(self.servers)

    @property
    def base_url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    def alive(self) -> bool:
        return all(server.alive() for server in self.servers)

    def start(self) -> Cluster:
        for server in self.servers:
            server.start()
        backends = [server.base_url for server in self.servers]
        self.balancer = start_haproxy(backends, balance="leastconn")
        return self

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for server in self.servers:
            server.stop()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(f"[{s.port}]\n{s.log_tail(lines)}" for s in self.servers)

    def round_trips(self) -> int | None:
        """Shared-state operations sent by all processes so far (None: not reported)."""
        total = 0
        for server in self.servers:
            try:
                state = httpx.get(server.base_url + "/health", timeout=5).json().get("state")
            except (httpx.HTTPError, ValueError):
                return None
            if not isinstance(state, dict) or not isinstance(state.get("round_trips"), int):
                return None
            total += state["round_trips"]
        return total

    def measure_idle_round_trips(self, window_s: float = IDLE_WINDOW_S) -> None:
        """What the idle cluster sends per second (health checks): subtracted per run."""
        before = self.round_trips()
        time.sleep(window_s)
        after = self.round_trips()
        if before is not None and after is not None:
            self.idle_round_trips_per_s = (after - before) / window_s


def build_cluster(processes: int, env: dict[str, str], max_calls: int) -> Cluster:
    return Cluster([ours_process(max_calls, env) for _ in range(processes)])


# ------------------------------------------------------------------ one run


@dataclass
class ClusterRun:
    """One run's `RunData` (CPU and RSS summed over the processes) and its Redis traffic."""

    data: RunData
    calls: int
    round_trips: float | None


def run_cluster_once(
    cluster: Cluster, n: int, workers: int, query: dict, stagger_s: float, sample_s: float
) -> ClusterRun:
    meters = [ProcessMeter(server.pid) for server in cluster.servers]
    offsets = [server.log_size() for server in cluster.servers]
    trips_before = cluster.round_trips()
    for meter in meters:
        meter.begin()
    started = time.monotonic()
    pool, futures = start_workers(cluster.base_url + "/", n, workers, query, stagger_s)
    rss_peak = sum(rss_mb(s.pid) for s in cluster.servers)
    try:
        while not all(future.done() for future in futures):
            if cluster.alive():
                rss_peak = max(rss_peak, sum(rss_mb(s.pid) for s in cluster.servers))
            time.sleep(sample_s)
        reports = [future.result() for future in futures]
    finally:
        pool.shutdown()
    wall = time.monotonic() - started
    cpu = sum(m.cpu_used() for m in meters) if cluster.alive() else float("nan")
    time.sleep(2.0)  # the last turns' timing lines, the last releases
    trips_after = cluster.round_trips()
    timings = [
        record
        for server, offset in zip(cluster.servers, offsets, strict=True)
        for record in turn_timings(server.log_since(offset))
    ]
    data = RunData(reports, wall, cpu, rss_peak, timings)
    trips = None
    if trips_before is not None and trips_after is not None:
        idle = (cluster.idle_round_trips_per_s or 0.0) * (time.monotonic() - started)
        trips = max(0.0, trips_after - trips_before - idle)
    return ClusterRun(data, len(data.calls), trips)


# ------------------------------------------------------------------ the target


@dataclass(frozen=True)
class HeldTarget:
    """When N calls count as held: the target latency of issue 11."""

    reference_p95: float
    p95_factor: float = TARGET_P95_FACTOR
    max_underrun: float = TARGET_UNDERRUN

    @property
    def p95_limit(self) -> float:
        return self.p95_factor * self.reference_p95

    def miss(self, step: StepResult) -> str | None:
        """Why a step misses the target, or None when it holds its calls."""
        if step.failed or step.dropped:
            return f"{step.failed} failed and {step.dropped} dropped calls"
        if step.p95 is None:
            return "no answered turn"
        if step.p95 > self.p95_limit:
            return f"p95 {step.p95:.2f} s > {self.p95_limit:.2f} s"
        if step.underrun_share > self.max_underrun:
            return f"underrun {step.underrun_share:.1%} > {self.max_underrun:.0%}"
        return None

    def describe(self) -> str:
        return (
            f"N calls are held when no call fails or drops, p95 reply <= {self.p95_factor:g}x "
            f"the 1-call p95 ({self.reference_p95:.2f} s, so <= {self.p95_limit:.2f} s) and "
            f"underrun <= {self.max_underrun:.0%}"
        )


@dataclass
class ProcessesResult:
    """One P: every step tried (in order), the held N and why the next N missed."""

    processes: int
    steps: list[StepResult] = field(default_factory=list)
    misses: dict[int, str] = field(default_factory=dict)
    round_trips: dict[int, float | None] = field(default_factory=dict)  # per call, per N
    held: int = 0
    stopped: str = ""

    def as_dict(self) -> dict:
        held_step = next((s for s in self.steps if s.n == self.held), None)
        per_call = [v for v in self.round_trips.values() if v is not None]
        return {
            "processes": self.processes,
            "held_calls": self.held,
            "held_calls_per_process": round(self.held / self.processes, 1),
            "p95_at_held": held_step.p95 if held_step else None,
            "cpu_per_call_min_at_held": held_step.cpu_per_call_min if held_step else None,
            "tried": [s.n for s in self.steps],
            "misses": {str(n): reason for n, reason in self.misses.items()},
            "redis_round_trips_per_call": (
                round(sum(per_call) / len(per_call), 1) if per_call else None
            ),
            "round_trips_per_call_by_n": {str(n): v for n, v in self.round_trips.items()},
            "stopped": self.stopped,
        }


StepRunner = Callable[[int], tuple[StepResult, float | None]]


def search_held(
    steps: tuple[int, ...],
    target: HeldTarget,
    run_step: StepRunner,
    result: ProcessesResult,
    start_at: int = 0,
    fits: Callable[[], bool] = lambda: True,
) -> ProcessesResult:
    """Grow N through `steps` (from `start_at`) until a step misses the target; if the very
    first step misses, walk down instead; then try once half-way between the held N and
    the first missed N. `run_step(n)` runs N calls and returns the step and its Redis
    round-trips per call; `fits()` says whether the time budget allows another step."""

    def attempt(n: int) -> bool:
        step, trips = run_step(n)
        result.steps.append(step)
        result.round_trips[n] = trips
        if reason := target.miss(step):
            result.misses[n] = reason
            return False
        result.held = max(result.held, n)
        return True

    index = min(max(start_at, 0), len(steps) - 1)
    missed: int | None = None
    if attempt(steps[index]):
        for n in steps[index + 1 :]:
            if not fits():
                result.stopped = f"time budget: N = {n} not tried"
                break
            if not attempt(n):
                missed = n
                break
    else:
        missed = steps[index]
        for n in reversed(steps[:index]):
            if not fits() or attempt(n):
                break
    if missed is not None and missed - result.held >= 4 and fits():
        attempt((result.held + missed) // 2)
    if not result.stopped:
        first_miss = min(result.misses, default=None)
        result.stopped = (
            f"held {result.held}; missed at N = {first_miss}: {result.misses[first_miss]}"
            if first_miss is not None
            else f"held every N tried, up to {result.held}"
        )
    return result


def new_secret() -> str:
    return secrets.token_hex(16)


# ------------------------------------------------------------------ the whole mode


@dataclass
class ProcessesPlan:
    """What `load.py --processes` was asked for."""

    processes: tuple[int, ...]
    steps: tuple[int, ...]
    runs: int  # of the 1-call reference; every other step runs once
    workers: int
    budget_s: float
    query: dict
    stagger_s: float
    sample_s: float


def series_name(processes: int) -> str:
    return f"ours-{processes}proc"


def run_processes(plan: ProcessesPlan, instant: dict[str, str], started: float) -> dict:
    """Every P of the plan, one after the other, each on a fresh Redis (no lease or key of
    the previous cluster counts); the 1-call reference is measured on the first."""
    deadline = started + plan.budget_s
    results: list[ProcessesResult] = []
    target: HeldTarget | None = None
    secret = new_secret()
    for processes in plan.processes:
        held_before = results[0].held if results else 0
        redis = start_redis()
        try:
            env = {**instant, **cluster_env(redis.url, secret, max(plan.steps))}
            result, target = measure_processes(processes, plan, env, target, held_before, deadline)
        finally:
            redis.close()
        results.append(result)
        print(f"  {series_name(processes)}: {result.stopped}", flush=True)
    series = {series_name(r.processes): sorted(r.steps, key=lambda s: s.n) for r in results}
    return {"series": series, "results": results, "target": target}


def measure_processes(
    processes: int,
    plan: ProcessesPlan,
    env: dict[str, str],
    target: HeldTarget | None,
    held_before: int,
    deadline: float,
) -> tuple[ProcessesResult, HeldTarget]:
    """Start P processes behind the balancer, warm them up, find the calls they hold."""
    cluster = build_cluster(processes, env, max(plan.steps))
    name = series_name(processes)
    result = ProcessesResult(processes)
    try:
        cluster.start()
        warm_up(cluster, plan)
        idle_rss = sum(rss_mb(s.pid) for s in cluster.servers)
        cluster.measure_idle_round_trips()
        print(f"  {name}: up behind {cluster.base_url}; idle RSS {idle_rss:.0f} MB", flush=True)
        steps = ClusterSteps(cluster, plan, name, idle_rss)
        if target is None:
            reference, _ = steps.run(1, plan.runs)
            result.steps.append(reference)
            target = HeldTarget(reference.p95 or 0.0)
            print(f"  target: {target.describe()}", flush=True)
        steps.target = target
        search_held(
            plan.steps,
            target,
            steps.run,
            result,
            start_index(plan.steps, held_before),
            fits=lambda: time.monotonic() + steps.estimate_s() <= deadline,
        )
    finally:
        cluster.stop()
    return result, target


@dataclass
class ClusterSteps:
    """Runs steps of N calls against one cluster, remembering them for RSS slope and pace."""

    cluster: Cluster
    plan: ProcessesPlan
    name: str
    idle_rss: float
    target: HeldTarget | None = None
    done: list[StepResult] = field(default_factory=list)

    def run(self, n: int, runs: int = 1) -> tuple[StepResult, float | None]:
        plan = self.plan
        measured = [
            run_cluster_once(
                self.cluster,
                n,
                workers_for(n, plan.workers),
                plan.query,
                plan.stagger_s,
                plan.sample_s,
            )
            for _ in range(runs)
        ]
        prior = max((s for s in self.done if s.n < n), key=lambda s: s.n, default=None)
        step = step_result(self.name, n, [r.data for r in measured], self.idle_rss, prior)
        self.done.append(step)
        trips = [r.round_trips for r in measured]
        calls = sum(r.calls for r in measured)
        per_call = sum(trips) / calls if calls and None not in trips else None
        print_step(self.name, step, per_call, self.target)
        return step, per_call

    def estimate_s(self) -> float:
        """The next step's duration: the last run's wall time plus settling, or a guess."""
        last = self.done[-1].runs[-1].wall_s if self.done and self.done[-1].runs else 30.0
        return last * 1.15 + 5.0


def workers_for(n: int, requested: int) -> int:
    return requested or (1 if n <= 50 else 2)


def start_index(steps: tuple[int, ...], held_before: int) -> int:
    """More processes hold at least what fewer held: start there, not at the bottom."""
    below = [k for k, n in enumerate(steps) if n <= held_before]
    return below[-1] if below else 0


def warm_up(cluster: Cluster, plan: ProcessesPlan) -> None:
    """One call per process through the balancer, so lazy loading misses the figures."""
    pool, futures = start_workers(
        cluster.base_url + "/", cluster.processes, 1, plan.query, plan.stagger_s
    )
    try:
        for future in futures:
            future.result()
    finally:
        pool.shutdown()
    time.sleep(2.0)


def print_step(name: str, step: StepResult, per_call: float | None, target) -> None:
    p95 = "–" if step.p95 is None else f"{step.p95:.2f}"
    cpu = "–" if step.cpu_per_call_min is None else f"{step.cpu_per_call_min:.1f}"
    trips = "–" if per_call is None else f"{per_call:.1f}"
    verdict = ""
    if target is not None:
        verdict = "  held" if (miss := target.miss(step)) is None else f"  MISSED: {miss}"
    print(
        f"  {name} N = {step.n:3d}: ok {step.calls_ok} fail {step.failed} drop {step.dropped}"
        f"  p95 {p95} s  underrun {step.underrun_share:.2%}  CPU {cpu} s/call-min"
        f"  Redis {trips}/call{verdict}",
        flush=True,
    )


def processes_targets(results: list[ProcessesResult]) -> list[dict]:
    """Issue 11's scaling target, as load.py prints and the Markdown lists targets."""
    one = next((r for r in results if r.processes == 1), None)
    targets = []
    for result in results:
        if one is None or result is one:
            continue
        ratio = result.held / one.held if one.held else None
        wanted = TARGET_RATIO * (result.processes - 1) if result.processes > 2 else TARGET_RATIO
        detail = f"{result.held} calls with {result.processes} processes vs {one.held} with 1" + (
            f" ({ratio:.2f}x)" if ratio is not None else ""
        )
        targets.append(
            {
                "target": f"calls held with {result.processes} processes >= {wanted:g}x 1 process",
                "met": ratio is not None and ratio >= wanted,
                "detail": detail,
            }
        )
    return targets


def processes_note(results: list[ProcessesResult]) -> str:
    """One line for the plot: calls held per P, the ratio to one process, Redis per call."""
    one = next((r.held for r in results if r.processes == 1), 0)
    parts = []
    for result in results:
        d = result.as_dict()
        plural = "es" if result.processes > 1 else ""
        text = f"{result.processes} process{plural}: {result.held} calls held"
        if result.processes > 1 and one:
            text += f" ({result.held / one:.2f}x)"
        if d["redis_round_trips_per_call"] is not None:
            text += f", {d['redis_round_trips_per_call']:g} Redis round-trips per call"
        parts.append(text)
    return "; ".join(parts)


def processes_rows(results: list[ProcessesResult]) -> list[str]:
    """The Markdown table of the held calls per P."""
    rows = [
        "| processes | calls held | per process | p95 at held (s) | CPU s per call-min "
        "| Redis round-trips per call | N tried |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        d = result.as_dict()
        cells = [
            d["processes"],
            d["held_calls"],
            d["held_calls_per_process"],
            _fmt(d["p95_at_held"]),
            _fmt(d["cpu_per_call_min_at_held"], ".1f"),
            _fmt(d["redis_round_trips_per_call"], ".1f"),
            ", ".join(map(str, d["tried"])),
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)
