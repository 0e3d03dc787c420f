"""Figures for one load step, the printed tables, the ours/baseline ratios, JSON and plot.

Latency percentiles are over every answered turn of every call at that N (replies to
caller speech; replies to DTMF keys are kept apart, as the baseline doesn't answer keys).
Pacing counts, inside each bot reply as the caller's playout buffer heard it, the silence
spent waiting for late audio (`underrun`, as a share of the bot's speaking time) and the
chunks that came after the buffer had run dry (`late`).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from load_calls import CallSummary, WorkerReport

# Issue 5's targets, checked on our server with the instant services.
TARGET_CALLS = 100
TARGET_P95_FACTOR = 1.5
TARGET_UNDERRUN = 0.01
TARGET_RSS_PER_CALL_MB = 25.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class StepResult:
    """Everything measured at one N for one server."""

    series: str
    n: int
    wall_s: float
    calls_ok: int = 0
    failed: int = 0
    dropped: int = 0
    turns: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    key_turns: int = 0
    key_p50: float | None = None
    key_p95: float | None = None
    underrun_share: float = 0.0
    late_chunks: int = 0
    bot_chunks: int = 0
    long_gaps: int = 0
    clears: int = 0
    call_minutes: float = 0.0
    cpu_s: float = 0.0
    cpu_per_call_min: float | None = None
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_per_call_mb: float | None = None
    rss_slope_mb: float | None = None
    loadgen_cpu_per_call_min: float | None = None
    loadgen_lag_p99_ms: float | None = None
    loadgen_lag_max_ms: float | None = None
    ai_api_cpu_per_call_min: float | None = None  # the instant services' own process
    errors: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return self.failed > 0 or self.dropped > 0


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


def step_result(
    series: str,
    n: int,
    wall_s: float,
    reports: Sequence[WorkerReport],
    cpu_s: float,
    rss_idle_mb: float,
    rss_peak_mb: float,
    previous: StepResult | None,
) -> StepResult:
    """Combine the workers' call summaries and the server's /proc readings for one step."""
    calls = [call for report in reports for call in report.calls]
    speech = [lat for call in calls for lat in call.speech_latencies]
    keyed = [lat for call in calls for lat in call.key_latencies]
    share, late, chunks, long_gaps = pacing(calls)
    call_minutes = sum(call.duration for call in calls) / 60
    lags = [lag for report in reports for lag in report.lags]
    loadgen_cpu = sum(report.cpu_s for report in reports)
    result = StepResult(
        series=series,
        n=n,
        wall_s=wall_s,
        calls_ok=sum(not (c.failed or c.dropped) for c in calls),
        failed=sum(c.failed for c in calls),
        dropped=sum(c.dropped for c in calls),
        turns=len(speech),
        p50=percentile(speech, 50),
        p95=percentile(speech, 95),
        p99=percentile(speech, 99),
        key_turns=len(keyed),
        key_p50=percentile(keyed, 50),
        key_p95=percentile(keyed, 95),
        underrun_share=share,
        late_chunks=late,
        bot_chunks=chunks,
        long_gaps=long_gaps,
        clears=sum(c.clears for c in calls),
        call_minutes=call_minutes,
        cpu_s=cpu_s,
        cpu_per_call_min=cpu_s / call_minutes if call_minutes else None,
        rss_idle_mb=rss_idle_mb,
        rss_peak_mb=rss_peak_mb,
        rss_per_call_mb=(rss_peak_mb - rss_idle_mb) / n,
        loadgen_cpu_per_call_min=loadgen_cpu / call_minutes if call_minutes else None,
        loadgen_lag_p99_ms=_ms(percentile(lags, 99)),
        loadgen_lag_max_ms=_ms(max(lags, default=None)),
        errors=distinct_errors(calls),
    )
    if previous is not None and n > previous.n:
        result.rss_slope_mb = (rss_peak_mb - previous.rss_peak_mb) / (n - previous.n)
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ------------------------------------------------------------------ printing


def _f(value: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


HEADER = (
    f"{'N':>4} {'ok':>4} {'fail':>4} {'drop':>4} {'turns':>5} "
    f"{'p50 s':>6} {'p95 s':>6} {'p99 s':>6} {'key p95':>7} "
    f"{'underrun':>8} {'late':>5} {'CPU s/call-min':>14} "
    f"{'RSS MB':>7} {'MB/call':>7} {'slope':>6} {'gen CPU':>7} {'gen lag':>7}"
)


def format_row(step: StepResult) -> str:
    return (
        f"{step.n:>4} {step.calls_ok:>4} {step.failed:>4} {step.dropped:>4} {step.turns:>5} "
        f"{_f(step.p50):>6} {_f(step.p95):>6} {_f(step.p99):>6} {_f(step.key_p95):>7} "
        f"{_f(step.underrun_share, '.2%'):>8} {step.late_chunks:>5} "
        f"{_f(step.cpu_per_call_min):>14} {step.rss_peak_mb:>7.0f} "
        f"{_f(step.rss_per_call_mb, '.1f'):>7} {_f(step.rss_slope_mb, '.1f'):>6} "
        f"{_f(step.loadgen_cpu_per_call_min):>7} {_f(step.loadgen_lag_p99_ms, '.0f'):>5}ms"
    )


def print_header(series: str, note: str = "") -> None:
    print(f"\n== {series} {note}".rstrip(), flush=True)
    print(HEADER, flush=True)


def print_row(step: StepResult) -> None:
    print(format_row(step), flush=True)
    for error in step.errors:
        print(f"     ! {error}", flush=True)


LEGEND = """\
latency: end of caller speech -> first bot audio the caller hears (p50/p95/p99 over all
turns; 'key p95' for replies to DTMF). underrun: share of the bot's speaking time the
caller's playout buffer sat empty waiting for late audio; late: chunks that came after it
ran dry. CPU s/call-min and RSS are the server process only; MB/call = (peak - idle) / N,
slope = MB per call added since the previous N. gen CPU / gen lag: the load generator's own
CPU s per call-minute and event-loop lag p99 (high lag inflates latency and underrun)."""


def ratio(ours: float | None, base: float | None) -> str:
    if ours is None or base is None or base == 0:
        return "–"
    return f"{ours / base:.2f}x"


def ratio_rows(ours: Sequence[StepResult], baseline: Sequence[StepResult]) -> list[dict]:
    """ours / baseline at every N both ran (below 1.0 means ours is lower/better)."""
    by_n = {step.n: step for step in baseline}
    rows = []
    for step in ours:
        base = by_n.get(step.n)
        if base is None:
            continue
        rows.append(
            {
                "n": step.n,
                "p50": ratio(step.p50, base.p50),
                "p95": ratio(step.p95, base.p95),
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
    print(f"{'N':>4} {'p50':>7} {'p95':>7} {'CPU/call-min':>12} {'RSS/call':>9} {'underrun':>9}")
    for row in rows:
        print(
            f"{row['n']:>4} {row['p50']:>7} {row['p95']:>7} {row['cpu_per_call_min']:>12} "
            f"{row['rss_per_call']:>9} {row['underrun']:>9}"
        )


def check_targets(steps: Sequence[StepResult]) -> list[dict]:
    """Issue 5's targets for our server with the instant services, each met or not."""
    by_n = {step.n: step for step in steps}
    one, target = by_n.get(1), by_n.get(TARGET_CALLS)
    if target is None:
        # The series stopped (broke) below the target, or --max-calls kept it from running.
        reached = max(by_n, default=0)
        detail = f"not reached: the series stopped at N = {reached}"
        return [{"target": f"{TARGET_CALLS} concurrent calls", "met": False, "detail": detail}]
    p95_limit = None if one is None or one.p95 is None else one.p95 * TARGET_P95_FACTOR
    return [
        {
            "target": f"{TARGET_CALLS} calls held, none dropped or failed",
            "met": not target.broken,
            "detail": f"{target.calls_ok} ok, {target.failed} failed, {target.dropped} dropped",
        },
        {
            "target": f"p95 at {TARGET_CALLS} <= {TARGET_P95_FACTOR}x p95 at 1",
            "met": None if p95_limit is None or target.p95 is None else target.p95 <= p95_limit,
            "detail": f"{_f(target.p95)} s vs limit {_f(p95_limit)} s",
        },
        {
            "target": f"empty bot-speech slots <= {TARGET_UNDERRUN:.0%}",
            "met": target.underrun_share <= TARGET_UNDERRUN,
            "detail": f"{target.underrun_share:.2%}",
        },
        {
            "target": f"RSS per added call <= {TARGET_RSS_PER_CALL_MB:g} MB",
            "met": (target.rss_per_call_mb or 0) <= TARGET_RSS_PER_CALL_MB,
            "detail": f"{_f(target.rss_per_call_mb, '.1f')} MB",
        },
    ]


