"""The load generator: emulated dial-in calls, each a realistic conversation.

Every call rings the server's voice webhook (`dial_in`) and plays a script through
`MediaStreamCaller`. A burst's calls (`burst_plan`) are short conversations: wait for the
greeting, speak, wait for the answer, then one of three endings (plain question, DTMF keys
then a question, or a barge-in over the bot's answer) and hang up while the bot is
talking. A steady run's calls (`steady_script`) last as long as planned, with a caller turn
every 6–10 s. Caller speech is WAV files made once with the project's espeak voice
(`bench/audio/`).

Calls are split across worker processes (`run_calls`), each with its own event loop, so
the callers never compete with the measurement loop, and each reports a small picklable
`CallSummary` per call (not the call's audio) plus its own CPU use and event-loop lag: a
lagging caller would make the server look slow, so the lag is reported next to the results.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import wave
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.emulator import (
    CallResult,
    Dtmf,
    EmulatorError,
    Hangup,
    Pause,
    Speak,
    Step,
    WaitForBot,
    dial_in,
)
from phonebot.emulator.media_stream import speech_frames
from phonebot.emulator.result import total_seconds

AUDIO_DIR = Path(__file__).resolve().parent / "audio"
# What the caller says: ordinary support phrases, so the offline mode hears real speech;
# none of them is "goodbye" (that would let the bot end the call).
PHRASES = {
    "order": "my order has not arrived",
    "hours": "what are your opening hours",
    "barge": "wait I have a question",
}
KINDS = ("plain", "dtmf", "plain", "barge")  # call i plays KINDS[i % 4]
REPLY_TIMEOUT_S = 15.0  # no bot audio this long after the caller's turn: the call failed
CALL_TIMEOUT_S = 120.0  # a scripted (burst) call; a planned one gets its length + this
BURST_S = 1.0  # a burst's N calls all start within one second
TURN_MIN_S, TURN_MAX_S = 6.0, 10.0  # a steady call's caller turns: one every 6-10 s
FIRST_TURN_S = (0.5, 2.0)  # after the greeting, the caller answers within this
NO_REPLY = "no reply to the caller's speech"  # a call whose every bot turn has no latency
LAG_INTERVAL_S = 0.05


# ------------------------------------------------------------------ conversation


def write_mono_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)


def ensure_caller_audio(directory: Path = AUDIO_DIR) -> dict[str, Path]:
    """The caller's phrases as 8 kHz WAVs, spoken by espeak-ng the first time only."""
    paths = {}
    for key, text in PHRASES.items():
        path = directory / f"{key}.wav"
        if not path.exists():
            from phonebot.ai.offline.espeak import synthesize_at

            write_mono_wav(path, synthesize_at(text, TWILIO_SAMPLE_RATE), TWILIO_SAMPLE_RATE)
        paths[key] = path
    return paths


@lru_cache(maxsize=1)
def caller_audio() -> dict[str, Speak]:
    """Load the phrases once per process and pre-cut them into frames (see `speech_frames`)."""
    audio = {key: Speak.from_wav(path, PHRASES[key]) for key, path in ensure_caller_audio().items()}
    for speak in audio.values():
        speech_frames(speak.pcm, speak.sample_rate)
    return audio


def wait_reply(
    until: str = "done", require: bool = True, timeout: float = REPLY_TIMEOUT_S
) -> WaitForBot:
    """Wait for the bot: `done` = it spoke then went quiet, `speech` = it started."""
    return WaitForBot(timeout=timeout, until=until, quiet=0.6, max_wait=15.0, require=require)


