"""Soak benchmark: does one long-running server process creep, call after call?

    .venv/bin/python bench/soak.py                    # 2,000 short calls, 20 at a time
    .venv/bin/python bench/soak.py --quick            # development: 40 calls
    .venv/bin/python bench/soak.py --markdown docs/soak-results.md   # the published curve

One `server.py` process on the instant AI API (the same servers `load.py` starts) takes
`--calls` short calls (~5 s: the caller talks over the greeting, asks one question and
hangs up while the bot answers, every other call without Twilio's `stop`: the `short`
conversations of `load_calls.py`) in batches of `--batch` concurrent calls. After
each batch, once the server reports no open stream, it takes a reading:

- from outside, in /proc: the server's RSS, open file descriptors and OS threads;
- from inside: the server runs with `LOG_RESOURCE_USAGE=true` (phonebot.ops.diagnostics), and
  a SIGUSR1 makes it log one `Resource usage {...}` line after a full garbage collection:
  asyncio tasks, live objects, and with `TRACEMALLOC_FRAMES` the Python allocation sites
  that grew since the previous batch.

The verdict compares the end of the run (median of the last three readings) with the
warm-up (`--warmup-calls`, 10 % by default: caches, pools and lazily built objects fill up
first): RSS growth ≤ 5 % over the reading at the end of the warm-up, and open files,
threads and asyncio tasks no higher than the most the warm-up saw. Results:
`bench/results/soak.json` (every reading), `soak.png` (the curves), and `--markdown PATH`
(a table of the curve, the verdict and the top growing allocation sites).

Tracing is off by default: tracemalloc hooks every allocation, and Pipecat allocates per
frame, so a traced server runs several times slower (20 concurrent calls stop getting
answers on 2 cores) and its RSS includes the tracer's tables. The verdict is measured on
the bare process; to name what grows, rerun with `--tracemalloc-frames 1 --batch 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from loguru import logger

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from load_calls import NO_REPLY, CallSummary, caller_audio, run_call  # noqa: E402
from load_markdown import load_average, machine_description, shown_arguments  # noqa: E402
from load_server import (  # noqa: E402
    ServerProcess,
    ai_api_process,
    env_assignments,
    instant_env,
    ours_process,
    rss_mb,
)

from phonebot.ops.diagnostics import parse_resource_usage  # noqa: E402

CALLS = 2000
BATCH = 20
QUICK_CALLS = 40
ARRIVAL_GAP_S = 0.2  # 20 greetings in the same instant would be a load test, not a soak
IDLE_TIMEOUT_S = 30.0  # a batch's streams must all close within this after its calls end
READING_TIMEOUT_S = 60.0  # a traced server's snapshot of every allocation is slow
SETTLE_S = 0.5
MAX_RSS_GROWTH = 0.05
COUNTS = ("fds", "threads", "tasks")  # must not grow after the warm-up
QUERY = {"session_type": "support"}
TRANSCRIPT = "what are your opening hours"
# load_calls.conversation's ~5 s calls: talk over the greeting, hang up mid-answer; every
# other call hangs up without Twilio's `stop` (a dropped socket), the other path out.
SHORT_CALLS = ("short", "short-drop")
TABLE_ROWS = 21  # readings shown in the Markdown table (evenly spaced, first and last kept)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, help=f"calls in all (default {CALLS}; quick 40)")
    parser.add_argument("--batch", type=int, default=BATCH, help="concurrent calls per batch")
    parser.add_argument(
        "--warmup-calls", type=int, help="calls before the reference reading (default 10 %%)"
    )
    parser.add_argument(
        "--tracemalloc-frames",
        type=int,
        default=0,
        help="trace the server's allocations with this many frames (default 0: off; slows "
        "the server several times over: use a smaller --batch)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for the server, e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument("--quick", action="store_true", help="development: 40 calls")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output folder")
    parser.add_argument("--markdown", type=Path, help="also write the curve as Markdown here")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = QUICK_CALLS if args.quick else CALLS
    try:
        args.server_env = env_assignments(args.server_env)
    except ValueError as error:
        parser.error(f"--server-env: {error}")
    if args.calls < 1 or args.batch < 1:
        parser.error("--calls and --batch must be >= 1")
    if args.warmup_calls is None:
        args.warmup_calls = max(args.batch, round(args.calls * 0.1 / args.batch) * args.batch)
    return args


# ------------------------------------------------------------------ readings


@dataclass
class Reading:
    """The server after one batch: what /proc shows and what it logged about itself."""

    batch: int
    calls: int  # calls made so far
    failed: int  # failed or dropped calls so far
    elapsed_s: float
    rss_mb: float
    fds: int
    threads: int
    tasks: int | None = None
    task_kinds: dict[str, int] = field(default_factory=dict)  # most common live coroutines
    gc_objects: int | None = None
    traced_mb: float | None = None
    malloc_used_mb: float | None = None  # glibc heap in use (C code, large Python objects)
    malloc_free_mb: float | None = None  # free but kept inside malloc's arenas
    growth: list[dict] = field(default_factory=list)  # top allocation sites since last batch


def proc_counts(pid: int) -> tuple[int, int]:
    """Open file descriptors and OS threads of the server process."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return fds, int(line.split()[1])
    return fds, 0


