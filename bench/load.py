"""Load benchmark: how many concurrent phone calls one server holds, and at what cost.

    .venv/bin/pip install -r bench/requirements.txt     # matplotlib, for the plot
    .venv/bin/python bench/load.py                      # default run, <= 12 min on 2 cores
    .venv/bin/python bench/load.py --quick              # development: N = 1, 2, one run
    .venv/bin/python bench/load.py --steps 1,10 --runs 3 --no-baseline
    .venv/bin/python bench/load.py --markdown docs/benchmark-results.md   # for the docs
    .venv/bin/python bench/load.py --processes 1,2     # processes behind HAProxy + Redis

For each N (1, 10, 25, 50, 100, … until the stop rule or the time budget ends a series) it
starts N emulated dial-in calls (`load_calls.py`: real Twilio webhook + Media Stream, caller
speech from WAV, DTMF on some calls, barge-in on others), `--runs` times (default 3), and
prints reply latency p50/p95 pooled over every turn with the spread across runs, the share
of slow turns, outbound pacing, server CPU per call-minute and RSS, failed and dropped
calls, and (for our server) where each reply's time went according to the server's own
turn-timing log lines.

Series (servers stay up for the whole run; their runs are interleaved A B A B at each N,
so a disturbance on a shared machine lands on both, not on one series' whole step):
- ours-instant: `server.py` with every OpenAI service on the instant AI API
  (`phonebot.emulator.ai_api`), so the figures measure this project and Pipecat;
- baseline-instant: `bench/baseline_server.py`, Pipecat's Twilio example shape (Silero VAD
  and Pipecat's default turn strategy, i.e. Smart Turn v3 too), on the same instant
  services (ours / baseline ratios are printed);
- ours-offline (`--mode both` or `offline`): `server.py` with no keys (Whisper tiny.en,
  keyword responder, Piper's joe voice).

The stop rule (`load_stats.StopRule`, printed at the start and saved in the JSON) reads the
median, the share of turns over 1.5 s, failed or dropped calls and underrun, pooled over
the step's runs: one slow turn cannot stop a series. Results: `bench/results/load.json`
(per-turn latencies, histograms, run spread, server turn timings) and
`bench/results/load.png`; `--markdown PATH` writes the table the docs include.

`--processes 1,2` is a mode of its own (`load_cluster.py`): for each P, P server processes
sharing one Redis behind HAProxy, and the calls they hold at the target latency, with the
ratio to one process and the Redis round-trips per call (`load-processes.json` / `.png`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from load_calls import caller_audio, run_call, start_workers  # noqa: E402
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
from load_markdown import load_average, machine_description, render, write_markdown  # noqa: E402
from load_report import (  # noqa: E402
    LEGEND,
    RunData,
    StepResult,
    check_targets,
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
    ProcessMeter,
    ServerProcess,
    ai_api_process,
    baseline_process,
    instant_env,
    ours_process,
    rss_mb,
)
from load_stats import StopRule, turn_timings  # noqa: E402

STEPS = (1, 10, 25, 50, 100, 150, 200, 300, 400)
QUICK_STEPS = (1, 2)
RUNS = 3  # repeats of every step: p95 over one run of a few calls is one or two turns
OFFLINE_MAX_CALLS = 25
BASELINE_MAX_CALLS = 100
STAGGER_S = 1.5
SETTLE_S = 2.0
SAMPLE_EVERY_S = 0.5
# The default run must fit in 12 minutes on a 2-core machine: a step starts only if its
# runs, estimated from each series' previous run, end before the budget does.
BUDGET_S = 660.0
FIRST_RUN_ESTIMATE_S = 32.0  # a ~25 s conversation, the stagger and the settle
RUN_GROWTH = 1.15  # a larger N takes a little longer (stagger, slower replies)
# --processes: the 1-call reference, then the held-calls search for each P
PROCESSES_BUDGET_S = 900.0
OVERRUN_S = 30.0  # how far past the budget a slow step may run before it drops runs
QUERY = {"session_type": "support"}  # our persona; the baseline ignores it
TRANSCRIPT = "what are your opening hours"  # what the instant STT "hears", every turn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("instant", "offline", "both"), default="instant")
    parser.add_argument("--max-calls", type=int, default=STEPS[-1], help="largest N to try")
    parser.add_argument("--steps", type=_steps, help="the N to try, e.g. 1,10 (default 1,10,25,…)")
    parser.add_argument("--runs", type=int, help=f"runs per step (default {RUNS}; quick: 1)")
    parser.add_argument("--quick", action="store_true", help="development: N = 1, 2, one run each")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    parser.add_argument(
        "--records-off",
        action="store_true",
        help="also run ours with CALL_RECORDS=false, interleaved, to compare records on / off",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="caller processes (0: 1 up to 50 calls, else 2)"
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
        "--markdown", type=Path, help="also write the results table as Markdown to this path"
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else RUNS)
    if args.processes:
        args.steps = args.steps or (QUICK_PROCESS_STEPS if args.quick else PROCESS_STEPS)
        if args.budget_s == BUDGET_S:
            args.budget_s = PROCESSES_BUDGET_S
    args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    return args


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
    """One server under test, its steps so far and why it stopped (if it did)."""

    name: str
    server: ServerProcess
    max_calls: int
    ai_api: ServerProcess | None = None
    steps: list[StepResult] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    idle_rss: float = 0.0
    last_run_s: float | None = None
    stopped: str | None = None

    def runs_at(self, n: int) -> bool:
        return self.stopped is None and n <= self.max_calls

    def run_estimate(self) -> float:
        if self.last_run_s is None:
            return FIRST_RUN_ESTIMATE_S
        return self.last_run_s * RUN_GROWTH

    def stop(self, n: int, reason: str, log_tail: bool = False) -> None:
        self.stopped = reason
        self.info["stopped"] = {"n": n, "reason": reason}
        if log_tail:  # the server's last words, for why
            self.info["stopped"]["log_tail"] = self.server.log_tail(15)


# ------------------------------------------------------------------ one run


def measure_idle_rss(server: ServerProcess) -> float:
    samples = []
    for _ in range(5):
        samples.append(rss_mb(server.pid))
        time.sleep(0.2)
    return statistics.median(samples)


def start_series(series: Series) -> None:
    """Start the server and make one short call, so lazily loaded models don't land on
    the N = 1 figures; then read its idle RSS."""
    series.server.start()
    series.info["rss_start_mb"] = rss_mb(series.server.pid)
    summary = asyncio.run(run_call(series.server.base_url + "/", 0, "warmup", 0.0, QUERY))
    if summary.failed or summary.dropped:
        print(f"  {series.name}: warm-up call failed: {summary.error}", flush=True)
    time.sleep(SETTLE_S)
    series.idle_rss = series.info["rss_idle_mb"] = measure_idle_rss(series.server)
    print(f"  {series.name}: up, idle RSS {series.idle_rss:.0f} MB after one call", flush=True)


def run_once(series: Series, n: int, args: argparse.Namespace) -> RunData:
    """N calls against the series' server, sampling its RSS; CPU over the whole run; then
    the turn-timing lines it logged meanwhile (read after the settle, so the last turns'
    lines are in)."""
    server = series.server
    meter = ProcessMeter(server.pid)
    helper = ProcessMeter(series.ai_api.pid) if series.ai_api else None
    offset = server.log_size()
    meter.begin()
    if helper:
        helper.begin()
    started = time.monotonic()
    pool, futures = start_workers(
        server.base_url + "/", n, workers_for(n, args.workers), QUERY, STAGGER_S
    )
    try:
        while not all(future.done() for future in futures):
            if server.alive():
                meter.sample()
            time.sleep(SAMPLE_EVERY_S)
        reports = [future.result() for future in futures]
    finally:
        pool.shutdown()
    wall = time.monotonic() - started
    cpu = meter.cpu_used() if server.alive() else float("nan")
    helper_cpu = helper.cpu_used() if helper else None
    time.sleep(SETTLE_S)
    series.last_run_s = time.monotonic() - started
    timings = turn_timings(server.log_since(offset))
    return RunData(reports, wall, cpu, meter.peak_rss(), timings, helper_cpu)


# ------------------------------------------------------------------ one step


def run_step(
    active: list[Series], n: int, args: argparse.Namespace, deadline: float = math.inf
) -> dict[str, StepResult]:
    """`args.runs` runs of N calls per series, interleaved: A B A B …

    A step that runs much slower than estimated (calls timing out) gives up its remaining
    runs once the next one would end `OVERRUN_S` past `deadline`: the budget is a promise.
    """
    runs: dict[str, list[RunData]] = {series.name: [] for series in active}
    for k in range(args.runs):
        for series in active:
            if not series.server.alive():
                continue
            if (
                runs[series.name]
                and time.monotonic() + series.run_estimate() > deadline + OVERRUN_S
            ):
                print(f"  {series.name} N = {n}: run {k + 1} skipped (time budget)", flush=True)
                continue
            run = run_once(series, n, args)
            runs[series.name].append(run)
            print(format_run(series.name, n, run_figures(k + 1, run), args.runs), flush=True)
    steps = {}
    for series in active:
        previous = series.steps[-1] if series.steps else None
        steps[series.name] = step_result(
            series.name, n, runs[series.name], series.idle_rss, previous
        )
    return steps


def step_fits(active: list[Series], args: argparse.Namespace, deadline: float) -> bool:
    """Whether every run of this step, at the series' recent pace, ends before `deadline`."""
    estimate = args.runs * sum(series.run_estimate() for series in active)
    return time.monotonic() + estimate <= deadline