def conversation(kind: str, audio: dict[str, Speak]) -> list[Step]:
    """About 20–25 s: greeting, a question, then a `kind` ending; hang up mid-answer.

    `warmup` is the short call made before measuring: greeting, one question, hang up.
    `short` and `short-drop` are the soak's calls (bench/soak.py), ~5 s: the caller talks
    over the greeting, hears the answer start and hangs up mid-answer, with Twilio's
    `stop` message or (`short-drop`) by just dropping the socket.
    """
    if kind == "warmup":
        return [wait_reply(), audio["order"], wait_reply("speech"), Pause(1.0), Hangup()]
    if kind in ("short", "short-drop"):
        hangup = Hangup(send_stop=kind == "short")
        speak = [wait_reply("speech"), Pause(1.0), audio["order"], wait_reply("speech")]
        return [*speak, Pause(0.5), hangup]
    steps: list[Step] = [wait_reply(), audio["order"], wait_reply(), Pause(0.5)]
    if kind == "dtmf":
        # A server that ignores keys (the baseline) gets 5 s, then the call goes on.
        steps += [Dtmf("1#"), wait_reply("speech", require=False, timeout=5.0), Pause(1.5)]
    steps += [audio["hours"], wait_reply("speech")]
    if kind == "barge":
        steps += [Pause(1.0), audio["barge"], wait_reply("speech", require=False)]
    return [*steps, Pause(2.0), Hangup()]


class TurnPacer:
    """Keeps a caller's turns `period` seconds apart from start to start, however long the
    bot took to answer: the pause after a reply is what is left of the period (none if the
    reply ran over). `clock` is the call's own clock (`MediaStreamCaller.now`)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.turn_start: float | None = None

    def rest(self, period: float) -> float:
        """Seconds to stay quiet now so the next turn starts `period` after this one did."""
        now = self.clock()
        start = now if self.turn_start is None else self.turn_start
        seconds = max(0.0, start + period - now)
        self.turn_start = now + seconds
        return seconds


class RestOfTurn(Pause):
    """A `Pause` whose length is decided when the caller reaches it (`TurnPacer.rest`):
    the emulator reads `seconds` as the step starts, so the pause fills the turn's period."""

    def __init__(self, pacer: TurnPacer, period: float) -> None:  # noqa: D107
        object.__setattr__(self, "pacer", pacer)
        object.__setattr__(self, "period", period)
        object.__setattr__(self, "_seconds", None)

    @property
    def seconds(self) -> float:  # type: ignore[override]
        if self._seconds is None:
            object.__setattr__(self, "_seconds", self.pacer.rest(self.period))
        return self._seconds

    def __repr__(self) -> str:
        return f"RestOfTurn(period={self.period:.2f})"


def steady_script(
    length_s: float, rng: random.Random, pacer: TurnPacer, audio: dict[str, Speak]
) -> list[Step]:
    """A steady run's call: the greeting, then a turn every 6–10 s (a phrase, the whole
    reply, the rest of the period quiet) until `length_s`, where the caller is cut off by
    the call's `max_duration` (the script itself is long enough never to end first)."""
    steps: list[Step] = [wait_reply(), RestOfTurn(pacer, rng.uniform(*FIRST_TURN_S))]
    for _ in range(math.ceil(length_s / TURN_MIN_S) + 1):
        phrase = audio[rng.choice(("order", "hours"))]
        steps += [phrase, wait_reply(), RestOfTurn(pacer, rng.uniform(TURN_MIN_S, TURN_MAX_S))]
    return [*steps, Hangup()]


# ------------------------------------------------------------------ one call


@dataclass(frozen=True)
class PlannedCall:
    """One call of a run: when it rings (seconds after the run's start), how long it stays
    up (None: until its scripted conversation ends), which script it plays (`conversation`'s
    kinds, or "steady" for `steady_script`)."""

    index: int
    start_s: float
    length_s: float | None
    kind: str
    seeded: bool = False  # part of a steady run's initial population (load_patterns)


def burst_plan(n: int, within_s: float = BURST_S) -> list[PlannedCall]:
    """N scripted conversations starting evenly within `within_s`, call i playing
    KINDS[i % 4]: what a campaign dialling ten calls a second sends at once."""
    step = within_s / n if n > 1 else 0.0
    return [PlannedCall(i, i * step, None, KINDS[i % len(KINDS)]) for i in range(n)]


@dataclass
class CallSummary:
    """What the report needs from one call (small and picklable, unlike `CallResult`)."""

    index: int
    kind: str
    speech_latencies: list[float] = field(default_factory=list)
    key_latencies: list[float] = field(default_factory=list)
    # When each reply's bot audio started (call clock, seconds since `start`), in step with
    # the latencies above; `started_at` is the call's t = 0 on the wall clock (None: the
    # stream never started). A steady run keeps only what fell in its window (load_patterns).
    speech_at: list[float] = field(default_factory=list)
    key_at: list[float] = field(default_factory=list)
    started_at: float | None = None
    greeting: float | None = None  # stream `start` -> first bot audio (seconds)
    duration: float = 0.0
    bot_audio: float = 0.0
    # The server's late bot audio: the caller's own stalls (the load generator starved on
    # the same machine) are left out, and their length kept in `own_stall_s`.
    bot_underrun: float = 0.0
    own_stall_s: float = 0.0
    bot_chunks: int = 0
    late_chunks: int = 0
    long_gaps: int = 0
    clears: int = 0
    failed: bool = False
    dropped: bool = False
    error: str | None = None


