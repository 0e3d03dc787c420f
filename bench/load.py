"""Load benchmark: how many concurrent phone calls one server holds, and at what cost.

    .venv/bin/pip install -r bench/requirements.txt     # matplotlib, for the plot
    .venv/bin/python bench/load.py                      # everything, < 10 min on 2 cores
    .venv/bin/python bench/load.py --quick              # smoke run: N = 1, 10
    .venv/bin/python bench/load.py --mode instant --max-calls 50

For each server and N (1, 10, 25, 50, 100, 150, … until a step breaks) it starts N
emulated dial-in calls (`load_calls.py`: real Twilio webhook + Media Stream, caller speech
from WAV, DTMF on some calls, barge-in on others) and prints response latency p50/p95/p99,
outbound pacing, server CPU per call-minute and RSS, failed and dropped calls.

Series:
- ours-instant: `server.py` with every OpenAI service on the instant AI API
  (`phonebot.emulator.ai_api`), so the figures measure this project and Pipecat;
- baseline-instant: `bench/baseline_server.py`, Pipecat's Twilio example shape, on the same
  instant services (ours / baseline ratios are printed);
- ours-offline: `server.py` with no keys (pocketsphinx, keyword responder, espeak-ng).

A step "breaks" when a call fails or is dropped, or p95 latency exceeds 3x its N = 1 value
(`--break-factor`); that series then stops growing N. Results: `bench/results/load.json`
and `bench/results/load.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from loguru import logger

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from load_calls import caller_audio, run_call, start_workers  # noqa: E402
from load_report import (  # noqa: E402
    LEGEND,
    StepResult,
    check_targets,
    print_header,
    print_ratios,
    print_row,
    print_targets,
    ratio_rows,
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

STEPS = (1, 10, 25, 50, 100, 150, 200, 300, 400)
QUICK_STEPS = (1, 10)
OFFLINE_MAX_CALLS = 25
BASELINE_MAX_CALLS = 100
BREAK_P95_FACTOR = 3.0
STAGGER_S = 1.5
SETTLE_S = 3.0
SAMPLE_EVERY_S = 0.5
# The whole run must fit in ~10 minutes: each series stops adding steps when the next one
# would eat into the time kept for the series still to come.
BUDGET_S = 570.0
RESERVE_S = {"baseline-instant": 180.0, "ours-offline": 120.0}
QUERY = {"session_type": "support"}  # our persona; the baseline ignores it
TRANSCRIPT = "what are your opening hours"  # what the instant STT "hears", every turn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("instant", "offline", "both"), default="both")
    parser.add_argument("--max-calls", type=int, default=STEPS[-1], help="largest N to try")
    parser.add_argument("--quick", action="store_true", help="N = 1 and 10 only (smoke run)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    parser.add_argument(
        "--break-factor",
        type=float,
        default=BREAK_P95_FACTOR,
        help="stop growing N once p95 latency exceeds this multiple of its N = 1 value",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="caller processes (0: 1 up to 50 calls, else 2)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="time budget of the whole run (s)"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output folder")
    return parser.parse_args(argv)


def series_deadlines(args: argparse.Namespace, start: float) -> dict[str, float]:
    """Each series' deadline: the run's end minus the time kept for the series after it."""
    order = []
    if args.mode in ("instant", "both"):
        order += ["ours-instant"] + ([] if args.no_baseline else ["baseline-instant"])
    if args.mode in ("offline", "both"):
        order.append("ours-offline")
    deadlines, kept = {}, 0.0
    for name in reversed(order):
        deadlines[name] = start + args.budget_s - kept
        kept += RESERVE_S.get(name, 0.0)
    return deadlines


def steps_up_to(limit: int, quick: bool) -> list[int]:
    return [n for n in (QUICK_STEPS if quick else STEPS) if n <= limit]


def workers_for(n: int, requested: int) -> int:
    """One caller process drives ~50 calls comfortably; above that, use both cores."""
    return requested or (1 if n <= 50 else 2)


# ------------------------------------------------------------------ one step


def measure_idle_rss(server: ServerProcess) -> float:
    samples = []
    for _ in range(5):
        samples.append(rss_mb(server.pid))
        time.sleep(0.2)
    return statistics.median(samples)


def warm_up(server: ServerProcess) -> None:
    """One short call first, so lazily loaded models don't land on the N = 1 figures."""
    summary = asyncio.run(run_call(server.base_url + "/", 0, "warmup", 0.0, QUERY))
    if summary.failed or summary.dropped:
        print(f"  warm-up call failed: {summary.error}", flush=True)


