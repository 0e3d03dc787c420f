"""The soak benchmark's instruments (phonebot.ops.diagnostics) and its verdict (bench/soak.py).

What the soak's figures rest on: a reading inside the server counts the asyncio tasks and
names the allocation sites that grew, SIGUSR1 asks for one, the setting is off by
default, and the verdict compares the end of a run with the end of its warm-up. One slow
test runs the real thing for 40 calls and checks its outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from loguru import logger

from phonebot.emulator import Hangup, Speak
from phonebot.ops.diagnostics import (
    ResourceMonitor,
    parse_resource_usage,
    resource_usage_log,
)
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import load_calls  # noqa: E402
import soak  # noqa: E402

KEPT: list[bytearray] = []  # what the tracemalloc test "leaks" on purpose


async def idle_forever() -> None:
    await asyncio.Event().wait()


# ------------------------------------------------------------------ the server's readings


async def test_a_reading_counts_tasks_fds_threads_and_names_the_coroutines() -> None:
    monitor = ResourceMonitor()
    before = await monitor.reading()
    tasks = [asyncio.create_task(idle_forever()) for _ in range(3)]
    try:
        reading = await monitor.reading()
    finally:
        for task in tasks:
            task.cancel()
    assert reading["tasks"] == before["tasks"] + 3
    assert reading["task_kinds"]["idle_forever"] == 3
    assert "reading" not in str(reading["task_kinds"])  # the reading doesn't count itself
    assert reading["fds"] > 0 and reading["threads"] >= 1 and reading["rss_mb"] > 10
    assert reading["gc_objects"] > 1000 and reading["reading"] == 1
    if sys.platform == "linux":  # glibc's mallinfo2
        assert reading["malloc_used_mb"] > 0 and reading["malloc_free_mb"] >= 0
    assert "traced_mb" not in reading  # no tracing unless asked


class ClosesItselfLater:
    """Like the OpenAI SDK's httpx client: its finalizer schedules an async close."""

    def __init__(self) -> None:
        self.cycle = self  # only the cyclic collector frees it

    def __del__(self) -> None:
        asyncio.get_running_loop().create_task(finalizer_close())


async def finalizer_close() -> None:
    await asyncio.sleep(0)


async def test_tasks_scheduled_by_finalizers_are_not_counted_as_live() -> None:
    gc.collect()
    ClosesItselfLater()
    reading = await ResourceMonitor().reading()  # its gc.collect() runs the finalizer
    assert "finalizer_close" not in reading["task_kinds"]


def grow(kilobytes: int) -> None:
    KEPT.extend(bytearray(1024) for _ in range(kilobytes))  # the line tracemalloc names


async def test_tracemalloc_names_the_site_that_grew_between_readings() -> None:
    assert not tracemalloc.is_tracing()
    monitor = ResourceMonitor(tracemalloc_frames=1)
    monitor.start()
    try:
        first = await monitor.reading()
        grow(2000)
        second = await monitor.reading()
    finally:
        monitor.stop()
        KEPT.clear()
    assert first["growth"] == [] and second["traced_mb"] > 1.5
    top = second["growth"][0]
    assert top["site"].startswith("tests/test_soak_bench.py:") and top["kb"] > 1900
    assert not tracemalloc.is_tracing()


async def test_sigusr1_logs_a_reading_when_the_setting_is_on(restore_logging) -> None:
    lines: list[str] = []
    logger.remove()
    logger.add(lambda message: lines.append(str(message)), level="INFO")
    settings = make_settings(log_resource_usage=True, log_resource_usage_every_s=0)
    async with resource_usage_log(settings) as monitor:
        assert monitor is not None
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if monitor.readings == 2:
                break
    readings = [r for line in lines if (r := parse_resource_usage(line)) is not None]
    assert [r["reading"] for r in readings] == [0, 1]  # at start, then the signal's
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handed back on exit