def print_targets(targets: Sequence[dict]) -> None:
    print("\n== targets (ours, instant services)")
    for target in targets:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[target["met"]]
        print(f"  [{mark}] {target['target']}: {target['detail']}")


# ------------------------------------------------------------------ files


def write_json(path: Path, series: dict[str, list[StepResult]], extra: dict) -> Path:
    data = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **extra,
        "series": {name: [asdict(step) for step in steps] for name, steps in series.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


STYLES = {"ours-instant": "-o", "baseline-instant": "--s", "ours-offline": ":^"}


def write_plot(path: Path, series: dict[str, list[StepResult]]) -> Path | None:
    """Latency p50/p95 and CPU per call-minute against N, one line per server and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r bench/requirements.txt): no plot")
        return None
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, steps in series.items():
        if not steps:
            continue
        style = STYLES.get(name, "-")
        ns = [step.n for step in steps]
        (line,) = latency.plot(ns, [step.p95 for step in steps], style, label=f"{name} p95")
        latency.plot(
            ns,
            [step.p50 for step in steps],
            style,
            alpha=0.45,
            color=line.get_color(),
            label=f"{name} p50",
        )
        cpu.plot(ns, [step.cpu_per_call_min for step in steps], style, label=name)
        for step in steps:
            if step.broken and step.p95 is not None:
                label = f"{step.failed + step.dropped} failed"
                latency.annotate(
                    label,
                    (step.n, step.p95),
                    xytext=(-48, -3),
                    textcoords="offset points",
                    fontsize=7,
                    color="red",
                )
    latency.set(
        xlabel="concurrent calls (N)",
        ylabel="response latency (s)",
        title="End of caller speech → first bot audio",
    )
    cpu.set(
        xlabel="concurrent calls (N)",
        ylabel="server CPU s per call-minute",
        title="Server CPU per call-minute",
    )
    ticks = sorted({step.n for steps in series.values() for step in steps})
    for axis in (latency, cpu):
        axis.set_xscale("symlog", linthresh=10)
        axis.set_xticks(ticks, [str(n) for n in ticks])
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
