"""Load benchmark: how many concurrent phone calls one server holds, and at what cost.

    .venv/bin/pip install -r bench/requirements.txt     # matplotlib, for the plot
    .venv/bin/python bench/load.py                      # default: N = 1, 20, 40, both patterns
    .venv/bin/python bench/load.py --quick              # development: N = 1, 2, ~4 min
    .venv/bin/python bench/load.py --pattern steady --steps 1,10 --steady-s 60 --no-baseline
    .venv/bin/python bench/load.py --steps 1,40,80 --server-workers 2     # 2 server processes
    .venv/bin/python bench/load.py --markdown docs/benchmark-results.md   # for the docs
    .venv/bin/python bench/load.py --processes 1,2     # processes behind HAProxy + Redis

Two arrival patterns (`--pattern burst|steady|both`, `load_patterns.py`), at each N:
- burst: N emulated dial-in calls start within one second, as a campaign dialling ten calls
  a second makes them (`load_calls.py`: real Twilio webhook + Media Stream, caller speech
  from WAV, DTMF on some calls, barge-in on others), `--runs` times (default 2);
- steady: Poisson arrivals keeping ~N calls up, calls of 100-140 s with a caller turn every
  6-10 s; N calls seeded over the first `--seed-s` (20 s) as a population already in
  progress, then `--steady-s` (120 s) measured; `--seed` fixes the arrivals, so ours and
  the baseline get the same ones.

What it prints, per series, pattern and N (one table row, `load_report.LEGEND` describes
the columns): reply latency p50/p95 pooled over every turn (with the spread across runs),
greeting latency p50/p95 (stream start -> first bot audio), the share of slow turns,
outbound pacing (underrun), server CPU seconds per call-minute (the server's processes,
its workers included; steady: over the window), RSS peak and per call ((peak - idle) / N),
failed and dropped calls, the callers' own event-loop lag (a lagging caller makes the
server look slow), and for our server where each reply's time went according to its own
turn-timing log lines. Then: ours / baseline ratios; memory per server process; "calls
held at the target" per series and pattern (the largest N with p95 reply <= 1.5x the
series' own 1-call p95, p95 greeting <= 1 s and no failed or dropped call); and issue 20's
target lines (40 calls on one process under both patterns; 80 on two worker processes
when run with `--server-workers 2 --steps 1,...,80`).

Series (servers stay up for the whole run; their runs are interleaved A B, B A, … at each N
and pattern, so a disturbance on a shared machine lands on both, not on one series' step):
- ours-instant: `server.py` (WORKERS=`--server-workers`) with every OpenAI service on the
  instant AI API (`phonebot.emulator.ai_api`), so the figures measure this project and
  Pipecat;
- baseline-instant: `bench/baseline_server.py`, Pipecat's Twilio example shape (Silero VAD
  and Pipecat's default turn strategy, i.e. Smart Turn v3 too), on the same instant
  services, with `--server-workers` uvicorn workers;
- ours-offline (`--mode both` or `offline`): `server.py` with no keys (Whisper tiny.en,
  keyword responder, Piper's joe voice).

The stop rule (`load_stats.StopRule`, printed at the start and saved in the JSON) reads the
median, the share of turns over 1.5 s, failed or dropped calls and underrun, pooled over
the step's runs, against the same pattern's first step: one slow turn cannot stop a
series. Results: `bench/results/load.json` (per-turn latencies, histograms, run spread,
server turn timings) and `bench/results/load.png`; `--markdown PATH` writes the tables the
docs include.

`--processes 1,2` is a mode of its own (`load_cluster.py`): for each P, P server processes
sharing one Redis behind HAProxy, and the calls they hold at the target latency, with the
ratio to one process and the Redis round-trips per call (`load-processes.json` / `.png`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from load_calls import BURST_S, PlannedCall, burst_plan, caller_audio, start_calls  # noqa: E402
from load_cluster import (  # noqa: E402
    PROCESS_STEPS,
    QUICK_PROCESS_STEPS,
    ProcessesPlan,
    processes_note,
    processes_rows,
    processes_targets,
    run_processes,
    series_name,
)
from load_markdown import (  # noqa: E402
    load_average,
    machine_description,
    render,
    settings_text,
    shown_arguments,
    write_markdown,
)
from load_patterns import (  # noqa: E402
    SEED_S,
    STEADY_S,
    Held,
    SteadyPlan,
    held_at_target,
    issue_targets,
    steady_plan,
)
from load_report import (  # noqa: E402
    LEGEND,
    RunData,
    StepResult,
    format_run,
    print_header,
    print_ratios,
    print_row,
    print_targets,
    ratio_rows,
    records_targets,
    run_figures,
    step_result,
    write_json,
    write_plot,
)
from load_server import (  # noqa: E402
    MachineCpu,
    ProcessMeter,
    ServerProcess,
    ai_api_process,
    baseline_process,
    busiest_loop_cpu,
    cpu_seconds,
    env_assignments,
    instant_env,
    main_thread_cpu,
    ours_process,
    rss_by_process,
    wait_until_quiet,
)
from load_stats import StopRule, turn_timings  # noqa: E402

from bench.redis_server import RedisServer, start_redis  # noqa: E402

STEPS = (1, 20, 40)
QUICK_STEPS = (1, 2)
PATTERNS = ("burst", "steady")
RUNS = 2  # burst runs per step: at N = 1 one run is two turns
QUICK_SEED_S, QUICK_STEADY_S = 5.0, 20.0
OFFLINE_MAX_CALLS = 25
BASELINE_MAX_CALLS = 100
SETTLE_S = 2.0
SAMPLE_EVERY_S = 0.5
# The default run must fit in 25 minutes on a 2-core machine: a step starts only if its
# runs, estimated from each series' previous run of the pattern, end before the budget does.
BUDGET_S = 24 * 60.0
FIRST_BURST_ESTIMATE_S = 32.0  # a ~25 s conversation, the start lead and the settle
STEADY_OVERHEAD_S = 8.0  # a steady run beyond seed + window: the lead, hang-ups, settle
RUN_GROWTH = 1.15  # a larger N takes a little longer (slower replies)
# --processes: the 1-call reference, then the held-calls search for each P
PROCESSES_BUDGET_S = 900.0
OVERRUN_S = 30.0  # how far past the budget a slow step may run before it drops runs
QUERY = {"session_type": "support"}  # our persona; the baseline ignores it
TRANSCRIPT = "what are your opening hours"  # what the instant STT "hears", every turn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("instant", "offline", "both"), default="instant")
    parser.add_argument(
        "--pattern", choices=("burst", "steady", "both"), default="both", help="arrivals"
    )
    parser.add_argument("--max-calls", type=int, default=max(STEPS), help="largest N to try")
    parser.add_argument("--steps", type=_steps, help="the N to try, e.g. 1,10 (default 1,20,40)")
    _add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="development: N = 1, 2, short runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    parser.add_argument(
        "--records-off",
        action="store_true",
        help="also run ours with CALL_RECORDS=false, interleaved, to compare records on / off",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for our server (repeatable), e.g. TURN_INCOMPLETE_WAIT_S=0.5: the "
        "server starts with a clean environment, so the shell's variables don't reach it",
    )
    parser.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run ours with this setting on top (repeatable), interleaved with ours: "
        "an A/B of a setting under the same load",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="caller processes (0: 1 up to 50 calls, else 2)"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="server processes per series: ours WORKERS=K (with a throw-away Redis), the "
        "baseline K uvicorn workers",
    )
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="time budget of the whole run (s)"
    )
    parser.add_argument(
        "--processes",
        type=_steps,
        help="e.g. 1,2: that many server processes behind HAProxy sharing one Redis, and the "
        "calls each holds at the target latency (see bench/load_cluster.py)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output folder")
    parser.add_argument(
        "--markdown", type=Path, help="also write the results tables as Markdown to this path"
    )
    args = parser.parse_args(argv)
    _check_counts(parser, args)
    _read_settings(parser, args)
    args.runs = args.runs or (1 if args.quick else RUNS)
    args.seed_s = (
        args.seed_s if args.seed_s is not None else (QUICK_SEED_S if args.quick else SEED_S)
    )
    args.steady_s = args.steady_s or (QUICK_STEADY_S if args.quick else STEADY_S)
    args.patterns = PATTERNS if args.pattern == "both" else (args.pattern,)
    if args.processes:
        args.steps = args.steps or (QUICK_PROCESS_STEPS if args.quick else PROCESS_STEPS)
        if args.budget_s == BUDGET_S:
            args.budget_s = PROCESSES_BUDGET_S
    args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    args.max_calls = max(args.max_calls, max(args.steps)) if args.steps else args.max_calls
    return args


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How often and how long each step runs."""
    parser.add_argument("--runs", type=int, help=f"burst runs per step (default {RUNS}; quick: 1)")
    parser.add_argument(
        "--steady-runs",
        type=int,
        default=1,
        help="steady runs per step (default 1); with --no-baseline and --compare-env, 2 "
        "makes the pair A B B A",
    )
    parser.add_argument(
        "--seed-s", type=float, help=f"steady: seeding time before the window (default {SEED_S:g})"
    )
    parser.add_argument(
        "--steady-s", type=float, help=f"steady: the measured window (default {STEADY_S:g} s)"
    )
    parser.add_argument("--seed", type=int, default=1, help="steady: the arrivals' random seed")


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts that would make an empty or a silently different run are refused."""
    if args.server_workers < 1:
        parser.error("--server-workers must be at least 1")
    if args.steady_runs < 1:
        parser.error("--steady-runs must be at least 1")
    if args.processes and args.steady_runs != 1:
        parser.error("--processes runs one steady run per step: --steady-runs not taken")


def _read_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--server-env` / `--compare-env` as mappings; a command that would drop them is
    refused rather than run without them."""
    try:
        args.server_env = env_assignments(args.server_env)
        args.compare_env = env_assignments(args.compare_env)
    except ValueError as error:
        parser.error(f"--server-env / --compare-env: {error}")
    if args.processes and (args.server_env or args.compare_env):
        parser.error("--processes runs its own servers: --server-env / --compare-env not taken")
    if args.compare_env and args.mode != "instant":
        parser.error("--compare-env compares ours on the instant services: --mode instant")


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of call counts: {text!r}") from error
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError("call counts must be >= 1")
    return steps


