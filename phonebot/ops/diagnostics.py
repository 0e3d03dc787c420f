"""What a long-running server holds: a resource-usage log line for finding creep.

A server that handles thousands of calls must not grow with each one. The soak benchmark
(`bench/soak.py`) measures that from outside (RSS, open files, threads from /proc) but two
figures can only be read inside the process: how many asyncio tasks are alive, and which
lines of Python allocated the memory that stayed. With `LOG_RESOURCE_USAGE=true` the
server writes

    Resource usage {"rss_mb": 312.4, "fds": 41, "threads": 23, "tasks": 5, ...}

every `LOG_RESOURCE_USAGE_EVERY_S` seconds (0: never on a timer) and whenever it receives
SIGUSR1, so a benchmark can take a reading exactly between two batches of calls. With
`TRACEMALLOC_FRAMES` > 0 it also traces Python allocations and names the sites that grew
most since the previous line. Each reading runs a full garbage collection first (so garbage
waiting for the collector is not counted as kept), which pauses the event loop for tens of
milliseconds: off by default, and tracemalloc slows every allocation: soak tests only.

`parse_resource_usage` reads the line back; the line's format belongs to this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import re
import signal
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loguru import logger

from phonebot.config import Settings

MARKER = "Resource usage "
FINALIZER_WAIT_S = 0.05
TOP_SITES = 8  # allocation sites listed per reading, the largest growth first
PROC_SELF = Path("/proc/self")
PROJECT = Path(__file__).resolve().parents[2]
_LIBRARY = re.compile(r"(site-packages|lib/python3\.\d+)/")
# Allocations made by tracemalloc's own bookkeeping and by the import system would show as
# growth that is not the server's: left out of the comparison.
_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def _status_field(name: str) -> int | None:
    """One numeric field of /proc/self/status (Linux), e.g. VmRSS in kB; None elsewhere."""
    try:
        for line in (PROC_SELF / "status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_fds() -> int | None:
    """Open file descriptors (sockets, files, pipes) of this process; None off Linux."""
    try:
        return len(os.listdir(PROC_SELF / "fd"))
    except OSError:
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def malloc_figures() -> dict[str, float]:
    """glibc's heap (`mallinfo2`, all arenas): what C code and Python hold (`malloc_used_mb`,
    including mmapped blocks) and what malloc keeps free inside its arenas
    (`malloc_free_mb`). RSS that grows while `malloc_used_mb` stays flat is fragmentation or
    a new arena, not a leak. Empty off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    mb = 2**20
    return {
        "malloc_used_mb": round((info.uordblks + info.hblkhd) / mb, 1),
        "malloc_free_mb": round(info.fordblks / mb, 1),
    }


class ResourceMonitor:
    """Takes readings and keeps the previous tracemalloc snapshot to diff against.

    Owned by one app (created in its lifespan), not a module global: two apps in one
    test process each compare against their own previous reading.
    """

    def __init__(self, tracemalloc_frames: int = 0) -> None:
        self.frames = tracemalloc_frames
        self.readings = 0
        self._previous: tracemalloc.Snapshot | None = None
        self._started_tracing = False
        self.pending: set[asyncio.Task] = set()

    def start(self) -> None:
        if self.frames and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
            self._started_tracing = True

    def stop(self) -> None:
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False
        self._previous = None

    async def reading(self) -> dict[str, Any]:
        """RSS, open fds, threads, asyncio tasks, live objects, and (when tracing) the
        traced total and the allocation sites that grew since the previous reading.

        The collection runs finalizers, and some schedule work: the OpenAI SDK's httpx
        client closes itself from `__del__` with a new task. Those run before the count
        (`FINALIZER_WAIT_S`), so the reading doesn't count tasks it made itself.
        """
        began = time.perf_counter()
        gc.collect()
        await asyncio.sleep(FINALIZER_WAIT_S)
        rss_kb = _status_field("VmRSS")
        live = asyncio.all_tasks() - {asyncio.current_task()}
        reading: dict[str, Any] = {
            "reading": self.readings,
            "rss_mb": round(rss_kb / 1024, 1) if rss_kb is not None else None,
            "fds": open_fds(),
            "threads": _status_field("Threads"),  # OS threads: ONNX, thread pools, …
            "python_threads": threading.active_count(),
            "tasks": len(live),
            "task_kinds": task_kinds(live),
            "gc_objects": len(gc.get_objects()),
            **malloc_figures(),
        }
        if tracemalloc.is_tracing():
            reading.update(self._traced())
        reading["took_ms"] = round((time.perf_counter() - began) * 1000, 1)
        self.readings += 1
        return reading

    def _traced(self) -> dict[str, Any]:
        snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
        current, _peak = tracemalloc.get_traced_memory()
        figures: dict[str, Any] = {"traced_mb": round(current / 2**20, 2), "growth": []}
        if self._previous is not None:
            diffs = snapshot.compare_to(self._previous, "lineno")
            growing = [d for d in diffs if d.size_diff > 0][:TOP_SITES]
            figures["growth"] = [_site(diff) for diff in growing]
        self._previous = snapshot
        return figures


