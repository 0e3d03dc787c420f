"""The load benchmark's measuring parts (bench/load*.py is run by hand, not in CI).

What is checked here is what its figures rest on: the emulated phone's playout pacing
(late audio inside a bot reply, not between turns), the caller's precomputed frames being
byte-for-byte what per-frame encoding sent, and the arithmetic of the reported figures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from phonebot import audio
from phonebot.emulator import (
    CallResult,
    CloseInfo,
    Dtmf,
    Hangup,
    MediaStreamCaller,
    Speak,
    Utterance,
    WaitForBot,
    parse_twiml,
)
from phonebot.emulator.media_stream import speech_frames
from phonebot.emulator.timeline import Playback, Track

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import load_calls  # noqa: E402
import load_report  # noqa: E402
import load_server  # noqa: E402

CHUNK = 320  # 40 ms at 8 kHz: what Pipecat's output transport sends per message


# ------------------------------------------------------------------ pacing


def test_playback_counts_late_audio_only_inside_a_reply() -> None:
    playback = Playback(Track(), max_gap=8000)
    chunk = np.full(CHUNK, 3000, dtype=np.int16)
    playback.enqueue(0, chunk)  # a reply starts into an empty buffer: not late
    playback.enqueue(CHUNK, chunk)  # just in time
    playback.enqueue(2 * CHUNK + 80, chunk)  # 10 ms after the buffer ran dry
    assert (playback.late_chunks, playback.underrun) == (1, 80)

    playback.end_reply()  # the caller spoke: the bot's next chunk opens a new reply
    playback.enqueue(20_000, chunk)
    playback.enqueue(20_000 + CHUNK + 160, chunk)  # 20 ms late
    assert (playback.late_chunks, playback.underrun) == (2, 240)

    playback.clear(20_000 + 2 * CHUNK)  # barge-in: what follows is a new reply too
    playback.enqueue(30_000, chunk)
    playback.enqueue(30_000 + CHUNK + 9000, chunk)  # > max_gap: a new bot turn, not a stall
    assert (playback.late_chunks, playback.underrun, playback.long_gaps) == (2, 240, 1)
    assert playback.chunks == 7


@asynccontextmanager
async def ws_server(handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"


async def paced_reply(ws: ServerConnection, sid: str, chunks: int, stall_after: int = -1) -> None:
    """`chunks` × 40 ms of tone in real time, like Pipecat; one 200 ms stall if asked."""
    payload = base64.b64encode(audio.pcm16_to_ulaw(audio.tone(300.0, 0.04))).decode()
    message = json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})
    loop = asyncio.get_running_loop()
    due = loop.time()
    for index in range(chunks):
        await ws.send(message)
        due += 0.04 + (0.2 if index == stall_after else 0.0)
        await asyncio.sleep(max(0.0, due - loop.time()))


@pytest.mark.asyncio
async def test_a_stall_mid_reply_is_underrun_and_the_turn_gap_is_not() -> None:
    async def bot(ws: ServerConnection) -> None:
        json.loads(await ws.recv())
        sid = json.loads(await ws.recv())["streamSid"]
        await paced_reply(ws, sid, 20, stall_after=9)
        spoke, quiet = False, 0
        async for message in ws:
            data = json.loads(message)
            if data["event"] != "media":
                continue
            pcm = audio.ulaw_to_pcm16(base64.b64decode(data["media"]["payload"]))
            if not audio.is_silent(pcm):
                spoke, quiet = True, 0
            elif spoke and (quiet := quiet + 1) == 5:
                spoke = False
                await paced_reply(ws, sid, 10)

    script = [
        WaitForBot(timeout=3, quiet=0.3),
        Speak.tone(0.3),
        WaitForBot(timeout=3, quiet=0.3),
    ]
    async with ws_server(bot) as url:
        result = await MediaStreamCaller(url).run(script)
    assert result.bot_chunks == 30 and result.bot_long_gaps == 0
    assert result.late_bot_chunks >= 1
    # The 0.2 s stall, plus whatever scheduling jitter this machine adds; not the ~1 s the
    # caller spent talking between the two replies.
    assert 0.18 <= result.bot_underrun <= 0.4
    assert result.bot_underrun_share == pytest.approx(
        result.bot_underrun / (result.bot_audio_received + result.bot_underrun)
    )


# ------------------------------------------------------------------ caller frames


def test_speech_frames_are_what_encoding_each_frame_would_send() -> None:
    pcm = audio.tone(440.0, 0.05)  # 400 samples: 3 frames, the last one padded
    frames = speech_frames(pcm, 8000)
    samples = audio.pcm16_to_array(pcm)
    assert len(frames.payloads) == len(frames.levels) == len(frames.samples) == 3
    for k in range(3):
        frame = np.zeros(160, dtype=np.int16)
        part = samples[k * 160 : (k + 1) * 160]
        frame[: len(part)] = part
        expected = base64.b64encode(audio.ulaw_encode(frame).tobytes()).decode()
        assert frames.payloads[k] == expected
        assert frames.levels[k] == pytest.approx(audio.rms(frame))
        assert np.array_equal(frames.samples[k], frame)
    assert frames.duration == pytest.approx(0.05)
    assert speech_frames(pcm, 8000) is frames  # shared by every call that says it
    wideband = speech_frames(audio.tone(440.0, 0.1, 16000), 16000)
    assert len(wideband.payloads) == 5  # resampled to 8 kHz first


def test_media_message_is_exactly_the_json_of_twilios_shape() -> None:
    caller = MediaStreamCaller("ws://127.0.0.1:1/ws", stream_sid='MZ"odd\\sid')
    caller._frames_sent, caller._seq = 7, 11
    text = caller._media_message("//79")
    assert text == json.dumps(
        {
            "event": "media",
            "sequenceNumber": "12",
            "media": {"track": "inbound", "chunk": "8", "timestamp": "140", "payload": "//79"},
            "streamSid": 'MZ"odd\\sid',
        }
    )


# ------------------------------------------------------------------ figures


def test_percentile_matches_numpy() -> None:
    values = [0.9, 0.2, 0.5, 1.7, 0.4, 0.45, 3.0]
    for q in (50, 95, 99):
        assert load_report.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert load_report.percentile([], 50) is None


def utterance(index: int, start: float, latency: float | None) -> Utterance:
    return Utterance(index=index, start=start, end=start + 1.0, latency=latency, pcm=b"")


def call_result(**fields) -> CallResult:
    result = CallResult(
        url="ws://x", call_sid="CA1", account_sid="AC1", stream_sid="MZ1", parameters={}
    )
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def test_replies_to_keys_are_told_apart_from_replies_to_speech() -> None:
    result = call_result(
        bot_utterances=[
            utterance(0, 0.5, None),  # greeting
            utterance(1, 4.0, 0.6),  # after speech ending at 3.4
            utterance(2, 9.0, 0.8),  # after the key pressed at 8.2
        ],
        dtmf=[(8.2, "1")],
        duration=12.0,
    )
    assert load_calls.split_latencies(result) == ([0.6], [0.8])
    summary = load_calls.summarize(3, "dtmf", result)
    assert not summary.failed and not summary.dropped and summary.error is None


def test_failed_and_dropped_calls_are_classified() -> None:
    replied = [utterance(0, 0.5, None), utterance(1, 4.0, 0.6)]
    dropped = call_result(
        bot_utterances=replied, close=CloseInfo(6.0, "server", 1011, ""), error="closed"
    )
    assert load_calls.summarize(0, "plain", dropped).dropped
    assert not load_calls.summarize(0, "plain", dropped).failed
    errored = call_result(bot_utterances=replied, error="no audio from the bot within 15 s")
    assert load_calls.summarize(0, "plain", errored).failed
    unanswered = call_result(bot_utterances=replied[:1])  # greeting only, no error raised
    summary = load_calls.summarize(0, "plain", unanswered)
    assert summary.failed and summary.error == "no reply to the caller's speech"


def summary(index: int, latencies: list[float], **fields) -> load_calls.CallSummary:
    values = {"duration": 30.0, "bot_audio": 9.0, "bot_chunks": 225, **fields}
    return load_calls.CallSummary(index, "plain", speech_latencies=latencies, **values)


def test_step_figures_combine_workers_and_server_readings() -> None:
    reports = [
        load_calls.WorkerReport(
            [summary(0, [0.4, 0.5]), summary(2, [0.6], bot_underrun=1.0, late_chunks=4)],
            cpu_s=1.5,
            lags=[0.001, 0.002],
        ),
        load_calls.WorkerReport(
            [summary(1, [], failed=True, error="boom"), summary(3, [0.7], dropped=True)],
            cpu_s=0.5,
            lags=[0.004],
        ),
    ]
    previous = load_report.StepResult("ours", 2, 30.0, rss_peak_mb=250.0)
    step = load_report.step_result("ours", 4, 31.0, reports, 12.0, 200.0, 300.0, previous)
    assert (step.calls_ok, step.failed, step.dropped, step.turns) == (2, 1, 1, 4)
    assert step.p50 == pytest.approx(0.55) and step.broken
    assert step.call_minutes == pytest.approx(2.0)
    assert step.cpu_per_call_min == pytest.approx(6.0)
    assert step.loadgen_cpu_per_call_min == pytest.approx(1.0)
    assert step.rss_per_call_mb == pytest.approx(25.0)  # (300 - 200) / 4
    assert step.rss_slope_mb == pytest.approx(25.0)  # (300 - 250) / (4 - 2)
    assert step.underrun_share == pytest.approx(1.0 / 37.0) and step.late_chunks == 4
    assert step.errors == ["boom"]


def test_targets_and_ratios() -> None:
    one = load_report.StepResult("ours", 1, 30.0, p95=0.5, rss_per_call_mb=20.0)
    hundred = load_report.StepResult(
        "ours", 100, 30.0, calls_ok=100, p95=0.7, underrun_share=0.004, rss_per_call_mb=12.0
    )
    met = [target["met"] for target in load_report.check_targets([one, hundred])]
    assert met == [True, True, True, True]
    hundred.p95, hundred.dropped = 0.8, 1
    assert [t["met"] for t in load_report.check_targets([one, hundred])][:2] == [False, False]
    missed = load_report.check_targets([one])[0]  # the series stopped before N = 100
    assert missed["met"] is False and "stopped at N = 1" in missed["detail"]
    base = load_report.StepResult("baseline", 1, 30.0, p50=0.5, p95=0.4, cpu_per_call_min=4.0)
    ours = load_report.StepResult("ours", 1, 30.0, p50=0.4, p95=0.5, cpu_per_call_min=2.0)
    (row,) = load_report.ratio_rows([ours], [base])
    assert (row["p50"], row["p95"], row["cpu_per_call_min"]) == ("0.80x", "1.25x", "0.50x")


def test_process_readings_come_from_proc_and_include_child_processes() -> None:
    before = load_server.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert load_server.cpu_seconds(os.getpid()) - before >= 0.05
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    before = load_server.cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", busy])
    assert child.pid in load_server.process_tree(os.getpid())
    child.wait()
    assert load_server.cpu_seconds(os.getpid()) - before >= 0.25  # the child's CPU counts
    assert 10 < load_server.rss_mb(os.getpid()) < 100_000


# ------------------------------------------------------------------ scripts, baseline


def test_conversations_vary_by_kind_and_end_by_hanging_up() -> None:
    speak = {key: Speak.tone(0.5) for key in load_calls.PHRASES}
    scripts = {kind: load_calls.conversation(kind, speak) for kind in set(load_calls.KINDS)}
    assert all(isinstance(script[-1], Hangup) for script in scripts.values())
    assert any(isinstance(step, Dtmf) for step in scripts["dtmf"])
    assert not any(isinstance(step, Dtmf) for step in scripts["plain"])
    speaking = {kind: sum(isinstance(s, Speak) for s in script) for kind, script in scripts.items()}
    assert speaking == {"plain": 2, "dtmf": 2, "barge": 3}
    assert load_calls.schedule(3, 1.5) == [(0, 0.0), (1, 0.75), (2, 1.5)]
    assert load_calls.schedule(1, 1.5) == [(0, 0.0)]


def test_baseline_answers_the_webhook_like_pipecats_runner() -> None:
    import baseline_server
    from fastapi.testclient import TestClient

    response = TestClient(baseline_server.app).post("/", data={"CallSid": "CA1"})
    assert response.status_code == 200
    assert parse_twiml(response.text).require_stream().url == "wss://testserver/ws"