def workers_for(n: int, requested: int) -> int:
    """One caller process drives ~50 calls comfortably; above that, use both cores."""
    return requested or (1 if n <= 50 else 2)


@dataclass
class Series:
    """One server under test, its steps so far (every pattern) and, per pattern, why it
    stopped growing N (if it did)."""

    name: str
    server: ServerProcess
    max_calls: int
    ai_api: ServerProcess | None = None
    steps: list[StepResult] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    idle_rss: float = 0.0
    idle_rss_process: float = 0.0  # the largest single process, idle
    last_run_s: dict[str, float] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    def runs_at(self, n: int, pattern: str) -> bool:
        return pattern not in self.stopped and n <= self.max_calls

    def steps_of(self, pattern: str) -> list[StepResult]:
        return [step for step in self.steps if step.pattern == pattern]

    def run_estimate(self, pattern: str, args: argparse.Namespace) -> float:
        if pattern in self.last_run_s:
            return self.last_run_s[pattern] * RUN_GROWTH
        if pattern == "steady":
            return args.seed_s + args.steady_s + STEADY_OVERHEAD_S
        return FIRST_BURST_ESTIMATE_S

    def stop(self, n: int, pattern: str, reason: str, log_tail: bool = False) -> None:
        self.stopped[pattern] = reason
        stopped = self.info.setdefault("stopped", {})
        stopped[pattern] = {"n": n, "reason": reason}
        if log_tail:  # the server's last words, for why
            stopped[pattern]["log_tail"] = self.server.log_tail(15)


