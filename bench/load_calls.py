"""The load generator: N emulated dial-in calls, each a short realistic conversation.

Every call rings the server's voice webhook (`dial_in`) and plays a script through
`MediaStreamCaller`: wait for the greeting, speak, wait for the answer, then one of three
endings (plain question, DTMF keys then a question, or a barge-in over the bot's answer)
and hang up while the bot is talking. Caller speech is WAV files made once with the
project's offline TTS (`bench/audio/`).

Calls are split across worker processes (`run_calls`), each with its own event loop, so
the callers never compete with the measurement loop, and each reports a small picklable
`CallSummary` per call (not the call's audio) plus its own CPU use and event-loop lag: a
lagging caller would make the server look slow, so the lag is reported next to the results.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Sequence
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
CALL_TIMEOUT_S = 120.0
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


# ------------------------------------------------------------------ one call


@dataclass
class CallSummary:
    """What the report needs from one call (small and picklable, unlike `CallResult`)."""

    index: int
    kind: str
    speech_latencies: list[float] = field(default_factory=list)
    key_latencies: list[float] = field(default_factory=list)
    duration: float = 0.0
    bot_audio: float = 0.0
    bot_underrun: float = 0.0
    bot_chunks: int = 0
    late_chunks: int = 0
    long_gaps: int = 0
    clears: int = 0
    failed: bool = False
    dropped: bool = False
    error: str | None = None


def split_latencies(result: CallResult) -> tuple[list[float], list[float]]:
    """Reply latencies after caller speech, and after DTMF keys (the baseline has none)."""
    keys = [t for t, _ in result.dtmf]
    speech, keyed = [], []
    for utterance in result.bot_utterances:
        if utterance.latency is None:
            continue
        reference = utterance.start - utterance.latency
        after_key = any(abs(reference - t) < 0.03 for t in keys)
        (keyed if after_key else speech).append(utterance.latency)
    return speech, keyed


def summarize(index: int, kind: str, result: CallResult) -> CallSummary:
    """Failed: an error or no answered turn. Dropped: the server closed the stream first."""
    speech, keyed = split_latencies(result)
    dropped = result.close is not None and result.close.by == "server"
    return CallSummary(
        index=index,
        kind=kind,
        speech_latencies=speech,
        key_latencies=keyed,
        duration=result.duration,
        bot_audio=result.bot_audio_received,
        bot_underrun=result.bot_underrun,
        bot_chunks=result.bot_chunks,
        late_chunks=result.late_bot_chunks,
        long_gaps=result.bot_long_gaps,
        clears=len(result.clears),
        failed=not dropped and (result.error is not None or not speech),
        dropped=dropped,
        error=result.error or (None if speech else NO_REPLY),
    )


async def run_call(url: str, index: int, kind: str, delay: float, query: dict) -> CallSummary:
    """Ring `url` after `delay` seconds and play the `kind` conversation."""
    await asyncio.sleep(delay)
    caller = None
    try:
        call = await dial_in(url, query=query, timeout=30.0)
        caller = call.caller(connect_timeout=30.0)
        script = conversation(kind, caller_audio())
        result = await asyncio.wait_for(caller.run(script, check=False), CALL_TIMEOUT_S)
        return summarize(index, kind, result)
    except TimeoutError:
        message = f"call did not finish in {CALL_TIMEOUT_S:g} s"
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
    """One worker process's calls, its CPU seconds and its event loop's lag (seconds)."""

    calls: list[CallSummary]
    cpu_s: float
    lags: list[float]


async def watch_lag(lags: list[float], stop: asyncio.Event) -> None:
    """How late the loop wakes for a 50 ms sleep: the callers' own scheduling delay."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(LAG_INTERVAL_S)
        lags.append(loop.time() - before - LAG_INTERVAL_S)


async def _worker(url: str, calls: Sequence[tuple[int, float]], query: dict, t0: float):
    caller_audio()  # before the start moment, so no call pays for loading audio
    lags: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_lag(lags, stop))
    cpu = time.process_time()
    base = t0 - time.time()
    tasks = [
        run_call(url, index, KINDS[index % len(KINDS)], max(0.0, base + offset), query)
        for index, offset in calls
    ]
    summaries = await asyncio.gather(*tasks)
    stop.set()
    await watcher
    return WorkerReport(list(summaries), time.process_time() - cpu, lags)


def worker_main(url: str, calls: Sequence[tuple[int, float]], query: dict, t0: float):
    """Entry point of one worker process: run its share of the calls, starting at `t0`."""
    return asyncio.run(_worker(url, calls, query, t0))


def schedule(n: int, stagger_s: float) -> list[tuple[int, float]]:
    """(call index, start offset): starts spread evenly over `stagger_s`."""
    step = stagger_s / (n - 1) if n > 1 else 0.0
    return [(index, index * step) for index in range(n)]


def start_workers(
    url: str, n: int, workers: int, query: dict, stagger_s: float, lead_s: float = 1.0
) -> tuple[ProcessPoolExecutor, list]:
    """Fork `workers` processes sharing N calls round-robin; returns the pool and futures.

    All calls are scheduled against one wall-clock start `lead_s` from now, so forking the
    workers doesn't skew the stagger.
    """
    plan = schedule(n, stagger_s)
    shares = [plan[w::workers] for w in range(workers) if plan[w::workers]]
    pool = ProcessPoolExecutor(len(shares), mp_context=get_context("fork"))
    t0 = time.time() + lead_s
    futures = [pool.submit(worker_main, url, share, query, t0) for share in shares]
    return pool, futures
