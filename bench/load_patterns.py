"""The load benchmark's two arrival patterns, its measuring window and its held-at-target rule.

- *burst*: N calls start within `load_calls.BURST_S` (a campaign dialling ten calls a second makes
  exactly these); each plays one of `load_calls`' short scripted conversations
  (`load_calls.burst_plan`).
- *steady*: Poisson arrivals at N / (mean call length) per second, calls of 100–140 s with a
  caller turn every 6–10 s, so about N calls are up at any moment. A population starting
  from zero would take two call lengths to settle, so the run is seeded instead: N calls
  start over the first `seed_s` seconds, each staying up into the window as long as a call
  already in progress would (the residual life of a steady population, see `residual_s`),
  and the Poisson arrivals run from the window's start. Only the window after the seed is
  measured; calls still up at its end are hung up.

Everything here is pure (no sockets, no processes): the schedule comes from a seeded
`random.Random`, so ours and the baseline see the same arrivals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from load_calls import CallSummary, PlannedCall

SEED_S = 20.0  # the seeded population's starts are spread over this long
STEADY_S = 120.0  # the measured window after the seed (load.py --steady-s)
CALL_MIN_S, CALL_MAX_S = 100.0, 140.0  # steady call lengths, uniform: ~2 minutes
SEED_MIN_LEFT_S = 10.0  # a seeded call stays up at least this long after it starts
REPLY_P95_FACTOR = 1.5  # held: p95 reply <= 1.5x the series' own 1-call p95 ...
GREETING_P95_LIMIT_S = 1.0  # ... and p95 greeting (stream start -> first bot audio) <= 1 s


@dataclass(frozen=True)
class SteadyPlan:
    """A steady run's shape: N calls up on average, the seed and the measured window."""

    calls: int
    seed_s: float = SEED_S
    window_s: float = STEADY_S
    min_length_s: float = CALL_MIN_S
    max_length_s: float = CALL_MAX_S

    @property
    def mean_length_s(self) -> float:
        return (self.min_length_s + self.max_length_s) / 2

    @property
    def rate_per_s(self) -> float:
        """Little's law: N calls up at once, each up `mean_length_s`, arrive at N / length."""
        return self.calls / self.mean_length_s

    @property
    def end_s(self) -> float:
        return self.seed_s + self.window_s


def residual_s(u: float, low: float, high: float) -> float:
    """How much longer a call already in progress lasts, at quantile `u` in [0, 1], in a
    steady population of calls whose lengths are uniform on [low, high]. Its density is
    P(length > r) / mean length: flat up to `low`, then falling linearly to 0 at `high`."""
    mean = (low + high) / 2
    if u * mean <= low:
        return u * mean
    span = high - low
    return high - math.sqrt(max(0.0, span * span - 2 * span * (u * mean - low)))


def steady_plan(plan: SteadyPlan, seed: int | str) -> list[PlannedCall]:
    """The seeded population, then Poisson arrivals (`arrivals`) from the window's start to
    its end; every call is cut there (the caller hangs up). Reproducible by `seed`.

    The N seeded calls start over the seed time and each stays up into the window for its
    residual life (`residual_s`), so exactly N calls are up when the window opens and the
    population leaves as a steady one would, while the arrivals replace it. The residuals
    are stratified (one per N-quantile), so the seed leaves at an even pace and the calls
    up vary only as much as the arrivals make them. A seeded call stays up at least
    `SEED_MIN_LEFT_S`.
    """
    rng = random.Random(seed)
    quantiles = [(k + rng.random()) / plan.calls for k in range(plan.calls)]
    calls = []
    for index, u in enumerate(quantiles):
        start = rng.uniform(0.0, plan.seed_s)
        residual = residual_s(u, plan.min_length_s, plan.max_length_s)
        end = min(max(start + SEED_MIN_LEFT_S, plan.seed_s + residual), plan.end_s)
        calls.append(PlannedCall(index, start, end - start, "steady", True))
    for t in arrivals(plan.rate_per_s, plan.seed_s, plan.end_s, rng):
        length = rng.uniform(plan.min_length_s, plan.max_length_s)
        calls.append(PlannedCall(len(calls), t, min(length, plan.end_s - t), "steady"))
    return calls


def arrivals(rate_per_s: float, start_s: float, end_s: float, rng: random.Random) -> list[float]:
    """Poisson arrivals over [start_s, end_s) given their expected count: that many times
    drawn uniformly, sorted (a Poisson process, conditioned on its count, is exactly that).

    Why conditioned: a free Poisson count over two minutes at 40 calls up varies by ±15 %,
    so one run "at N = 40" could hold 34 calls; the arrivals stay random in time (gaps
    exponential, clumps and lulls), only their number is the rate's.
    """
    count = round(rate_per_s * (end_s - start_s))
    return sorted(rng.uniform(start_s, end_s) for _ in range(count))


def calls_up(calls: Iterable[PlannedCall], at_s: float) -> int:
    """How many planned calls are up at `at_s` (for the schedule's own check)."""
    return sum(c.start_s <= at_s < c.start_s + (c.length_s or 0.0) for c in calls)


# ------------------------------------------------------------------ the measured window


def overlap_s(start: float, end: float, window: tuple[float, float]) -> float:
    """Seconds of [start, end] inside the window."""
    return max(0.0, min(end, window[1]) - max(start, window[0]))


