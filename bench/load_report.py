"""Figures for one load step, the printed tables, the ours/baseline ratios, JSON and plot.

A step is N concurrent calls under one arrival pattern (`load_patterns`: a burst, repeated
`runs` times, or a steady run measured over its window, `steady_runs` times), ours and
the baseline interleaved run by run (the order turned at every repeat), so a disturbance
on the shared machine lands on both. Latency percentiles are
pooled over every answered turn of every run (replies to caller speech; replies to DTMF
keys are kept apart, as the baseline doesn't answer keys), and each run's own p50/p95 give
the spread (min / median / max across runs); greetings (stream start -> first bot audio)
likewise. Pacing counts, inside each bot reply as the caller's playout buffer heard it,
the silence spent waiting for late audio (`underrun`, as a share of the bot's speaking
time) and the chunks that came after the buffer had run dry (`late`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from load_calls import CallSummary, WorkerReport
from load_patterns import mean_calls_up, window_view
from load_stats import (
    SLOW_TURN_S,
    STAGES,
    histogram,
    percentile,
    slow_share,
    spread,
    summarize_timings,
)

# `--processes`' held target (load_cluster): p95 within this factor of one call's, and
# the caller's playout buffer empty no more than this share of the bot's speech.
TARGET_P95_FACTOR = 1.5
TARGET_UNDERRUN = 0.01


@dataclass
class RunData:
    """One run of a step as measured: the callers' reports and the server's readings.

    With a `window` (wall-clock start, end: a steady run), `calls` are what happened in it
    (`load_patterns.window_view`) and `cpu_s` is the server's CPU over it.
    """

    reports: list[WorkerReport]
    wall_s: float
    cpu_s: float
    rss_peak_mb: float
    timings: list[dict] = field(default_factory=list)  # server turn-timing records
    ai_api_cpu_s: float | None = None
    window: tuple[float, float] | None = None
    rss_process_peak_mb: float | None = None  # the largest single server process
    outside_cpu_s: float | None = None  # used by processes outside the benchmark meanwhile
    steal_s: float | None = None  # the hypervisor's, meanwhile
    loop_cpu_s: float | None = None  # the busiest server process's main thread (its loop)

    @property
    def measured_s(self) -> float:
        """How long the readings cover: the steady window, or the whole burst run."""
        return self.window[1] - self.window[0] if self.window is not None else self.wall_s

    @property
    def calls(self) -> list[CallSummary]:
        calls = [call for report in self.reports for call in report.calls]
        if self.window is None:
            return calls
        return [window_view(call, self.window) for call in calls]

    @property
    def latencies(self) -> list[float]:
        return [lat for call in self.calls for lat in call.speech_latencies]


@dataclass
class RunFigures:
    """One run's own figures, for the spread across the runs of a step."""

    run: int
    wall_s: float
    calls_ok: int
    failed: int
    dropped: int
    turns: int
    p50: float | None
    p95: float | None
    slow_share: float | None
    underrun_share: float
    cpu_per_call_min: float | None
    greeting_p95: float | None = None
    turn_interval_s: float | None = None
    outside_cores: float | None = None  # CPU others used, in cores (load_server.MachineCpu)
    steal_cores: float | None = None
    loop_busy: float | None = None  # share of the time the busiest event loop was on a core