Reply = tuple[float, float]  # (when the bot's audio started, latency), seconds


def split_replies(result: CallResult) -> tuple[list[Reply], list[Reply]]:
    """Replies after caller speech, and after DTMF keys (the baseline has none)."""
    keys = [t for t, _ in result.dtmf]
    speech, keyed = [], []
    for utterance in result.bot_utterances:
        if utterance.latency is None:
            continue
        reference = utterance.start - utterance.latency
        after_key = any(abs(reference - t) < 0.03 for t in keys)
        (keyed if after_key else speech).append((utterance.start, utterance.latency))
    return speech, keyed


def split_latencies(result: CallResult) -> tuple[list[float], list[float]]:
    """Reply latencies after caller speech, and after DTMF keys."""
    speech, keyed = split_replies(result)
    return [lat for _, lat in speech], [lat for _, lat in keyed]


def greeting_latency(result: CallResult) -> float | None:
    """Stream `start` -> the greeting's first audio: the first bot utterance that is no
    reply (latency None) and began before the caller's first speech or key (None if the
    bot said nothing before the caller did)."""
    caller = [start for start, _ in result.caller_segments] + [t for t, _ in result.dtmf]
    first_caller = min(caller, default=math.inf)
    for utterance in result.bot_utterances:
        if utterance.start >= first_caller:
            return None
        if utterance.latency is None:
            return utterance.start
    return None


def summarize(index: int, kind: str, result: CallResult) -> CallSummary:
    """Failed: an error, or (a scripted call) no answered turn; a steady call cut off by its
    planned end before its first turn is not a failure. Dropped: the server closed the
    stream first."""
    speech, keyed = split_replies(result)
    dropped = result.close is not None and result.close.by == "server"
    unanswered = not speech and kind != "steady"
    return CallSummary(
        index=index,
        kind=kind,
        speech_latencies=[lat for _, lat in speech],
        key_latencies=[lat for _, lat in keyed],
        speech_at=[at for at, _ in speech],
        key_at=[at for at, _ in keyed],
        started_at=result.started_at or None,
        greeting=greeting_latency(result),
        duration=result.duration,
        bot_audio=result.bot_audio_received,
        bot_underrun=total_seconds(result.server_underruns()),
        own_stall_s=total_seconds(result.caller_stalls),
        bot_chunks=result.bot_chunks,
        late_chunks=result.late_bot_chunks,
        long_gaps=result.bot_long_gaps,
        clears=len(result.clears),
        failed=not dropped and (result.error is not None or unanswered),
        dropped=dropped,
        error=result.error or (NO_REPLY if unanswered else None),
    )


async def run_call(
    url: str,
    index: int,
    kind: str,
    delay: float,
    query: dict,
    length_s: float | None = None,
    seed: int = 0,
) -> CallSummary:
    """Ring `url` after `delay` seconds and play the `kind` conversation; a "steady" call
    plays `steady_script` (its turns drawn from `seed` and `index`) and hangs up after
    `length_s` seconds of stream."""
    await asyncio.sleep(delay)
    caller = None
    timeout = CALL_TIMEOUT_S if length_s is None else length_s + CALL_TIMEOUT_S
    try:
        call = await dial_in(url, query=query, timeout=30.0)
        caller = call.caller(connect_timeout=30.0)
        if kind == "steady":
            assert length_s is not None, "a steady call needs its planned length"
            rng = random.Random(f"{seed}:{index}")
            script = steady_script(length_s, rng, TurnPacer(lambda: caller.now), caller_audio())
        else:
            script = conversation(kind, caller_audio())
        running = caller.run(script, max_duration=length_s, check=False)
        result = await asyncio.wait_for(running, timeout)
        return summarize(index, kind, result)
    except TimeoutError:
        message = f"call did not finish in {timeout:g} s"
    except EmulatorError as error:  # webhook refused, busy, no stream
        message = str(error)
    except Exception as error:  # one broken call must not take the other calls down
        message = f"{type(error).__name__}: {error}"
    summary = summarize(index, kind, caller.result) if caller else CallSummary(index, kind)
    summary.failed, summary.dropped, summary.error = True, False, message
    return summary