def run_steps(
    all_series: list[Series], args: argparse.Namespace, rule: StopRule, deadline: float
) -> None:
    """Grow N for every series until the stop rule, --max-calls or the budget ends it."""
    print_header()
    for n in args.steps:
        active = [series for series in all_series if series.runs_at(n)]
        if not active:
            break
        if not step_fits(active, args, deadline):
            for series in active:
                series.stop(n, f"N >= {n} skipped: time budget (--budget-s {args.budget_s:g})")
                print(f"     {series.name}: {series.stopped}", flush=True)
            break
        for name, step in run_step(active, n, args, deadline).items():
            series = next(s for s in active if s.name == name)
            series.steps.append(step)
            print_row(step)
            if series.name.startswith("ours") and step.turns and not step.turn_timings:
                print("     ! no turn-timing lines in the server's log (LOG_TURN_TIMING)")
            if not series.server.alive():
                series.stop(n, "the server exited", log_tail=True)
            elif reason := rule.reason(step, series.steps[0]):
                series.stop(n, f"stopped at N = {n}: {reason}", log_tail=step.broken)
            if series.stopped:
                print(f"     {series.name}: {series.stopped}", flush=True)
    for series in all_series:
        if series.stopped is None:
            last = series.steps[-1].n if series.steps else 0
            series.info["stopped"] = {"n": last, "reason": f"ran every step up to N = {last}"}