@dataclass
class StepResult:
    """Everything measured at one N for one server, pooled over its runs."""

    series: str
    n: int
    wall_s: float
    pattern: str = "burst"
    calls_ok: int = 0
    failed: int = 0
    dropped: int = 0
    turns: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    slow_share: float | None = None  # share of turns slower than SLOW_TURN_S
    p50_spread: dict | None = None  # min / median / max of the runs' own p50
    p95_spread: dict | None = None
    greetings: int = 0
    greeting_p50: float | None = None  # stream start -> first bot audio
    greeting_p95: float | None = None
    greeting_p95_spread: dict | None = None
    key_turns: int = 0
    key_p50: float | None = None
    key_p95: float | None = None
    underrun_share: float = 0.0
    late_chunks: int = 0
    bot_chunks: int = 0
    long_gaps: int = 0
    clears: int = 0
    call_minutes: float = 0.0
    window_s: float | None = None  # steady: the measured window (per run)
    calls_up_mean: float | None = None  # steady: calls up on average over the window
    turn_interval_s: float | None = None  # median time between a call's replies
    cpu_s: float = 0.0
    cpu_per_call_min: float | None = None
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_per_call_mb: float | None = None
    rss_process_peak_mb: float | None = None  # the largest single server process
    rss_idle_process_mb: float | None = None
    server_processes: int = 1
    rss_slope_mb: float | None = None
    loadgen_cpu_per_call_min: float | None = None
    loadgen_lag_p99_ms: float | None = None
    loadgen_lag_max_ms: float | None = None
    # Seconds the callers' own loop stalled (a frame slot 50 ms late or more), summed over
    # calls; the late audio inside those stalls is not in `underrun_share`.
    loadgen_stall_call_s: float = 0.0
    ai_api_cpu_per_call_min: float | None = None  # the instant services' own process
    machine_cores: float | None = None  # the server, callers and AI emulator together
    errors: list[str] = field(default_factory=list)
    runs: list[RunFigures] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # every turn, sorted, seconds
    histogram: dict = field(default_factory=dict)  # of `latencies`, see load_stats.histogram
    server_turns: dict | None = None  # summary of the server's turn-timing lines
    turn_timings: list[dict] = field(default_factory=list)  # those lines, one per turn

    @property
    def broken(self) -> bool:
        return self.failed > 0 or self.dropped > 0


@dataclass(frozen=True)
class MachineBudget:
    """One step's CPU on the benchmark's machine: per call-minute, the server's, the load
    generator's (the emulated callers) and the instant AI emulator's, which exist only in
    the benchmark but share the server's cores; and the cores all three used.

    Why: the targets put the callers on the server's machine, so a step whose three
    processes together use every core is saturated whatever its latencies say, and
    `calls_at_this_cost` estimates where that happens. It is an estimate: a call-minute
    costs less as N grows (the processes' idle work is spread over more calls).
    """

    server: float
    load_generator: float
    ai_services: float | None  # None: no AI emulator process (offline engines)
    cores_used: float | None = None  # all three, over what the step measured

    @classmethod
    def of(cls, step: StepResult) -> MachineBudget | None:
        """The step's budget; None without the server's and the generator's CPU."""
        if step.cpu_per_call_min is None or step.loadgen_cpu_per_call_min is None:
            return None
        return cls(step.cpu_per_call_min, step.loadgen_cpu_per_call_min,
                   step.ai_api_cpu_per_call_min, step.machine_cores)  # fmt: skip

    @property
    def total(self) -> float:
        return self.server + self.load_generator + (self.ai_services or 0.0)

    def calls_at_this_cost(self, cores: int) -> int:
        """About how many calls `cores` would carry, every core busy, if each call-minute
        cost what it did at this step."""
        return int(cores * 60 / self.total) if self.total > 0 else 0


def pacing(calls: Sequence[CallSummary]) -> tuple[float, int, int, int]:
    """(underrun share of bot speaking time, late chunks, chunks, long mid-reply gaps)."""
    underrun = sum(c.bot_underrun for c in calls)
    speaking = sum(c.bot_audio for c in calls) + underrun
    share = underrun / speaking if speaking > 0 else 0.0
    late = sum(c.late_chunks for c in calls)
    return share, late, sum(c.bot_chunks for c in calls), sum(c.long_gaps for c in calls)


def distinct_errors(calls: Sequence[CallSummary], limit: int = 3) -> list[str]:
    errors: list[str] = []
    for call in calls:
        if call.error and call.error not in errors:
            errors.append(call.error)
    return errors[:limit]


def greetings_of(calls: Sequence[CallSummary]) -> list[float]:
    return [call.greeting for call in calls if call.greeting is not None]


def turn_interval(calls: Sequence[CallSummary]) -> float | None:
    """Median time from one reply to the next within a call: the caller's real turn
    cadence (a steady caller aims at 6-10 s; a long reply stretches it)."""
    gaps = [b - a for c in calls for a, b in zip(c.speech_at, c.speech_at[1:], strict=False)]
    return percentile(gaps, 50)