def run_step(
    server: ServerProcess,
    series: str,
    n: int,
    args: argparse.Namespace,
    idle_rss: float,
    previous: StepResult | None,
    ai_api: ServerProcess | None,
) -> StepResult:
    """N calls against `server`, sampling its RSS meanwhile; CPU over the whole step."""
    meter = ProcessMeter(server.pid)
    helper = ProcessMeter(ai_api.pid) if ai_api else None
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
    cpu = meter.cpu_used() if server.alive() else float("nan")
    step = step_result(
        series, n, time.monotonic() - started, reports, cpu, idle_rss, meter.peak_rss(), previous
    )
    if helper and step.call_minutes:
        step.ai_api_cpu_per_call_min = helper.cpu_used() / step.call_minutes
    return step


def stop_reason(
    step: StepResult, first: StepResult, server: ServerProcess, factor: float
) -> str | None:
    """Why this series should not try a larger N, or None to go on."""
    if not server.alive():
        return "the server exited"
    if step.broken:
        return f"{step.failed} failed and {step.dropped} dropped calls"
    if first.p95 and step.p95 and step.p95 > factor * first.p95:
        return f"p95 {step.p95:.2f} s > {factor:g}x the N = 1 figure"
    return None


def run_series(
    series: str,
    server: ServerProcess,
    ns: list[int],
    args: argparse.Namespace,
    deadline: float,
    ai_api: ServerProcess | None = None,
) -> tuple[list[StepResult], dict]:
    """Start `server`, warm it up, run N = ns in turn until a step breaks, stop it."""
    server.start()
    steps: list[StepResult] = []
    info: dict = {"rss_start_mb": rss_mb(server.pid)}
    try:
        warm_up(server)
        time.sleep(SETTLE_S)
        idle = measure_idle_rss(server)
        info["rss_idle_mb"] = idle
        print_header(series, f"(idle RSS {idle:.0f} MB after one warm-up call)")
        for n in ns:
            if steps and time.monotonic() + 1.3 * steps[-1].wall_s > deadline:
                print(f"     skipped N >= {n}: time budget (--budget-s)", flush=True)
                info["skipped"] = {"from_n": n, "reason": "time budget"}
                break
            step = run_step(server, series, n, args, idle, steps[-1] if steps else None, ai_api)
            steps.append(step)
            print_row(step)
            reason = stop_reason(step, steps[0], server, args.break_factor)
            if reason:
                print(f"     stopped at N = {n}: {reason}", flush=True)
                info["stopped"] = {"n": n, "reason": reason}
                if step.broken or not server.alive():  # the server's last words, for why
                    info["stopped"]["log_tail"] = server.log_tail(15)
                break
            time.sleep(SETTLE_S)
    finally:
        server.stop()
    return steps, info


# ------------------------------------------------------------------ main


def run_instant(args, deadlines: dict, results: dict, infos: dict) -> None:
    ai_api = ai_api_process(TRANSCRIPT).start()
    try:
        env = instant_env(ai_api.base_url + "/v1")
        ns = steps_up_to(args.max_calls, args.quick)
        name = "ours-instant"
        results[name], infos[name] = run_series(
            name, ours_process(max(ns), env), ns, args, deadlines[name], ai_api
        )
        if not args.no_baseline:
            ns = steps_up_to(min(args.max_calls, BASELINE_MAX_CALLS), args.quick)
            name = "baseline-instant"
            results[name], infos[name] = run_series(
                name, baseline_process(env), ns, args, deadlines[name], ai_api
            )
    finally:
        ai_api.stop()


def run_offline(args, deadlines: dict, results: dict, infos: dict) -> None:
    ns = steps_up_to(min(args.max_calls, OFFLINE_MAX_CALLS), args.quick)
    name = "ours-offline"
    results[name], infos[name] = run_series(
        name, ours_process(max(ns), {}), ns, args, deadlines[name]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()  # the emulator's and espeak's debug lines would drown the tables
    logger.add(sys.stderr, level="WARNING")
    caller_audio()  # generate the caller WAVs before any worker forks
    started = time.monotonic()
    deadlines = series_deadlines(args, started)
    results: dict[str, list[StepResult]] = {}
    infos: dict[str, dict] = {}
    if args.mode in ("instant", "both"):
        run_instant(args, deadlines, results, infos)
    if args.mode in ("offline", "both"):
        run_offline(args, deadlines, results, infos)
    print("\n" + LEGEND)
    ratios = ratio_rows(results.get("ours-instant", []), results.get("baseline-instant", []))
    print_ratios(ratios)
    targets = check_targets(results["ours-instant"]) if "ours-instant" in results else []
    if targets:
        print_targets(targets)
    extra = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "duration_s": round(time.monotonic() - started, 1),
        "servers": infos,
        "ratios": ratios,
        "targets": targets,
    }
    json_path = write_json(args.out / "load.json", results, extra)
    plot_path = write_plot(args.out / "load.png", results)
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