async def wait_idle(server: ServerProcess) -> None:
    """Until /health shows no open stream: a batch's hung-up calls have been torn down."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                health = (await client.get(server.base_url + "/health")).json()
            except (httpx.HTTPError, ValueError):  # a traced server answers slowly
                health = {"active_streams": "unknown"}
            if not health.get("active_streams") and not health.get("active_calls"):
                return
            await asyncio.sleep(0.2)
    print(f"  ! streams still open {IDLE_TIMEOUT_S:g} s after the batch", flush=True)


async def server_reading(server: ServerProcess) -> dict | None:
    """SIGUSR1 → the server logs one `Resource usage` line; read it from its log."""
    offset = server.log_size()
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + READING_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in server.log_since(offset):
            if (reading := parse_resource_usage(line)) is not None:
                return reading
        await asyncio.sleep(0.1)
    return None


def diagnostics_on(server: ServerProcess) -> bool:
    """Whether the server logged that it takes SIGUSR1 readings (an older server would
    die of the signal: without the line, only /proc is read)."""
    return any("LOG_RESOURCE_USAGE on" in line for line in server.log_since(0))


async def take_reading(
    server: ServerProcess, batch: int, calls: int, failed: int, started: float, inside: bool
) -> Reading:
    await wait_idle(server)
    await asyncio.sleep(SETTLE_S)
    logged = await server_reading(server) if inside else None
    fds, threads = proc_counts(server.pid)
    reading = Reading(
        batch, calls, failed, time.monotonic() - started, rss_mb(server.pid), fds, threads
    )
    if logged:
        reading.tasks = logged.get("tasks")
        reading.task_kinds = logged.get("task_kinds") or {}
        reading.gc_objects = logged.get("gc_objects")
        reading.traced_mb = logged.get("traced_mb")
        reading.malloc_used_mb = logged.get("malloc_used_mb")
        reading.malloc_free_mb = logged.get("malloc_free_mb")
        reading.growth = logged.get("growth", [])
    return reading


# ------------------------------------------------------------------ the run


async def run_batch(url: str, first: int, size: int) -> int:
    """`size` short calls, arriving `ARRIVAL_GAP_S` apart; returns how many failed.

    A call fails when it errs (refused, no audio, timed out) or the server drops it. A
    reply that started while the caller was still talking over the greeting has no
    measurable latency (`load_calls.summarize` calls that "no reply"): latency is not what
    a soak measures, so that call counts as made.
    """
    calls = [
        run_call(url, first + k, SHORT_CALLS[(first + k) % 2], k * ARRIVAL_GAP_S, QUERY)
        for k in range(size)
    ]
    failed = [s for s in await asyncio.gather(*calls) if call_failed(s)]
    for summary in failed:
        print(f"  call {summary.index}: {summary.error}", flush=True)
    return len(failed)


def call_failed(summary: CallSummary) -> bool:
    return summary.dropped or (summary.failed and summary.error != NO_REPLY)


async def soak(server: ServerProcess, args: argparse.Namespace) -> list[Reading]:
    inside = diagnostics_on(server)
    if not inside:
        print("  ! the server does not log resource usage: tasks and tracemalloc not read")
    started = time.monotonic()
    readings = [await take_reading(server, 0, 0, 0, started, inside)]
    print_reading(readings[0])
    done = failed = 0
    while done < args.calls and server.alive():
        # The very first call builds what a process builds once (lazy imports, the first
        # pipeline): alone, so its pause doesn't fail the calls around it.
        size = 1 if done == 0 else min(args.batch, args.calls - done)
        failed += await run_batch(server.base_url + "/", done, size)
        done += size
        if not server.alive():
            break
        reading = await take_reading(server, len(readings), done, failed, started, inside)
        readings.append(reading)
        print_reading(reading)
    return readings


def print_reading(r: Reading) -> None:
    tasks = "–" if r.tasks is None else str(r.tasks)
    traced = "" if r.traced_mb is None else f" traced {r.traced_mb:7.1f} MB"
    top = f"  top: {r.growth[0]['site']} +{r.growth[0]['kb']:g} KB" if r.growth else ""
    print(
        f"{r.calls:6d} calls {r.failed:3d} failed {r.elapsed_s:6.0f} s  RSS {r.rss_mb:7.1f} MB"
        f"  fds {r.fds:4d}  threads {r.threads:3d}  tasks {tasks:>4}{traced}{top}",
        flush=True,
    )


# ------------------------------------------------------------------ verdict


def verdict(readings: list[Reading], warmup_calls: int) -> dict:
    """End of the run (median of the last three readings) against the end of the warm-up."""
    reference = next((r for r in readings if r.calls >= warmup_calls), None)
    after = [r for r in readings if reference and r.calls > reference.calls]
    if reference is None or not after:
        return {"measured": False, "detail": "no reading after the warm-up", "checks": []}
    tail = after[-3:]
    checks = []
    end_rss = statistics.median(r.rss_mb for r in tail)
    growth = (end_rss - reference.rss_mb) / reference.rss_mb
    checks.append(
        {
            "figure": "rss_mb",
            "target": f"RSS growth after the warm-up <= {MAX_RSS_GROWTH:.0%}",
            "warmup": reference.rss_mb,
            "end": end_rss,
            "growth": round(growth, 4),
            "met": growth <= MAX_RSS_GROWTH,
        }
    )
    warmup = [r for r in readings if r.calls <= reference.calls]
    for name in COUNTS:
        values = [getattr(r, name) for r in tail]
        # The most seen up to the end of the warm-up: a task that exists only while calls
        # are live (a lease renewal that ends a moment after the last call) is there in one
        # reading and gone in the next; growth is going above what the warm-up reached.
        seen = [v for r in warmup if (v := getattr(r, name)) is not None]
        start = max(seen) if seen else None
        if start is None or None in values:
            checks.append({"figure": name, "target": f"no growth in {name}", "met": None})
            continue
        end = statistics.median(values)
        checks.append(
            {
                "figure": name,
                "target": f"no growth in {name}",
                "warmup": start,
                "end": end,
                "growth": end - start,
                "met": end <= start,
            }
        )
    span = after[-1].calls - reference.calls
    slope = (after[-1].rss_mb - reference.rss_mb) / span * 1000 if span else None
    return {
        "measured": True,
        "warmup_calls": reference.calls,
        "calls": readings[-1].calls,
        "rss_mb_per_1000_calls": None if slope is None else round(slope, 2),
        "checks": checks,
        "met": all(c["met"] is not False for c in checks),
    }


def persistent_growth(readings: list[Reading], warmup_calls: int, top: int = 10) -> list[dict]:
    """Allocation sites that kept growing after the warm-up: in how many batch-to-batch
    comparisons each site was among the top growers, and by how much in all."""
    seen: dict[str, list[float]] = defaultdict(list)
    after = [r for r in readings if r.calls > warmup_calls]
    for reading in after:
        for site in reading.growth:
            seen[site["site"]].append(site["kb"])
    ranked = sorted(seen.items(), key=lambda item: (len(item[1]), sum(item[1])), reverse=True)
    return [
        {"site": site, "batches": len(kbs), "of_batches": len(after), "kb": round(sum(kbs), 1)}
        for site, kbs in ranked[:top]
    ]


# ------------------------------------------------------------------ outputs


def write_json(path: Path, readings: list[Reading], extra: dict) -> Path:
    data = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
        "readings": [asdict(r) for r in readings],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_plot(path: Path, readings: list[Reading], warmup_calls: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r bench/requirements.txt): no plot")
        return None
    calls = [r.calls for r in readings]
    panels = [
        ("rss_mb", "RSS (MB)"),
        ("traced_mb", "traced by tracemalloc (MB)"),
        ("fds", "open file descriptors"),
        ("threads", "OS threads"),
        ("tasks", "asyncio tasks"),
        ("gc_objects", "live Python objects"),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(15, 7))
    for axis, (name, label) in zip(axes.flat, panels, strict=True):
        points = [(c, getattr(r, name)) for c, r in zip(calls, readings, strict=True)]
        points = [(c, v) for c, v in points if v is not None]
        if points:
            axis.plot(*zip(*points, strict=True), "-o", markersize=2, label=label)
        if name == "rss_mb":
            _plot_malloc(axis, readings)
        axis.axvline(warmup_calls, color="grey", linestyle=":", linewidth=1, label="warm-up end")
        axis.set(xlabel="calls", ylabel=label, title=label)
        axis.grid(True, alpha=0.3)
        if name == "rss_mb" and points:
            reference = next((v for c, v in points if c >= warmup_calls), None)
            if reference:
                limit = reference * (1 + MAX_RSS_GROWTH)
                axis.axhline(limit, color="red", linestyle="--", linewidth=1, label="+5 %")
        axis.legend(fontsize=7)
    figure.suptitle("One server process, short calls in batches: resources after each batch")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_malloc(axis, readings: list[Reading]) -> None:
    """RSS next to what malloc holds: RSS rising while malloc's in-use figure stays flat is
    the allocator (a new arena, fragmentation), not live data."""
    for name, label in (("malloc_used_mb", "malloc in use"), ("malloc_free_mb", "malloc free")):
        points = [(r.calls, getattr(r, name)) for r in readings if getattr(r, name) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), ":", label=label)


def _cell(value: object, spec: str = "") -> str:
    return "–" if value is None else format(value, spec)


def as_printed(value: float) -> str:
    """A reading as printed: MB to 0.1, counts as they are (the JSON keeps full precision)."""
    return f"{value:.1f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"


def render_markdown(readings: list[Reading], result: dict, extra: dict) -> str:
    machine = extra["machine"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    step = max(1, (len(readings) - 1) // (TABLE_ROWS - 1))
    shown = readings[::step]
    if shown[-1] is not readings[-1]:
        shown.append(readings[-1])
    lines = [
        "<!-- Generated by bench/soak.py --markdown; do not edit by hand. -->",
        f"Measured {when} on {machine['cpu_model']} ({machine['cores']} cores), "
        f"Python {machine['python']}, Pipecat {machine['pipecat']}; load average "
        f"{machine.get('load_average_start')} at the start, {extra['duration_s']:.0f} s in all:",
        "",
        "```bash",
        machine["command"],
        "```",
        "",
        "![resources after each batch](img/soak.png)",
        "",
        "| calls | failed | RSS MB | malloc in use / free MB | open fds | threads "
        "| asyncio tasks | live objects | traced MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in shown:
        heap = f"{_cell(r.malloc_used_mb, '.1f')} / {_cell(r.malloc_free_mb, '.1f')}"
        cells = [r.calls, r.failed, f"{r.rss_mb:.1f}", heap, r.fds, r.threads, _cell(r.tasks)]
        cells += [_cell(r.gc_objects), _cell(r.traced_mb, ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"Warm-up: the first {extra['args']['warmup_calls']} calls.", ""]
    if result["measured"]:
        slope = result["rss_mb_per_1000_calls"]
        lines.append(f"RSS slope after the warm-up: {slope} MB per 1,000 calls.")
        lines.append("")
        for check in result["checks"]:
            mark = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
            detail = (
                f"{as_printed(check['warmup'])} after the warm-up, "
                f"{as_printed(check['end'])} at the end"
                if "end" in check
                else "the server logged no resource usage"
            )
            lines.append(f"- **{mark}**: {check['target']}: {detail}")
    else:
        lines.append(f"Not measured: {result['detail']}.")
    growth = extra.get("persistent_growth") or []
    if growth:
        lines += [
            "",
            "Python allocation sites among the top growers batch to batch after the warm-up "
            "(tracemalloc; KB summed over the batches where the site grew):",
            "",
            "| site | batches | KB |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| `{g['site']}` | {g['batches']} of {g['of_batches']} | {g['kb']} |" for g in growth
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main


def args_record(args: argparse.Namespace) -> dict:
    """The options as JSON can hold them (paths as text)."""
    options = shown_arguments(args)  # a secret given with --server-env is masked
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}


def server_env(ai_url: str, frames: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        **instant_env(ai_url),
        "LOG_TURN_TIMING": "false",
        "LOG_RESOURCE_USAGE": "true",
        "LOG_RESOURCE_USAGE_EVERY_S": "0",  # readings on SIGUSR1 only, between batches
        "TRACEMALLOC_FRAMES": str(frames),
        **(extra or {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_description(argv)
    machine["command"] = machine["command"].replace("bench/load.py", "bench/soak.py")
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    caller_audio()
    started = time.monotonic()
    ai_api = ai_api_process(TRANSCRIPT)
    print(f"{args.calls} calls, {args.batch} at a time; warm-up {args.warmup_calls} calls")
    readings: list[Reading] = []
    try:
        ai_api.start()
        server = ours_process(
            args.batch,
            server_env(ai_api.base_url + "/v1", args.tracemalloc_frames, args.server_env),
        )
        server.start()
        try:
            readings = asyncio.run(soak(server, args))
            alive = server.alive()
            log_tail = "" if alive else server.log_tail(20)
        finally:
            server.stop()
    finally:
        ai_api.stop()
    result = verdict(readings, args.warmup_calls)
    duration = time.monotonic() - started
    extra = {
        "machine": {**machine, "load_average_end": load_average()},
        "args": args_record(args),
        "duration_s": round(duration, 1),
        "server_exited": None if alive else log_tail,
        "verdict": result,
        "persistent_growth": persistent_growth(readings, args.warmup_calls),
    }
    print_verdict(result, alive)
    json_path = write_json(args.out / "soak.json", readings, extra)
    plot_path = write_plot(args.out / "soak.png", readings, args.warmup_calls)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(readings, result, extra))
        if plot_path:  # the curve goes with the page (bench/results/ is not committed)
            (args.markdown.parent / "img").mkdir(exist_ok=True)
            shutil.copyfile(plot_path, args.markdown.parent / "img" / "soak.png")
        print(f"wrote {args.markdown}")
    print(f"total {duration:.0f} s")
    return 0 if alive else 1


def print_verdict(result: dict, alive: bool) -> None:
    if not alive:
        print("the server exited during the soak")
    if not result["measured"]:
        print(f"verdict: not measured ({result['detail']})")
        return
    print(f"RSS slope after the warm-up: {result['rss_mb_per_1000_calls']} MB per 1,000 calls")
    for check in result["checks"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        figures = ""
        if "end" in check:
            figures = f": {as_printed(check['warmup'])} → {as_printed(check['end'])}"
        print(f"  {mark:>12}: {check['target']}{figures}")


if __name__ == "__main__":
    sys.exit(main())