def run_figures(index: int, run: RunData) -> RunFigures:
    calls, latencies = run.calls, run.latencies
    minutes = sum(call.duration for call in calls) / 60
    return RunFigures(
        run=index,
        wall_s=run.wall_s,
        calls_ok=sum(not (c.failed or c.dropped) for c in calls),
        failed=sum(c.failed for c in calls),
        dropped=sum(c.dropped for c in calls),
        turns=len(latencies),
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        slow_share=slow_share(latencies),
        underrun_share=pacing(calls)[0],
        cpu_per_call_min=run.cpu_s / minutes if minutes else None,
        greeting_p95=percentile(greetings_of(calls), 95),
        turn_interval_s=turn_interval(calls),
        outside_cores=_cores(run.outside_cpu_s, run.measured_s),
        steal_cores=_cores(run.steal_s, run.measured_s),
        loop_busy=_cores(run.loop_cpu_s, run.measured_s),
    )


def loadgen_cpu_s(*runs: RunData) -> float | None:
    """The load generator's CPU over what the runs measure: their windows (steady), where
    the server's CPU and the call-minutes are counted, or the whole runs (burst). None when
    a caller process did not read its window (its whole run's CPU would overstate it)."""
    parts = [
        report.cpu_s if run.window is None else report.window_cpu_s
        for run in runs
        for report in run.reports
    ]
    return None if None in parts else sum(parts)


def per_call_minute(cpu_s: float | None, call_minutes: float) -> float | None:
    """CPU seconds per call-minute; None without the CPU or the call-minutes."""
    return cpu_s / call_minutes if cpu_s is not None and call_minutes else None


def machine_cores(runs: Sequence[RunData]) -> float | None:
    """Cores the server, the load generator and the AI emulator used together, over what
    the runs measured (steady: the windows; burst: the whole runs)."""
    span = sum(run.measured_s for run in runs)
    parts = [run.cpu_s for run in runs] + [loadgen_cpu_s(run) for run in runs]
    parts += [run.ai_api_cpu_s or 0.0 for run in runs]
    if any(part is None or part != part for part in parts):  # None or NaN
        return None
    return _cores(sum(parts), span)


def _cores(cpu_s: float | None, span_s: float) -> float | None:
    return None if cpu_s is None or span_s <= 0 else cpu_s / span_s