# ------------------------------------------------------------------ workers


@dataclass
class WorkerReport:
    """One worker process's calls, its CPU seconds and its event loop's lag (seconds).

    `window_cpu_s`: its CPU inside a steady run's measured window, where the server's CPU
    and the call-minutes are counted too (`cpu_s` also holds the seed before it and the
    calls running on after it).
    """

    calls: list[CallSummary]
    cpu_s: float
    lags: list[float]
    window_cpu_s: float | None = None


async def watch_lag(lags: list[float], stop: asyncio.Event) -> None:
    """How late the loop wakes for a 50 ms sleep: the callers' own scheduling delay."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(LAG_INTERVAL_S)
        lags.append(loop.time() - before - LAG_INTERVAL_S)


async def cpu_over(
    window: tuple[float, float],
    *,
    clock: Callable[[], float] = time.time,
    cpu: Callable[[], float] = time.process_time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> float:
    """This process's CPU seconds between two wall-clock moments (a steady run's window)."""
    await sleep(max(0.0, window[0] - clock()))
    start = cpu()
    await sleep(max(0.0, window[1] - clock()))
    return cpu() - start


@dataclass(frozen=True)
class WorkerShare:
    """One worker process's part of a run: its calls, the moment t0 (wall clock) their
    start times count from, and a steady run's measured window (seconds after t0)."""

    url: str
    calls: Sequence[PlannedCall]
    query: dict
    t0: float
    seed: int
    window_s: tuple[float, float] | None = None


async def _worker(share: WorkerShare) -> WorkerReport:
    caller_audio()  # before the start moment, so no call pays for loading audio
    lags: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_lag(lags, stop))
    t0, window_s = share.t0, share.window_s
    in_window = (
        asyncio.create_task(cpu_over((t0 + window_s[0], t0 + window_s[1])))
        if window_s is not None
        else None
    )
    cpu = time.process_time()
    base = t0 - time.time()
    tasks = [
        run_call(share.url, c.index, c.kind, max(0.0, base + c.start_s), share.query,
                 c.length_s, share.seed)
        for c in share.calls
    ]  # fmt: skip
    summaries = await asyncio.gather(*tasks)
    stop.set()
    await watcher
    window_cpu = await in_window if in_window is not None else None
    return WorkerReport(list(summaries), time.process_time() - cpu, lags, window_cpu)


def worker_main(share: WorkerShare) -> WorkerReport:
    """Entry point of one worker process: run its share of the calls."""
    return asyncio.run(_worker(share))


def start_calls(
    url: str,
    plan: Sequence[PlannedCall],
    workers: int,
    query: dict,
    seed: int = 0,
    lead_s: float = 1.0,
    window_s: tuple[float, float] | None = None,
) -> tuple[ProcessPoolExecutor, list, float]:
    """Fork `workers` processes sharing the planned calls round-robin; returns the pool,
    the futures and t0, the wall-clock moment the plan's times count from.

    t0 is `lead_s` from now, so forking the workers doesn't skew the start times.
    `window_s`: a steady run's measured window, in seconds after t0.
    """
    shares = [list(plan[w::workers]) for w in range(workers) if plan[w::workers]]
    pool = ProcessPoolExecutor(len(shares), mp_context=get_context("fork"))
    t0 = time.time() + lead_s
    futures = [
        pool.submit(worker_main, WorkerShare(url, share, query, t0, seed, window_s))
        for share in shares
    ]
    return pool, futures, t0


def start_workers(
    url: str, n: int, workers: int, query: dict, within_s: float = BURST_S
) -> tuple[ProcessPoolExecutor, list]:
    """A burst of N scripted calls (`burst_plan`) on `workers` processes: pool, futures."""
    pool, futures, _ = start_calls(url, burst_plan(n, within_s), workers, query)
    return pool, futures