# ------------------------------------------------------------------ one run


def measure_idle_rss(server: ServerProcess) -> tuple[float, float]:
    """Median RSS of the server's processes, summed and the largest one, over a second."""
    total, largest = [], []
    for _ in range(5):
        sizes = rss_by_process(server.pid)
        total.append(sum(sizes.values()))
        largest.append(max(sizes.values(), default=0.0))
        time.sleep(0.2)
    return statistics.median(total), statistics.median(largest)


def start_series(series: Series, server_workers: int) -> None:
    """Start the server and make one short call per server process, so lazily loaded
    models don't land on the N = 1 figures; then read its idle RSS."""
    series.server.start()
    series.info["rss_start_mb"] = sum(rss_by_process(series.server.pid).values())
    series.info["server_processes"] = server_workers
    warmup = [PlannedCall(k, 0.2 * k, None, "warmup") for k in range(server_workers)]
    pool, futures, _ = start_calls(series.server.base_url + "/", warmup, 1, QUERY)
    try:
        summaries = [call for future in futures for call in future.result().calls]
    finally:
        pool.shutdown()
    for summary in summaries:
        if summary.failed or summary.dropped:
            print(f"  {series.name}: warm-up call failed: {summary.error}", flush=True)
    time.sleep(SETTLE_S)
    series.idle_rss, series.idle_rss_process = measure_idle_rss(series.server)
    series.info["rss_idle_mb"] = series.idle_rss
    series.info["rss_idle_process_mb"] = series.idle_rss_process
    print(
        f"  {series.name}: up, idle RSS {series.idle_rss:.0f} MB after a call per process "
        f"({server_workers} process(es), largest {series.idle_rss_process:.0f} MB)",
        flush=True,
    )