def step_result(
    series: str,
    n: int,
    runs: Sequence[RunData],
    rss_idle_mb: float,
    previous: StepResult | None,
    pattern: str = "burst",
) -> StepResult:
    """Pool the runs' call summaries and the server's /proc readings for one step."""
    calls = [call for run in runs for call in run.calls]
    greetings = sorted(greetings_of(calls))
    windows = [run.window[1] - run.window[0] for run in runs if run.window is not None]
    largest = [run.rss_process_peak_mb for run in runs if run.rss_process_peak_mb is not None]
    speech = sorted(lat for run in runs for lat in run.latencies)
    keyed = [lat for call in calls for lat in call.key_latencies]
    share, late, chunks, long_gaps = pacing(calls)
    call_minutes = sum(call.duration for call in calls) / 60
    lags = [lag for run in runs for report in run.reports for lag in report.lags]
    cpu_s = sum(run.cpu_s for run in runs)
    rss_peak = max((run.rss_peak_mb for run in runs), default=rss_idle_mb)
    per_run = [run_figures(k + 1, run) for k, run in enumerate(runs)]
    timings = [record for run in runs for record in run.timings]
    result = StepResult(
        series=series,
        n=n,
        wall_s=sum(run.wall_s for run in runs),
        pattern=pattern,
        calls_ok=sum(not (c.failed or c.dropped) for c in calls),
        failed=sum(c.failed for c in calls),
        dropped=sum(c.dropped for c in calls),
        turns=len(speech),
        p50=percentile(speech, 50),
        p95=percentile(speech, 95),
        p99=percentile(speech, 99),
        slow_share=slow_share(speech),
        p50_spread=spread(r.p50 for r in per_run),
        p95_spread=spread(r.p95 for r in per_run),
        greetings=len(greetings),
        greeting_p50=percentile(greetings, 50),
        greeting_p95=percentile(greetings, 95),
        greeting_p95_spread=spread(r.greeting_p95 for r in per_run),
        key_turns=len(keyed),
        key_p50=percentile(keyed, 50),
        key_p95=percentile(keyed, 95),
        underrun_share=share,
        late_chunks=late,
        bot_chunks=chunks,
        long_gaps=long_gaps,
        clears=sum(c.clears for c in calls),
        call_minutes=call_minutes,
        window_s=windows[0] if windows else None,
        calls_up_mean=mean_calls_up(call_minutes, sum(windows)) if windows else None,
        turn_interval_s=turn_interval(calls),
        cpu_s=cpu_s,
        cpu_per_call_min=per_call_minute(cpu_s, call_minutes),
        rss_idle_mb=rss_idle_mb,
        rss_peak_mb=rss_peak,
        rss_per_call_mb=(rss_peak - rss_idle_mb) / n,
        rss_process_peak_mb=max(largest, default=None),
        loadgen_cpu_per_call_min=per_call_minute(loadgen_cpu_s(*runs), call_minutes),
        loadgen_lag_p99_ms=_ms(percentile(lags, 99)),
        loadgen_lag_max_ms=_ms(max(lags, default=None)),
        loadgen_stall_call_s=round(sum((call.own_stall_s for call in calls), 0.0), 2),
        errors=distinct_errors(calls),
        runs=per_run,
        latencies=[round(lat, 4) for lat in speech],
        histogram=histogram(speech),
        server_turns=summarize_timings(timings) if timings else None,
        turn_timings=timings,
    )
    helper_cpu = [run.ai_api_cpu_s for run in runs if run.ai_api_cpu_s is not None]
    result.ai_api_cpu_per_call_min = per_call_minute(
        sum(helper_cpu) if helper_cpu else None, call_minutes
    )
    result.machine_cores = machine_cores(runs)
    if previous is not None and n > previous.n and previous.pattern == pattern:
        result.rss_slope_mb = (rss_peak - previous.rss_peak_mb) / (n - previous.n)
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ------------------------------------------------------------------ printing


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A figure for a table cell; "–" when it was not measured."""
    return "–" if value is None else format(value, spec)


def fmt_range(spread_: dict | None) -> str:
    """Lowest–highest of a figure across the runs of a step."""
    return "–" if not spread_ else f"{spread_['min']:.2f}–{spread_['max']:.2f}"


HEADER = (
    f"{'series':<17} {'pattern':<7} {'N':>4} {'up':>5} {'runs':>4} {'ok':>4} {'fail':>4} "
    f"{'drop':>4} {'turns':>5} {'p50 s':>6} {'p95 s':>6} {'(runs)':>9} "
    f"{f'>{SLOW_TURN_S:g}s':>5} {'greet p50':>9} {'p95':>5} {'key p95':>7} {'underrun':>8} "
    f"{'CPU s/call-min':>14} {'RSS MB':>7} {'MB/call':>7} {'gen lag p99/max':>15}"
)


def format_row(step: StepResult) -> str:
    lag = f"{fmt(step.loadgen_lag_p99_ms, '.0f')}/{fmt(step.loadgen_lag_max_ms, '.0f')}ms"
    return (
        f"{step.series:<17} {step.pattern:<7} {step.n:>4} {fmt(step.calls_up_mean, '.1f'):>5} "
        f"{len(step.runs):>4} {step.calls_ok:>4} {step.failed:>4} {step.dropped:>4} "
        f"{step.turns:>5} {fmt(step.p50):>6} {fmt(step.p95):>6} "
        f"{fmt_range(step.p95_spread):>9} {fmt(step.slow_share, '.0%'):>5} "
        f"{fmt(step.greeting_p50):>9} {fmt(step.greeting_p95):>5} {fmt(step.key_p95):>7} "
        f"{fmt(step.underrun_share, '.2%'):>8} {fmt(step.cpu_per_call_min):>14} "
        f"{step.rss_peak_mb:>7.0f} {fmt(step.rss_per_call_mb, '.1f'):>7} {lag:>15}"
    )


def format_run(series: str, n: int, run: RunFigures, runs: int, pattern: str = "burst") -> str:
    """One progress line per run, so a long step shows it is alive."""
    return (
        f"  {series} {pattern} N = {n} run {run.run}/{runs}: {run.turns} turns, p50 "
        f"{fmt(run.p50)} s, p95 {fmt(run.p95)} s, greeting p95 {fmt(run.greeting_p95)} s, "
        f"a reply every {fmt(run.turn_interval_s, '.1f')} s per call, "
        f"{run.failed + run.dropped} failed/dropped ({run.wall_s:.0f} s)"
        + (f"; event loop busy {run.loop_busy:.0%}" if run.loop_busy is not None else "")
        + _outside_text(run)
    )


def _outside_text(run: RunFigures) -> str:
    if run.outside_cores is None:
        return ""
    return (
        f"; outside the benchmark {fmt(run.outside_cores)} cores, steal {fmt(run.steal_cores)}"
        + (disturbed_note(run) or "")
    )


# Other processes using more than this much CPU during a run make its figures suspect.
OUTSIDE_WARN_CORES = 0.1


def taken_cores(run: RunFigures) -> float:
    """Cores that went elsewhere during the run (other processes, other guests), to the
    two decimals they are shown with, so a run listed as over the threshold shows it."""
    return round((run.outside_cores or 0.0) + (run.steal_cores or 0.0), 2)


def disturbed_note(run: RunFigures) -> str | None:
    """A warning when something besides the benchmark took CPU during the run."""
    taken = taken_cores(run)
    if taken <= OUTSIDE_WARN_CORES:
        return None
    return (
        f"\n  ! {taken:.2f} cores went to other processes or guests during this run: "
        "its figures are not this code's alone"
    )


def format_server_turns(summary: dict | None) -> str | None:
    """The server's own account of its turns: where the reply time went, and verdicts."""
    if not summary:
        return None
    stages = " · ".join(
        f"{STAGES[name]} {fmt(fig['p50'])}/{fmt(fig['p95'])}"
        for name, fig in summary["stages"].items()
        if fig["n"]
    )
    verdicts = ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())
    rules = ", ".join(f"{k} {v}" for k, v in summary["rules"].items())
    return f"     server p50/p95 s: {stages}\n     verdicts: {verdicts}; rules: {rules}"