def _site(diff: tracemalloc.StatisticDiff) -> dict[str, Any]:
    frame = diff.traceback[0]
    return {
        "site": f"{_short(frame.filename)}:{frame.lineno}",
        "kb": round(diff.size_diff / 1024, 1),
        "count": diff.count_diff,
    }


def _short(filename: str) -> str:
    """pipecat/x.py or phonebot/x.py rather than the whole venv or checkout path."""
    if matches := list(_LIBRARY.finditer(filename)):
        return filename[matches[-1].end() :]
    with contextlib.suppress(ValueError):
        return str(Path(filename).relative_to(PROJECT))
    return filename


def task_kinds(tasks: set[asyncio.Task], top: int = TOP_SITES) -> dict[str, int]:
    """The most common coroutines among the live tasks: what a growing count is made of."""
    kinds = Counter(
        getattr(t.get_coro(), "__qualname__", type(t.get_coro()).__name__) for t in tasks
    )
    return dict(kinds.most_common(top))


async def log_reading(monitor: ResourceMonitor) -> dict[str, Any]:
    reading = await monitor.reading()
    logger.info(MARKER + json.dumps(reading, separators=(",", ":")))
    return reading


def parse_resource_usage(line: str) -> dict[str, Any] | None:
    """The reading in a `Resource usage {...}` log line; None for any other line."""
    at = line.find(MARKER + "{")
    if at < 0:
        return None
    try:
        reading = json.loads(line[at + len(MARKER) :])
    except ValueError:
        return None
    return reading if isinstance(reading, dict) else None


@contextlib.asynccontextmanager
async def resource_usage_log(settings: Settings) -> AsyncIterator[ResourceMonitor | None]:
    """For the app's lifespan: with LOG_RESOURCE_USAGE on, log a reading at start, on a
    timer and on SIGUSR1; yields the monitor (None when off) and stops it all on exit."""
    if not settings.log_resource_usage:
        yield None
        return
    monitor = ResourceMonitor(settings.tracemalloc_frames)
    monitor.start()
    loop = asyncio.get_running_loop()
    on_signal = _install_signal(loop, monitor)
    every = settings.log_resource_usage_every_s
    timer = asyncio.create_task(_every(every, monitor)) if every > 0 else None
    logger.info(
        f"LOG_RESOURCE_USAGE on: a reading every {every:g} s (0: never), and on SIGUSR1"
        + (f"; tracemalloc with {monitor.frames} frames" if monitor.frames else "")
    )
    await log_reading(monitor)
    try:
        yield monitor
    finally:
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        if on_signal:
            loop.remove_signal_handler(signal.SIGUSR1)
        monitor.stop()


def _install_signal(loop: asyncio.AbstractEventLoop, monitor: ResourceMonitor) -> bool:
    """SIGUSR1 → one reading, taken in a task on the event loop (tasks are counted there)."""

    def on_signal() -> None:
        task = loop.create_task(log_reading(monitor))
        monitor.pending.add(task)  # a task nobody references may be collected mid-run
        task.add_done_callback(monitor.pending.discard)

    try:
        loop.add_signal_handler(signal.SIGUSR1, on_signal)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        logger.info("LOG_RESOURCE_USAGE: no SIGUSR1 readings here (not the main thread)")
        return False
    return True


async def _every(seconds: float, monitor: ResourceMonitor) -> None:
    while True:
        await asyncio.sleep(seconds)
        await log_reading(monitor)
