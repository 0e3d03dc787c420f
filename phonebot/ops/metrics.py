"""Prometheus metrics: what a running server is doing, for dashboards, alerts and autoscaling.

`GET /metrics` (`phonebot.web.metrics`) answers in Prometheus' text format
(prometheus-client), from the app's `Metrics` (`exposition`). The series are
counts, never call content: no CallSid, number or transcript is ever a label, so the
number of series stays fixed however many calls go through (docs/observability.md lists
them).

One process: the series live in a registry owned by the app's `Metrics` object, not in
prometheus-client's global default registry, so tests (and anything else) that build
several apps in one interpreter never collide.

Several worker processes (`WORKERS` > 1): prometheus-client's multiprocess mode. Each
worker writes its values to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`, and
whichever worker answers a scrape sums (or, per gauge, takes the most recent of) every
worker's files, so a scrape of the shared port describes the whole machine rather than
the one worker that happened to answer. The parent (phonebot.web.workers) sets that folder
for the workers before they start (so prometheus-client, which picks its storage when
first imported, writes there), empties it at start so a restart doesn't add the last
run's counts, and drops an exited worker's live gauges (`mark_process_dead`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Reply latency (the caller's wait from the end of their speech to the reply's first audio,
# phonebot.call.turns): finest around the 0.3-1.5 s where a phone conversation feels natural
# or starts to drag; 3 s and more is a caller saying "hello?".
REPLY_LATENCY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
# Event-loop lag: every call's 20 ms audio pacing shares the loop, so 10 ms is noticeable
# and 100 ms is audible.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_INTERVAL_S = 0.5

# Where a call was turned away (the `stage` label) ...
WEBHOOK, STREAM, DIALOUT = "webhook", "stream", "dialout"
# ... and why (the `reason` label): a fixed set, whatever the refusal's wording.
CAPACITY = "capacity"  # MAX_CONCURRENT_CALLS across the cluster
PROCESS_CAPACITY = "process_capacity"  # MAX_CALLS_PER_PROCESS
DRAINING = "draining"  # shutting down
REPLAY = "replay"  # a webhook or a stream token already used
STATE_UNAVAILABLE = "state_unavailable"  # the shared state (Redis) can't be reached
RATE_LIMITED = "rate_limited"  # POST /dialout over its rate limit
INVALID_STREAM = "invalid_stream"  # a media stream whose handshake or token failed
OTHER = "other"
REASONS = (
    CAPACITY, PROCESS_CAPACITY, DRAINING, REPLAY, STATE_UNAVAILABLE, RATE_LIMITED,
    INVALID_STREAM, OTHER,
)  # fmt: skip

# Words in a refusal's text → its reason, most specific first. Admission says why in words
# for the caller's log line; the label needs a closed set (pinned by tests/test_metrics.py
# against every refusal the admission can give).
_REASON_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (STATE_UNAVAILABLE, ("state unavailable", "redis", "shared state", "unreachable")),
    (DRAINING, ("shutting down", "draining")),
    (REPLAY, ("already used", "already answered", "replay")),
    (PROCESS_CAPACITY, ("max_calls_per_process", "this process", "per process")),
    (CAPACITY, ("capacity", "max_concurrent_calls", "busy", "full")),
    (RATE_LIMITED, ("rate limit", "too many")),
)

PROVIDERS = ("stt", "llm", "tts")


def refusal_reason(refusal: str) -> str:
    """The `reason` label for a refusal: a known label as is, else read from its words."""
    if refusal in REASONS:
        return refusal
    text = refusal.lower()
    for reason, words in _REASON_WORDS:
        if any(word in text for word in words):
            return reason
    return OTHER


class AdmissionCounts(Protocol):
    live: int
    reserved: int


class Metrics:
    """The app's series, and the calls that move them (the app passes it to each call).

    With `PROMETHEUS_MULTIPROC_DIR` set (by the parent of several workers), prometheus-
    client's multiprocess mode; each gauge then says how the workers' values combine.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # Multiprocess: the series are registered nowhere; a scrape reads every worker's
        # files instead (exposition()).
        registry = self.registry = None if self.multiprocess_dir else CollectorRegistry()
        if registry is not None:
            ProcessCollector(registry=registry)  # RSS, CPU, open fds: one process's
        self.calls_live = Gauge(
            "phonebot_calls_live",
            "Calls running a pipeline in this process (the machine's, summed over workers)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.admission_live = Gauge(
            "phonebot_admission_calls_live",
            "Live calls as call admission counts them (cluster-wide with REDIS_URL), at scrape",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.admission_reserved = Gauge(
            "phonebot_admission_calls_reserved",
            "Webhooks answered whose stream has not connected yet (cluster-wide with "
            "REDIS_URL), at scrape",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.admitted = Counter(
            "phonebot_calls_admitted",
            "Calls let in: at the webhook (slot reserved) and at the stream (pipeline started)",
            ["stage"],
            registry=registry,
        )
        self.refused = Counter(
            "phonebot_calls_refused",
            "Calls and dial-outs turned away, by where and why",
            ["stage", "reason"],
            registry=registry,
        )
        self.reply_latency = Histogram(
            "phonebot_reply_latency_seconds",
            "The caller's wait from the end of their speech to the reply's first audio",
            buckets=REPLY_LATENCY_BUCKETS,
            registry=registry,
        )
        self.provider_errors = Counter(
            "phonebot_provider_errors",
            "Errors from the STT, LLM and TTS providers (every error, not only failed turns)",
            ["provider"],
            registry=registry,
        )
        self.state_errors = Counter(
            "phonebot_state_errors",
            "Requests that found the shared state (Redis) unreachable or too slow",
            registry=registry,
        )
        self.loop_lag = Histogram(
            "phonebot_event_loop_lag_seconds",
            f"How late the event loop woke a {LOOP_LAG_INTERVAL_S:g} s sleep",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self._zero_series()
        self._lag_task: asyncio.Task | None = None

    def _zero_series(self) -> None:
        """Every expected series from the start, at 0: a rate() needs the 0 before the 1."""
        for stage in (WEBHOOK, STREAM):
            self.admitted.labels(stage)
        for provider in PROVIDERS:
            self.provider_errors.labels(provider)

    # --- what the app and the calls report --------------------------------------------

    def call_admitted(self, stage: str = STREAM) -> None:
        self.admitted.labels(stage).inc()

    def call_refused(self, reason: str, stage: str = WEBHOOK) -> None:
        """A refused call; `reason` is a label or the refusal's text (see refusal_reason).

        The Redis error behind a "state_unavailable" refusal is counted where it happened
        (the state's `on_error` hook), not here.
        """
        self.refused.labels(stage, refusal_reason(reason)).inc()

    def call_started(self) -> None:
        self.calls_live.inc()

    def call_ended(self) -> None:
        self.calls_live.dec()

    def observe_reply_latency(self, seconds: float) -> None:
        self.reply_latency.observe(seconds)

    def provider_error(self, provider: str) -> None:
        self.provider_errors.labels(provider).inc()

    def state_error(self) -> None:
        self.state_errors.inc()

    def admission_counts(self, counts: AdmissionCounts) -> None:
        self.admission_live.set(counts.live)
        self.admission_reserved.set(counts.reserved)

    # --- exposition ----------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """What a scrape gets, and its content type: Prometheus text, or OpenMetrics when
        the scraper's Accept header asks for it. This registry, or every worker's files."""
        encode, content_type = choose_encoder(accept)
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return encode(registry), content_type

    # --- event-loop lag ----------------------------------------------------------------

    def start_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Measure the running loop's lag until `stop_loop_lag` (from the app's lifespan)."""
        if self._lag_task is None:
            monitor = LoopLagMonitor(self.loop_lag.observe, interval_s)
            self._lag_task = asyncio.create_task(monitor.run(), name="loop-lag")

    async def stop_loop_lag(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None


class LoopLagMonitor:
    """Sleeps `interval_s` again and again and reports how late each wake-up was.

    A loop busy with CPU work (VAD, resampling, a blocking call someone slipped in) wakes
    sleepers late; the same lateness delays every call's 20 ms audio frames. Costs one
    wake-up per interval.
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        interval_s: float = LOOP_LAG_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self._observe = observe
        self._interval_s = interval_s
        self._clock = clock

    async def run(self) -> None:
        while True:
            start = self._clock()
            await asyncio.sleep(self._interval_s)
            self._observe(max(0.0, self._clock() - start - self._interval_s))