def print_header(note: str = "") -> None:
    print(f"\n== load steps {note}".rstrip(), flush=True)
    print(HEADER, flush=True)


def format_budget(step: StepResult, cores: int) -> str | None:
    """The machine's CPU per call-minute, split; the cores used; the calls at this cost."""
    budget = MachineBudget.of(step)
    if budget is None:
        return None
    return (
        f"     machine CPU s/call-min: server {budget.server:.2f} + callers "
        f"{budget.load_generator:.2f} + AI emulator {fmt(budget.ai_services)} = "
        f"{budget.total:.2f}; all three used {fmt(budget.cores_used)} of {cores} cores; "
        f"at this cost {cores} cores would carry ~{budget.calls_at_this_cost(cores)} calls"
    )


def print_row(step: StepResult, cores: int | None = None) -> None:
    print(format_row(step), flush=True)
    for line in (
        format_server_turns(step.server_turns),
        format_budget(step, cores or os.cpu_count() or 1),
    ):
        if line:
            print(line, flush=True)
    for error in step.errors:
        print(f"     ! {error}", flush=True)


LEGEND = f"""\
burst: N calls start within a second, each a ~25 s scripted conversation (figures over the
whole run). steady: Poisson arrivals keeping ~N calls up ('up': the mean measured), calls
of 100-140 s with a caller turn every 6-10 s; turns, greetings and CPU count only inside
the measured window after the seed; failed/dropped count every call of the run.
p50/p95: end of caller speech -> first bot audio the caller hears, pooled over every turn
of every run ('(runs)': lowest-highest of the runs' own p95; '>{SLOW_TURN_S:g}s': share of
turns slower than that; 'key p95' for replies to DTMF). greet: stream start -> first bot
audio. underrun: share of the bot's speaking time the caller's playout buffer sat empty
waiting for late audio. CPU s/call-min and RSS are the server's processes only (its
workers included); MB/call = (peak - idle) / N. gen lag: the load generator's event-loop
lag p99/max (high lag inflates latency and underrun). 'server': stages of the server's
turn-timing log lines (seconds after the caller's speech ended). 'machine': CPU seconds
per call-minute of the server, the load generator and the AI services, which share this
machine's cores (the callers and the AI emulator exist only in the benchmark), the cores
all three used, and about how many calls the cores would carry, every core busy, if each
call-minute cost what it did at that step (it costs less as N grows)."""