def watch_until(until: float, meter: ProcessMeter, server: ServerProcess, futures: list) -> None:
    """Sample the server's RSS until the wall clock reaches `until` or every call is done."""
    while not all(future.done() for future in futures):
        now = time.time()
        if now >= until:
            return
        if server.alive():
            meter.sample()
        time.sleep(min(SAMPLE_EVERY_S, max(0.0, until - time.time())))


def cpu_of(process: ServerProcess | None) -> float | None:
    return cpu_seconds(process.pid) if process is not None and process.alive() else None


def machine_readings(server: ServerProcess) -> tuple[MachineCpu, dict[int, float]]:
    """The machine's CPU and the server's main threads' (its event loops) at one moment:
    read at each end of what a run measures."""
    return MachineCpu.read(), main_thread_cpu(server.pid)


def start_run(
    url: str, n: int, pattern: str, args: argparse.Namespace
) -> tuple[ProcessPoolExecutor, list, tuple[float, float] | None]:
    """Start the run's callers: the pool, their futures, and the measured window in wall
    clock seconds (steady) or None (burst)."""
    if pattern == "steady":
        plan = steady_plan(SteadyPlan(n, args.seed_s, args.steady_s), f"{args.seed}:{n}")
        window_s = (args.seed_s, args.seed_s + args.steady_s)
    else:
        plan, window_s = burst_plan(n, BURST_S), None
    workers = workers_for(n, args.workers)
    pool, futures, t0 = start_calls(url, plan, workers, QUERY, args.seed, window_s=window_s)
    window = None if window_s is None else (t0 + window_s[0], t0 + window_s[1])
    return pool, futures, window


def run_once(series: Series, n: int, pattern: str, args: argparse.Namespace) -> RunData:
    """N calls in `pattern` against the series' server, sampling its RSS; its CPU over the
    run (burst) or the measured window (steady); then the turn-timing lines it logged
    meanwhile (read after the settle, so the last turns' lines are in)."""
    server = series.server
    meter = ProcessMeter(server.pid)
    offset = server.log_size()
    meter.begin()
    machine_start, loops_start = machine_readings(server)
    started = time.monotonic()
    pool, futures, window = start_run(server.base_url + "/", n, pattern, args)
    try:
        if window is not None:
            watch_until(window[0], meter, server, futures)
            cpu_start, helper_start = cpu_of(server), cpu_of(series.ai_api)
            machine_start, loops_start = machine_readings(server)
            watch_until(window[1], meter, server, futures)
            cpu_end, helper_end = cpu_of(server), cpu_of(series.ai_api)
            machine_end, loops_end = machine_readings(server)
        else:
            cpu_start, helper_start = meter.cpu_start, cpu_of(series.ai_api)
        watch_until(math.inf, meter, server, futures)
        if window is None:
            cpu_end, helper_end = cpu_of(server), cpu_of(series.ai_api)
            machine_end, loops_end = machine_readings(server)
        reports = [future.result() for future in futures]
    finally:
        pool.shutdown()
    wall = time.monotonic() - started
    cpu = float("nan") if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    helper = None if helper_start is None or helper_end is None else helper_end - helper_start
    outside_s, steal_s = machine_end.outside_since(machine_start)
    time.sleep(SETTLE_S)
    series.last_run_s[pattern] = time.monotonic() - started
    timings = turn_timings(server.log_since(offset))
    return RunData(
        reports,
        wall,
        cpu,
        meter.peak_rss(),
        timings,
        helper,
        window=window,
        rss_process_peak_mb=meter.peak_process_rss(),
        outside_cpu_s=outside_s,
        steal_s=steal_s,
        loop_cpu_s=busiest_loop_cpu(loops_start, loops_end),
    )