# ------------------------------------------------------------------ main


def build_series(args: argparse.Namespace, ai_api: ServerProcess | None) -> list[Series]:
    largest = min(args.max_calls, max(args.steps))
    series = []
    if ai_api is not None:
        env = instant_env(ai_api.base_url + "/v1")
        series.append(Series("ours-instant", ours_process(largest, env), args.max_calls, ai_api))
        if args.records_off:
            off = ours_process(largest, {**env, "CALL_RECORDS": "false"})
            series.append(Series("ours-norecords", off, args.max_calls, ai_api))
        if not args.no_baseline:
            limit = min(args.max_calls, BASELINE_MAX_CALLS)
            series.append(Series("baseline-instant", baseline_process(env), limit, ai_api))
    if args.mode in ("offline", "both"):
        limit = min(args.max_calls, OFFLINE_MAX_CALLS)
        series.append(Series("ours-offline", ours_process(largest, {}), limit))
    return series


def run_facts(args: argparse.Namespace, machine: dict, started: float) -> tuple[float, dict]:
    """The run's duration, and what every JSON report starts with: the machine (with its
    load at the end, to show whether something else ran meanwhile), the arguments, the
    duration."""
    duration = time.monotonic() - started
    machine = {**machine, "load_average_end": load_average()}
    args_text = {k: str(v) for k, v in vars(args).items()}
    return duration, {"machine": machine, "args": args_text, "duration_s": round(duration, 1)}


def report(all_series: list[Series], args, rule: StopRule, machine: dict, started: float):
    """Print the ratios and targets; write the JSON, the plot and (if asked) the Markdown."""
    results = {series.name: series.steps for series in all_series}
    print("\n" + LEGEND)
    ratios = ratio_rows(results.get("ours-instant", []), results.get("baseline-instant", []))
    print_ratios(ratios)
    targets = check_targets(results["ours-instant"]) if "ours-instant" in results else []
    if "ours-norecords" in results:
        targets += records_targets(results["ours-instant"], results["ours-norecords"])
    if targets:
        print_targets(targets)
    duration, extra = run_facts(args, machine, started)
    machine = extra["machine"]
    extra |= {
        "stop_rule": rule.as_dict(),
        "servers": {series.name: series.info for series in all_series},
        "ratios": ratios,
        "targets": targets,
    }
    json_path = write_json(args.out / "load.json", results, extra)
    plot_path = write_plot(args.out / "load.png", results)
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.markdown:
        stops = {s.name: s.info["stopped"]["reason"] for s in all_series}
        text = render(results, machine, stops, targets, rule, duration)
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
        stagger_s=STAGGER_S,
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
    machine = machine_description(argv)
    logger.remove()  # the emulator's and espeak's debug lines would drown the tables
    logger.add(sys.stderr, level="WARNING")
    caller_audio()  # generate the caller WAVs before any worker forks
    started = time.monotonic()
    if args.processes:
        return main_processes(args, machine, started)
    rule = StopRule()
    print(f"stop rule: {rule.describe()}", flush=True)
    print(f"steps {', '.join(map(str, args.steps))}; {args.runs} run(s) each", flush=True)
    ai_api = ai_api_process(TRANSCRIPT) if args.mode in ("instant", "both") else None
    all_series = build_series(args, ai_api)
    try:
        if ai_api is not None:
            ai_api.start()
        for series in all_series:
            start_series(series)
        run_steps(all_series, args, rule, started + args.budget_s)
    finally:
        for series in all_series:
            series.server.stop()
        if ai_api is not None:
            ai_api.stop()
    report(all_series, args, rule, machine, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