def ratio(ours: float | None, base: float | None) -> str:
    if ours is None or base is None or base == 0:
        return "–"
    return f"{ours / base:.2f}x"


def ratio_rows(ours: Sequence[StepResult], baseline: Sequence[StepResult]) -> list[dict]:
    """ours / baseline at every pattern and N both ran (below 1.0: ours is lower/better)."""
    by_n = {(step.pattern, step.n): step for step in baseline}
    rows = []
    for step in ours:
        base = by_n.get((step.pattern, step.n))
        if base is None:
            continue
        rows.append(
            {
                "pattern": step.pattern,
                "n": step.n,
                "p50": ratio(step.p50, base.p50),
                "p95": ratio(step.p95, base.p95),
                "greeting_p95": ratio(step.greeting_p95, base.greeting_p95),
                "cpu_per_call_min": ratio(step.cpu_per_call_min, base.cpu_per_call_min),
                "rss_per_call": ratio(step.rss_per_call_mb, base.rss_per_call_mb),
                "underrun": ratio(step.underrun_share, base.underrun_share),
            }
        )
    return rows


def print_ratios(rows: Sequence[dict]) -> None:
    if not rows:
        return
    print("\n== ours / baseline (instant services)")
    print(
        f"{'pattern':<7} {'N':>4} {'p50':>7} {'p95':>7} {'greet p95':>9} {'CPU/call-min':>12} "
        f"{'RSS/call':>9} {'underrun':>9}"
    )
    for row in rows:
        print(
            f"{row['pattern']:<7} {row['n']:>4} {row['p50']:>7} {row['p95']:>7} "
            f"{row['greeting_p95']:>9} {row['cpu_per_call_min']:>12} {row['rss_per_call']:>9} "
            f"{row['underrun']:>9}"
        )


# Issue 10: writing call records must not cost the calls: p95 reply and CPU per call-minute
# with records on within this share of the same figures with CALL_RECORDS=false.
RECORDS_TOLERANCE = 0.05


def records_targets(on: Sequence[StepResult], off: Sequence[StepResult]) -> list[dict]:
    """Records on vs off at every pattern and N both ran: p95 and CPU per call-minute
    within 5 %."""
    by_n = {(step.pattern, step.n): step for step in off}
    targets = []
    for step in on:
        base = by_n.get((step.pattern, step.n))
        if base is None:
            continue
        for label, mine, theirs in (
            ("p95 reply", step.p95, base.p95),
            ("CPU per call-minute", step.cpu_per_call_min, base.cpu_per_call_min),
        ):
            met = None if not mine or not theirs else mine <= theirs * (1 + RECORDS_TOLERANCE)
            targets.append(
                {
                    "target": f"{label} at {step.pattern} N = {step.n} with records <= "
                    f"{1 + RECORDS_TOLERANCE:g}x records off",
                    "met": met,
                    "detail": f"{fmt(mine)} on vs {fmt(theirs)} off ({ratio(mine, theirs)})",
                }
            )
    return targets


MARKS = {True: "met", False: "MISSED", None: "n/a"}


def print_targets(targets: Sequence[dict]) -> None:
    print("\n== targets (ours, instant services)", flush=True)
    for target in targets:
        print(f"  [{MARKS[target['met']]:>6}] {target['target']}: {target['detail']}")


# ------------------------------------------------------------------ files