# ------------------------------------------------------------------ one step


def run_step(
    active: list[Series],
    n: int,
    pattern: str,
    args: argparse.Namespace,
    deadline: float = math.inf,
    servers: list[ServerProcess] | None = None,
) -> dict[str, StepResult]:
    """The runs of N calls in `pattern` per series, interleaved with the order turned at
    every repeat: A B, B A, A B … (a burst `args.runs` times, a steady run
    `args.steady_runs` times). The turn is there because the run that goes second in a
    pair was the slower one in 4 of 5 pairs of identical servers (docs/benchmark.md): a
    series always second would be judged by its position. Each run starts
    once every server in `servers` is idle (`wait_until_quiet`): a baseline still grinding
    on the calls it failed would otherwise take CPU from our next run.

    A step that runs much slower than estimated (calls timing out) gives up its remaining
    runs once the next one would end `OVERRUN_S` past `deadline`: the budget is a promise.
    """
    count = repeats(pattern, args)
    runs: dict[str, list[RunData]] = {series.name: [] for series in active}
    for k in range(count):
        for series in active if k % 2 == 0 else active[::-1]:
            if not series.server.alive():
                continue
            if (
                runs[series.name]
                and time.monotonic() + series.run_estimate(pattern, args) > deadline + OVERRUN_S
            ):
                print(f"  {series.name} N = {n}: run {k + 1} skipped (time budget)", flush=True)
                continue
            if busy := wait_until_quiet(servers or [series.server]):
                print(f"  ! still busy before {series.name} N = {n}: {', '.join(busy)}")
            run = run_once(series, n, pattern, args)
            runs[series.name].append(run)
            figures = run_figures(k + 1, run)
            print(format_run(series.name, n, figures, count, pattern), flush=True)
    steps = {}
    for series in active:
        previous = series.steps[-1] if series.steps else None
        step = step_result(series.name, n, runs[series.name], series.idle_rss, previous, pattern)
        steps[series.name] = step
    return steps


def repeats(pattern: str, args: argparse.Namespace) -> int:
    """How many runs of each series a step of `pattern` has."""
    return args.runs if pattern == "burst" else args.steady_runs


def step_fits(
    active: list[Series], pattern: str, args: argparse.Namespace, deadline: float
) -> bool:
    """Whether every run of this step, at the series' recent pace, ends before `deadline`."""
    count = repeats(pattern, args)
    estimate = count * sum(series.run_estimate(pattern, args) for series in active)
    return time.monotonic() + estimate <= deadline


def run_steps(
    all_series: list[Series], args: argparse.Namespace, rule: StopRule, deadline: float
) -> None:
    """Grow N for every series and pattern until the stop rule, --max-calls or the budget
    ends it; at each N, every pattern in turn."""
    print_header()
    for n in args.steps:
        for pattern in args.patterns:
            active = [series for series in all_series if series.runs_at(n, pattern)]
            if not active:
                continue
            if not step_fits(active, pattern, args, deadline):
                reason = f"N >= {n} skipped: time budget (--budget-s {args.budget_s:g})"
                for series in active:
                    series.stop(n, pattern, reason)
                    print(f"     {series.name} {pattern}: {reason}", flush=True)
                continue
            servers = [series.server for series in all_series]
            for name, step in run_step(active, n, pattern, args, deadline, servers).items():
                series = next(s for s in active if s.name == name)
                record_step(series, step, rule)


def record_step(series: Series, step: StepResult, rule: StopRule) -> None:
    """Keep the step, print its row, and stop the series' pattern if the rule says so."""
    series.steps.append(step)
    step.rss_idle_process_mb = series.idle_rss_process
    step.server_processes = series.info.get("server_processes", 1)
    print_row(step)
    if series.name.startswith("ours") and step.turns and not step.turn_timings:
        print("     ! no turn-timing lines in the server's log (LOG_TURN_TIMING)")
    first = series.steps_of(step.pattern)[0]
    if not series.server.alive():
        series.stop(step.n, step.pattern, "the server exited", log_tail=True)
    elif reason := rule.reason(step, first):
        reason = f"stopped at N = {step.n}: {reason}"
        series.stop(step.n, step.pattern, reason, log_tail=step.broken)
    if step.pattern in series.stopped:
        print(f"     {series.name} {step.pattern}: {series.stopped[step.pattern]}", flush=True)


