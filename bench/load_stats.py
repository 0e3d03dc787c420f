"""The load benchmark's statistics: percentiles, spread across runs, the stop rule, and the
server's per-turn timing lines.

Why a stop rule of its own: the first version stopped a series once p95 passed 3x its
1-call value. With ~20 turns per step, p95 is the second-slowest turn, so one slow turn
(a Smart Turn fallback, a scheduling hiccup on a shared machine) stopped all three series
at N = 10. The rule below looks at what one turn cannot move: the median, the share of
slow turns, failed calls and choppy audio, over every run of the step.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

SLOW_TURN_S = 1.5  # a reply later than this after the caller stops sounds like a dead line
HISTOGRAM_BIN_S = 0.1
HISTOGRAM_TOP_S = 4.0  # the last bin holds everything slower (Smart Turn's 3 s fallback fits)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """min / median / max of one figure across the runs of a step (None values skipped)."""
    known = [value for value in values if value is not None]
    if not known:
        return None
    return {"min": min(known), "median": statistics.median(known), "max": max(known)}


def slow_share(latencies: Sequence[float], limit: float = SLOW_TURN_S) -> float | None:
    """Share of turns whose reply came later than `limit` seconds; None without turns."""
    if not latencies:
        return None
    return sum(latency > limit for latency in latencies) / len(latencies)


def histogram(
    latencies: Sequence[float], bin_s: float = HISTOGRAM_BIN_S, top_s: float = HISTOGRAM_TOP_S
) -> dict[str, list]:
    """Counts per `bin_s` bin from 0 to `top_s`; the last bin counts everything above."""
    bins = round(top_s / bin_s)
    counts = [0] * (bins + 1)
    for latency in latencies:
        counts[min(bins, max(0, math.floor(latency / bin_s + 1e-9)))] += 1
    edges = [round(k * bin_s, 3) for k in range(bins + 1)]
    return {"bin_start_s": edges, "counts": counts}


# ------------------------------------------------------------------ stop rule


@dataclass(frozen=True)
class StopRule:
    """When a series stops growing N. Every figure is pooled over all runs of a step, and
    "N = 1" means the series' first step (N = 1 unless --steps says otherwise).

    - a failed or dropped call, in any run (or the server exited);
    - p50 above `p50_factor` x the N = 1 p50: the typical reply got slower;
    - the share of turns slower than `slow_turn_s` above the N = 1 share plus
      `slow_share_rise`, and at least `min_slow_turns` such turns: with ~60 turns at
      N = 10 one slow turn is < 2 points, so it cannot trip this alone;
    - underrun (the caller's playout buffer empty while the bot speaks) above
      `max_underrun` of the bot's speaking time: audibly choppy.

    p95 is reported with its spread but is not a stop criterion: with a few dozen turns it
    is one or two turns' worth of evidence.
    """

    p50_factor: float = 2.0
    slow_turn_s: float = SLOW_TURN_S
    slow_share_rise: float = 0.10
    min_slow_turns: int = 2
    max_underrun: float = 0.02

    def describe(self) -> str:
        return (
            f"a step stops its series on: any failed or dropped call; p50 > "
            f"{self.p50_factor:g}x the N = 1 p50; turns slower than {self.slow_turn_s:g} s "
            f"more than {self.slow_share_rise:.0%} points above the N = 1 share (and at "
            f"least {self.min_slow_turns}); underrun > {self.max_underrun:.0%} of bot speech. "
            "p95 is reported, not a criterion: one slow turn can move it."
        )

    def reason(self, step: StepFigures, first: StepFigures) -> str | None:
        """Why this step ends its series, or None to go on to the next N."""
        if step.failed or step.dropped:
            return f"{step.failed} failed and {step.dropped} dropped calls"
        if first.p50 and step.p50 and step.p50 > self.p50_factor * first.p50:
            return (
                f"p50 {step.p50:.2f} s > {self.p50_factor:g}x the N = {first.n} p50 "
                f"{first.p50:.2f} s"
            )
        share, base = step.slow_share or 0.0, first.slow_share or 0.0
        slow_turns = round(share * step.turns)
        if share > base + self.slow_share_rise and slow_turns >= self.min_slow_turns:
            return (
                f"{share:.0%} of turns over {self.slow_turn_s:g} s "
                f"({slow_turns} of {step.turns}; {base:.0%} at N = {first.n})"
            )
        if step.underrun_share > self.max_underrun:
            return f"underrun {step.underrun_share:.1%} > {self.max_underrun:.0%}"
        return None

    def as_dict(self) -> dict:
        return {**asdict(self), "text": self.describe()}


class StepFigures(Protocol):
    """The figures the stop rule reads (`load_report.StepResult` has them all)."""

    n: int
    turns: int
    p50: float | None
    slow_share: float | None
    underrun_share: float
    failed: int
    dropped: int


# ------------------------------------------------------------------ server turn timing

# The server's per-turn DEBUG line, `Call <CallSid> turn timing <compact JSON>`, parsed by
# `phonebot.call.turns.parse_turn_timing` (the server owns its format; the benchmark only reads).
TIMING_MARK = " turn timing {"
STAGES = {  # key in the line: label; seconds after the end of the caller's speech
    "vad_stop_s": "VAD stop",
    "transcript_s": "transcript",
    "turn_end_s": "turn end",
    "llm_first_token_s": "LLM first token",
    "tts_first_audio_s": "TTS first audio",
    "audio_out_s": "audio out",
}

Parser = Callable[[str], dict | None]


def server_parser() -> Parser:
    """The server's own parser, imported only when a log is read (bench runs without it)."""
    from phonebot.call.turns import parse_turn_timing

    return parse_turn_timing


def turn_timings(lines: Iterable[str], parse: Parser | None = None) -> list[dict]:
    """Every turn-timing record in a server log excerpt, in order."""
    candidates = [line for line in lines if TIMING_MARK in line]
    if not candidates:
        return []
    parse = parse or server_parser()
    return [record for line in candidates if (record := parse(line)) is not None]


def summarize_timings(records: Sequence[dict]) -> dict:
    """Per stage: turns measured, p50 and p95 (seconds); how the turns were ended (the turn
    model's verdict, the server's rule) as counts."""
    stages = {}
    for stage in STAGES:
        values = [r[stage] for r in records if _number(r.get(stage))]
        stages[stage] = {
            "n": len(values),
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
        }
    probabilities = [r["probability"] for r in records if _number(r.get("probability"))]
    inference = [r["inference_ms"] for r in records if _number(r.get("inference_ms"))]
    return {
        "turns": len(records),
        "stages": stages,
        "verdicts": _counts(r.get("verdict") for r in records),
        "rules": _counts(r.get("rule") for r in records),
        "probability_p50": percentile(probabilities, 50),
        "inference_ms_p95": percentile(inference, 95),
    }


def _counts(values: Iterable[object]) -> dict[str, int]:
    return dict(sorted(Counter(str(value) for value in values).items()))


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