def write_json(path: Path, series: dict[str, list[StepResult]], extra: dict) -> Path:
    data = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
        "series": {name: [asdict(step) for step in steps] for name, steps in series.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


STYLES = {"ours-instant": "-o", "baseline-instant": "--s", "ours-offline": ":^"}
PATTERN_STYLES = {
    "ours-instant burst": "-o",
    "ours-instant steady": "-D",
    "baseline-instant burst": "--s",
    "baseline-instant steady": "--v",
}


def by_pattern(name: str, steps: Sequence[StepResult]) -> dict[str, list[StepResult]]:
    """A series' steps per arrival pattern, labelled "name pattern" (just "name" when the
    series ran one pattern only)."""
    groups: dict[str, list[StepResult]] = {}
    for step in steps:
        groups.setdefault(step.pattern, []).append(step)
    if len(groups) == 1:
        return {name: list(steps)}
    return {f"{name} {pattern}": group for pattern, group in groups.items()}


def write_plot(
    path: Path,
    series: dict[str, list[StepResult]],
    note: str | None = None,
    p95_limit: float | None = None,
) -> Path | None:
    """Latency against N (p50, p95 with the runs' spread), CPU, and each step's CDF; `note`
    (e.g. `--processes`' held calls and Redis round-trips) as the figure's title, and a
    target p95 line when there is one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r bench/requirements.txt): no plot")
        return None
    figure, (latency, cpu, cdf) = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, steps in series.items():
        for label, pattern_steps in by_pattern(name, steps).items():
            style = STYLES.get(name, "-") if label == name else PATTERN_STYLES.get(label, "-")
            color = _plot_series(latency, cpu, label, pattern_steps, style)
            _plot_cdf(cdf, label, pattern_steps, color)
    latency.set(
        xlabel="concurrent calls (N)",
        ylabel="reply latency (s)",
        title="End of caller speech → first bot audio\n(bars: lowest–highest run)",
    )
    cpu.set(
        xlabel="concurrent calls (N)",
        ylabel="server CPU s per call-minute",
        title="Server CPU per call-minute",
    )
    cdf.set(
        xlabel="reply latency (s)",
        ylabel="share of turns answered",
        title="Per-turn latency distribution (CDF per N)",
        xlim=(0, 4),
        ylim=(0, 1.02),
    )
    cdf.axvline(SLOW_TURN_S, color="grey", linestyle=":", linewidth=1)
    if p95_limit is not None:
        latency.axhline(p95_limit, color="red", linestyle="--", linewidth=1, label="target p95")
    if note:
        figure.suptitle(note, fontsize=9)
    ticks = sorted({step.n for steps in series.values() for step in steps})
    for axis in (latency, cpu):
        axis.set_xscale("symlog", linthresh=10)
        axis.set_xticks(ticks, [str(n) for n in ticks])
        axis.set_ylim(bottom=0)
    for axis in (latency, cpu, cdf):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_series(latency, cpu, name: str, steps: Sequence[StepResult], style: str) -> str:
    """p95 with its run spread as error bars, p50 fainter, CPU; returns the line colour."""
    ns = [step.n for step in steps]
    p95 = [step.p95 for step in steps]
    low = [_gap(step.p95, step.p95_spread, "min") for step in steps]
    high = [_gap(step.p95, step.p95_spread, "max") for step in steps]
    bars = latency.errorbar(ns, p95, yerr=[low, high], fmt=style, capsize=3, label=f"{name} p95")
    color = bars.lines[0].get_color()
    latency.plot(ns, [s.p50 for s in steps], style, alpha=0.45, color=color, label=f"{name} p50")
    cpu.plot(ns, [step.cpu_per_call_min for step in steps], style, color=color, label=name)
    for step in steps:
        if step.broken and step.p95 is not None:
            latency.annotate(
                f"{step.failed + step.dropped} failed",
                (step.n, step.p95),
                xytext=(-48, -3),
                textcoords="offset points",
                fontsize=7,
                color="red",
            )
    return color


def _gap(value: float | None, spread_: dict | None, side: str) -> float:
    """Error-bar length from the pooled figure to the runs' lowest / highest (never < 0)."""
    if value is None or not spread_:
        return 0.0
    return max(0.0, value - spread_["min"]) if side == "min" else max(0.0, spread_["max"] - value)


def _plot_cdf(axis, name: str, steps: Sequence[StepResult], color: str) -> None:
    """One step-curve per N: darker for larger N, the series' own colour."""
    for k, step in enumerate(steps):
        if not step.latencies:
            continue
        count = len(step.latencies)
        shares = [0.0] + [(i + 1) / count for i in range(count)]  # from 0 at the fastest
        alpha = 0.35 + 0.65 * (k + 1) / len(steps)
        axis.step(
            [step.latencies[0], *step.latencies],
            shares,
            where="post",
            color=color,
            alpha=alpha,
            label=f"{name} N = {step.n}",
        )