# ------------------------------------------------------------------ main


def build_series(
    args: argparse.Namespace, ai_api: ServerProcess | None, redis: RedisServer | None
) -> list[Series]:
    largest = min(args.max_calls, max(args.steps))
    workers, redis_url = args.server_workers, redis.url if redis else None
    series = []
    if ai_api is not None:
        services = instant_env(ai_api.base_url + "/v1")
        env = {**services, **args.server_env}  # ours only: the baseline has no settings
        ours = ours_process(largest, env, workers, redis_url)
        series.append(Series("ours-instant", ours, args.max_calls, ai_api))
        if args.compare_env:
            variant = ours_process(
                largest, {**env, **args.compare_env}, workers, redis_url, "ours-variant"
            )
            series.append(Series("ours-variant", variant, args.max_calls, ai_api))
        if args.records_off:
            no_records = {**env, "CALL_RECORDS": "false"}
            off = ours_process(largest, no_records, workers, redis_url, "ours-norecords")
            series.append(Series("ours-norecords", off, args.max_calls, ai_api))
        if not args.no_baseline:
            limit = min(args.max_calls, BASELINE_MAX_CALLS)
            baseline = baseline_process(services, workers)
            series.append(Series("baseline-instant", baseline, limit, ai_api))
    if args.mode in ("offline", "both"):
        limit = min(args.max_calls, OFFLINE_MAX_CALLS)
        offline = ours_process(largest, args.server_env, workers, redis_url, "ours-offline")
        series.append(Series("ours-offline", offline, limit))
    return series


def run_facts(args: argparse.Namespace, machine: dict, started: float) -> tuple[float, dict]:
    """The run's duration, and what every JSON report starts with: the machine (with its
    load at the end, to show whether something else ran meanwhile), the arguments, the
    duration."""
    duration = time.monotonic() - started
    machine = {**machine, "load_average_end": load_average()}
    args_text = {k: str(v) for k, v in shown_arguments(args).items()}
    return duration, {"machine": machine, "args": args_text, "duration_s": round(duration, 1)}


def held_lines(all_series: list[Series], args: argparse.Namespace) -> list[Held]:
    """Calls held at the target, per series and pattern."""
    return [
        held_at_target(series.name, pattern, series.steps_of(pattern))
        for series in all_series
        for pattern in args.patterns
        if series.steps_of(pattern)
    ]


def memory_lines(all_series: list[Series]) -> list[str]:
    """RSS idle and peak per series, summed over its processes and its largest process."""
    lines = []
    for series in all_series:
        for step in series.steps:
            lines.append(
                f"  {series.name} {step.pattern} N = {step.n}: idle {step.rss_idle_mb:.0f} MB, "
                f"peak {step.rss_peak_mb:.0f} MB, {step.rss_per_call_mb or 0:.1f} MB per call; "
                f"largest process ({step.server_processes} server worker(s)): idle "
                f"{step.rss_idle_process_mb or 0:.0f} MB, "
                f"peak {step.rss_process_peak_mb or 0:.0f} MB"
            )
    return lines


def report(all_series: list[Series], args, rule: StopRule, machine: dict, started: float):
    """Print the ratios, memory, held calls and targets; write the JSON, the plot and (if
    asked) the Markdown."""
    results = {series.name: series.steps for series in all_series}
    print("\n" + LEGEND)
    ratios = ratio_rows(results.get("ours-instant", []), results.get("baseline-instant", []))
    print_ratios(ratios)
    print("\n== memory (server processes)")
    print("\n".join(memory_lines(all_series)))
    held = held_lines(all_series, args)
    print("\n== calls held at the target (p95 reply <= 1.5x own 1-call p95, p95 greeting "
          "<= 1 s, none failed or dropped)")  # fmt: skip
    for one in held:
        print(f"  {one.describe()}")
    by_key = {(s.name, p): s.steps_of(p) for s in all_series for p in args.patterns}
    targets = issue_targets(held, by_key, args.server_workers)
    if args.server_workers > 1 and "baseline-instant" in results:
        print(f"  (the baseline ran {args.server_workers} uvicorn worker processes too)")
    if "ours-norecords" in results:
        targets += records_targets(results["ours-instant"], results["ours-norecords"])
    if targets:
        print_targets(targets)
    duration, extra = run_facts(args, machine, started)
    machine = extra["machine"]
    stops = {
        f"{series.name} {pattern}": series.stopped.get(pattern)
        or f"ran every step up to N = {max((s.n for s in series.steps_of(pattern)), default=0)}"
        for series in all_series
        for pattern in args.patterns
    }
    extra |= {
        "stop_rule": rule.as_dict(),
        "servers": {series.name: series.info for series in all_series},
        "server_workers": args.server_workers,
        "ratios": ratios,
        "held": [vars(one) for one in held],
        "stops": stops,
        "targets": targets,
    }
    json_path = write_json(args.out / "load.json", results, extra)
    plot_path = write_plot(args.out / "load.png", results)
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.markdown:
        section = ["Calls held at the target:", "", *(f"- {one.describe()}" for one in held)]
        text = render(results, machine, stops, targets, rule, duration, section)
        print(f"wrote {write_markdown(args.markdown, text)}")
    print(f"total {duration:.0f} s")