def window_view(call: CallSummary, window: tuple[float, float]) -> CallSummary:
    """What of `call` happened inside the window (wall-clock seconds): the replies whose
    bot audio started in it, the greeting if it came in it, and the seconds the call was
    up in it as its duration (so call-minutes integrate over the window). Failed and
    dropped calls stay counted whenever they happened; pacing stays the whole call's."""
    if call.started_at is None:
        return replace(call, speech_latencies=[], speech_at=[], key_latencies=[], key_at=[],
                       greeting=None, duration=0.0)  # fmt: skip
    t0 = call.started_at

    def inside(at: float) -> bool:
        return window[0] <= t0 + at < window[1]

    speech = zip(call.speech_at, call.speech_latencies, strict=True)
    speech = [(at, lat) for at, lat in speech if inside(at)]
    keys = zip(call.key_at, call.key_latencies, strict=True)
    keys = [(at, lat) for at, lat in keys if inside(at)]
    greeting = call.greeting if call.greeting is not None and inside(call.greeting) else None
    return replace(
        call,
        speech_at=[at for at, _ in speech],
        speech_latencies=[lat for _, lat in speech],
        key_at=[at for at, _ in keys],
        key_latencies=[lat for _, lat in keys],
        greeting=greeting,
        duration=overlap_s(t0, t0 + call.duration, window),
    )


# ------------------------------------------------------------------ held at the target


class HeldFigures(Protocol):
    """What the held-at-target rule reads of a step (`load_report.StepResult` has it)."""

    n: int
    p95: float | None
    greeting_p95: float | None
    failed: int
    dropped: int


def target_miss(step: HeldFigures, reference_p95: float | None) -> str | None:
    """Why N calls were not held at the target, or None if they were: p95 reply <= 1.5x the
    series' own 1-call p95, p95 greeting <= 1 s (when any greeting was measured), no failed
    or dropped call."""
    if step.failed or step.dropped:
        return f"{step.failed} failed, {step.dropped} dropped"
    if reference_p95 is None:
        return "no 1-call p95 to compare with (N = 1 not measured)"
    limit = REPLY_P95_FACTOR * reference_p95
    if step.p95 is None or step.p95 > limit:
        p95 = "–" if step.p95 is None else f"{step.p95:.2f} s"
        return f"p95 reply {p95} > {limit:.2f} s"
    # No greeting at all is no miss: a short steady window at small N may see no arrival
    # (a call that never greeted failed, and failures are counted above).
    if step.greeting_p95 is not None and step.greeting_p95 > GREETING_P95_LIMIT_S:
        return f"p95 greeting {step.greeting_p95:.2f} s > {GREETING_P95_LIMIT_S:g} s"
    return None


@dataclass
class Held:
    """One series' and pattern's held calls: the largest N that met the target."""

    series: str
    pattern: str
    reference_p95: float | None
    held: int  # 0: none
    misses: dict[int, str]

    def describe(self) -> str:
        reference = "–" if self.reference_p95 is None else f"{self.reference_p95:.2f}"
        limit = (
            "–" if self.reference_p95 is None else f"{self.reference_p95 * REPLY_P95_FACTOR:.2f}"
        )
        misses = "; ".join(f"N = {n}: {why}" for n, why in sorted(self.misses.items()))
        return (
            f"{self.series} {self.pattern}: {self.held} calls held (1-call p95 {reference} s, "
            f"limit {limit} s)" + (f"; missed at {misses}" if misses else "")
        )


def held_at_target(series: str, pattern: str, steps: Sequence[HeldFigures]) -> Held:
    """The largest N at which the target held, against the 1-call step of the same list."""
    one = next((step for step in steps if step.n == 1), None)
    reference = one.p95 if one is not None else None
    misses = {step.n: why for step in steps if (why := target_miss(step, reference))}
    held = max((step.n for step in steps if step.n not in misses), default=0)
    return Held(series, pattern, reference, held, misses)


def issue_targets(
    held: Sequence[Held], steps: dict[tuple[str, str], Sequence[HeldFigures]], workers: int
) -> list[dict]:
    """Issue 20's targets: 40 calls in one process under both patterns; 80 calls on two
    worker processes (only when this run had two). Met when that N itself met the target."""
    n = 40 * workers if workers in (1, 2) else None
    if n is None:
        return []
    where = "1 process" if workers == 1 else f"{workers} worker processes"
    targets = []
    for one in held:
        if one.series != "ours-instant":
            continue
        step = next((s for s in steps[(one.series, one.pattern)] if s.n == n), None)
        miss = "not measured at this N" if step is None else one.misses.get(n)
        targets.append(
            {
                "target": f"{n} calls on {where}, {one.pattern}: p95 reply <= "
                f"{REPLY_P95_FACTOR:g}x the 1-call p95, p95 greeting <= "
                f"{GREETING_P95_LIMIT_S:g} s, none failed",
                "met": step is not None and miss is None,
                "detail": miss or _held_detail(step, one.reference_p95),
            }
        )
    return targets


def _held_detail(step: HeldFigures, reference: float | None) -> str:
    def seconds(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f} s"

    return (
        f"p95 reply {seconds(step.p95)} (1 call: {seconds(reference)}), "
        f"p95 greeting {seconds(step.greeting_p95)}"
    )


def mean_calls_up(call_minutes: float, window_s: float) -> float | None:
    """The average number of calls up over a window: call-seconds over its length."""
    return call_minutes * 60 / window_s if window_s > 0 and math.isfinite(window_s) else None