async def test_the_timer_logs_readings_and_the_default_is_off(restore_logging) -> None:
    assert make_settings().log_resource_usage is False
    async with resource_usage_log(make_settings()) as monitor:
        assert monitor is None
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # not taken when off
    settings = make_settings(log_resource_usage=True, log_resource_usage_every_s=0.05)
    async with resource_usage_log(settings) as monitor:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if monitor.readings >= 3:
                break
    assert monitor.readings >= 3


def test_the_reading_line_is_read_back() -> None:
    line = (
        "2026-11-25 17:00:00.000 | INFO     | phonebot.ops.diagnostics:log_reading:170 - "
        'Resource usage {"reading":4,"rss_mb":312.5,"fds":13,"tasks":3}'
    )
    assert parse_resource_usage(line) == {"reading": 4, "rss_mb": 312.5, "fds": 13, "tasks": 3}
    assert parse_resource_usage("Resource usage {not json") is None
    assert parse_resource_usage("GET /health 200") is None


# ------------------------------------------------------------------ the soak's verdict


def reading(calls: int, rss: float, fds: int = 13, threads: int = 10, tasks=3, **extra):
    return soak.Reading(calls // 20, calls, 0, calls / 4, rss, fds, threads, tasks, **extra)


def flat_run(**last) -> list[soak.Reading]:
    readings = [reading(0, 180.0)] + [reading(c, 310.0 + c / 1000) for c in range(20, 401, 20)]
    for name, value in last.items():
        for r in readings[-3:]:
            setattr(r, name, value)
    return readings


def test_the_verdict_compares_the_end_with_the_end_of_the_warm_up() -> None:
    result = soak.verdict(flat_run(), warmup_calls=40)
    assert result["met"] and result["warmup_calls"] == 40 and result["calls"] == 400
    rss = result["checks"][0]
    assert rss["warmup"] == pytest.approx(310.04) and rss["end"] == pytest.approx(310.38)
    assert result["rss_mb_per_1000_calls"] == pytest.approx(1.0, abs=0.01)
    # the jump from 180 MB (no call yet) to 310 MB is the warm-up, not creep
    grown = soak.verdict(flat_run(rss_mb=330.0), warmup_calls=40)
    assert not grown["met"] and grown["checks"][0]["met"] is False  # +6.4 %
    assert soak.verdict(flat_run(rss_mb=325.0), warmup_calls=40)["met"]  # +4.8 %
    for name in ("fds", "threads", "tasks"):
        checks = soak.verdict(flat_run(**{name: 50}), warmup_calls=40)["checks"]
        assert next(c for c in checks if c["figure"] == name)["met"] is False
    # a task that exists only while calls are live comes and goes: not growth
    flickering = flat_run()
    for k, r in enumerate(flickering):
        r.tasks = 5 + k % 2
    assert soak.verdict(flickering, warmup_calls=40)["checks"][3]["met"]
    unread = soak.verdict(flat_run(tasks=None), warmup_calls=40)
    assert unread["met"] and unread["checks"][3]["met"] is None  # not measured, not met
    assert not soak.verdict(flat_run()[:2], warmup_calls=40)["measured"]


def test_growing_sites_are_ranked_by_how_often_they_grew() -> None:
    readings = flat_run()
    for r in readings[3:]:
        r.growth = [{"site": "phonebot/x.py:10", "kb": 5.0, "count": 3}]
    readings[5].growth.append({"site": "pipecat/y.py:20", "kb": 400.0, "count": 1})
    (steady, once) = soak.persistent_growth(readings, warmup_calls=40)
    assert steady["site"] == "phonebot/x.py:10" and steady["batches"] == len(readings) - 3
    assert steady["of_batches"] == len(readings) - 3  # every batch after the 40th call
    assert once == {"site": "pipecat/y.py:20", "batches": 1, "of_batches": 18, "kb": 400.0}


def test_outputs_hold_every_reading_the_curve_and_the_verdict(tmp_path: Path) -> None:
    readings = flat_run()
    readings[-1].growth = [{"site": "phonebot/x.py:10", "kb": 5.0, "count": 3}]
    result = soak.verdict(readings, 40)
    args = soak.parse_args(["--calls", "400", "--markdown", "x.md"])
    extra = {
        "machine": {"cpu_model": "CPU", "cores": 2, "python": "3.11", "pipecat": "1.14"}
        | {"command": ".venv/bin/python bench/soak.py --calls 400", "load_average_start": None},
        "args": soak.args_record(args) | {"warmup_calls": 40},
        "duration_s": 100.0,
        "verdict": result,
        "persistent_growth": soak.persistent_growth(readings, 40),
    }
    data = json.loads(soak.write_json(tmp_path / "soak.json", readings, extra).read_text())
    assert len(data["readings"]) == 21 and data["verdict"]["met"]
    assert set(data["readings"][-1]) >= {"calls", "rss_mb", "fds", "threads", "tasks", "growth"}
    text = soak.render_markdown(readings, result, extra)
    assert "Generated by bench/soak.py --markdown" in text
    assert ".venv/bin/python bench/soak.py --calls 400" in text
    assert "| 400 | 0 | 310.4 | – / – | 13 | 10 | 3 |" in text  # the last one is always shown
    assert "**met**: RSS growth after the warm-up <= 5%" in text
    assert "`phonebot/x.py:10`" in text
    pytest.importorskip("matplotlib")
    assert soak.write_plot(tmp_path / "soak.png", readings, 40).stat().st_size > 10_000


def test_plans_and_short_calls() -> None:
    default = soak.parse_args([])
    assert (default.calls, default.batch, default.warmup_calls) == (2000, 20, 200)
    assert default.tracemalloc_frames == 0  # tracing slows the server: diagnosis only
    quick = soak.parse_args(["--quick"])
    assert (quick.calls, quick.warmup_calls) == (40, 20)
    with pytest.raises(SystemExit):
        soak.parse_args(["--calls", "0"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--server-env", "MALLOC_ARENA_MAX"])
    env = soak.server_env("http://127.0.0.1:1/v1", 0, {"MALLOC_ARENA_MAX": "2"})
    assert env["LOG_RESOURCE_USAGE"] == "true" and env["LOG_RESOURCE_USAGE_EVERY_S"] == "0"
    assert env["MALLOC_ARENA_MAX"] == "2" and env["TRACEMALLOC_FRAMES"] == "0"
    speak = {key: Speak.tone(0.5) for key in load_calls.PHRASES}
    stop, drop = (load_calls.conversation(k, speak)[-1] for k in soak.SHORT_CALLS)
    assert stop == Hangup(send_stop=True) and drop == Hangup(send_stop=False)


def test_a_call_without_a_measurable_reply_still_counts_as_made() -> None:
    """Latency is not what a soak measures: only errors and dropped calls fail it."""
    summary = load_calls.CallSummary
    assert not soak.call_failed(summary(0, "short", speech_latencies=[0.5]))
    assert not soak.call_failed(summary(1, "short", failed=True, error=load_calls.NO_REPLY))
    no_audio = summary(2, "short", failed=True, error="no audio from the bot within 15 s")
    assert soak.call_failed(no_audio)
    assert soak.call_failed(summary(3, "short-drop", dropped=True))


# ------------------------------------------------------------------ the real thing


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_quick_soak_writes_its_curve_from_a_real_server(tmp_path: Path) -> None:
    """40 calls through server.py: every reading has the server's own task count (the
    lifespan runs phonebot.ops.diagnostics), and the outputs are written."""
    markdown = tmp_path / "soak.md"
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick"]
    command += ["--out", str(tmp_path), "--markdown", str(markdown)]
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((tmp_path / "soak.json").read_text())
    calls = [r["calls"] for r in data["readings"]]
    assert calls == [0, 1, 21, 40]  # idle, the first call alone, then batches of 20
    for r in data["readings"]:
        assert r["rss_mb"] > 50 and r["fds"] > 0 and r["threads"] > 0
        assert isinstance(r["tasks"], int) and r["task_kinds"]  # read inside the server
    assert data["verdict"]["measured"] and data["verdict"]["warmup_calls"] == 21
    assert (tmp_path / "soak.png").exists() or "matplotlib" in done.stdout
    with contextlib.suppress(FileNotFoundError):
        assert "| 40 |" in markdown.read_text()