def main_processes(args: argparse.Namespace, machine: dict, started: float) -> int:
    """`--processes`: for each P, the calls held at the target latency behind a balancer."""
    plan = ProcessesPlan(
        processes=args.processes,
        steps=args.steps,
        runs=args.runs,
        workers=args.workers,
        budget_s=args.budget_s,
        query=QUERY,
        stagger_s=BURST_S,
        sample_s=SAMPLE_EVERY_S,
    )
    print(
        f"processes {', '.join(map(str, args.processes))}; N from {', '.join(map(str, args.steps))}"
    )
    ai_api = ai_api_process(TRANSCRIPT)
    try:
        ai_api.start()
        measured = run_processes(plan, instant_env(ai_api.base_url + "/v1"), started)
    finally:
        ai_api.stop()
    results, target = measured["results"], measured["target"]
    targets = processes_targets(results)
    print("\n" + "\n".join(processes_rows(results)))
    print_targets(targets)
    duration, extra = run_facts(args, machine, started)
    machine = extra["machine"]
    extra |= {
        "held_target": target.describe() if target else None,
        "processes": [result.as_dict() for result in results],
        "targets": targets,
    }
    json_path = write_json(args.out / "load-processes.json", measured["series"], extra)
    plot_path = write_plot(
        args.out / "load-processes.png",
        measured["series"],
        note=processes_note(results),
        p95_limit=target.p95_limit if target else None,
    )
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.markdown:
        stops = {series_name(r.processes): r.stopped for r in results}
        section = ["Calls held at the target latency, per number of server processes:", ""]
        section += processes_rows(results)
        text = render(measured["series"], machine, stops, targets, target, duration, section)
        print(f"wrote {write_markdown(args.markdown, text)}")
    print(f"total {duration:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_description(argv, args.compare_env)
    logger.remove()  # the emulator's and espeak's debug lines would drown the tables
    logger.add(sys.stderr, level="WARNING")
    caller_audio()  # generate the caller WAVs before any worker forks
    started = time.monotonic()
    if args.processes:
        return main_processes(args, machine, started)
    rule = StopRule()
    print(f"stop rule: {rule.describe()}", flush=True)
    print(
        f"steps {', '.join(map(str, args.steps))}; patterns {', '.join(args.patterns)}; "
        f"burst: {args.runs} run(s) each; steady: {args.steady_runs} run(s) each, seed "
        f"{args.seed_s:g} s + window "
        f"{args.steady_s:g} s, --seed {args.seed}; {args.server_workers} server process(es)",
        flush=True,
    )
    if compared := machine["compare_env"]:  # masked by machine_description
        print(f"ours-variant: ours with {settings_text(compared)} on top", flush=True)
    ai_api = ai_api_process(TRANSCRIPT) if args.mode in ("instant", "both") else None
    redis = start_redis() if args.server_workers > 1 else None
    try:
        all_series = build_series(args, ai_api, redis)
        try:
            if ai_api is not None:
                ai_api.start()
            for series in all_series:
                start_series(series, args.server_workers)
            run_steps(all_series, args, rule, started + args.budget_s)
        finally:
            for series in all_series:
                series.server.stop()
            if ai_api is not None:
                ai_api.stop()
    finally:
        if redis is not None:
            redis.close()
    report(all_series, args, rule, machine, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
