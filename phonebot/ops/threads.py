"""Thread pools started whole at start-up, not one thread at a time under load.

A `ThreadPoolExecutor` adds a thread only when a task finds none idle, so a long-running
server grows its pools late, at its first peak of concurrent calls. Each new thread then
gets its own glibc heap arena: the soak benchmark saw RSS rise in ~20 MB steps and the
thread count go up after its warm-up, hundreds of calls in. Starting every thread of a pool
at once makes both a constant of the configuration, reached before the first call.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

START_TIMEOUT_S = 10.0


def asyncio_default_workers() -> int:
    """The size asyncio's own default executor has (`ThreadPoolExecutor()`'s default)."""
    return min(32, (os.cpu_count() or 1) + 4)


def start_every_thread(executor: ThreadPoolExecutor, workers: int) -> None:
    """Make `executor` start all `workers` threads now.

    Each task waits at a barrier until all are running, so no task finds an idle thread
    and the pool must start a new one for each (the executor's own growth rule).
    """
    barrier = threading.Barrier(workers, timeout=START_TIMEOUT_S)
    for started in [executor.submit(barrier.wait) for _ in range(workers)]:
        started.result()


def started_default_executor() -> ThreadPoolExecutor:
    """A replacement for the event loop's default executor (`asyncio.to_thread`, Pipecat's
    and the libraries' `run_in_executor(None, …)`), same size, every thread running."""
    workers = asyncio_default_workers()
    executor = ThreadPoolExecutor(workers, thread_name_prefix="asyncio")
    start_every_thread(executor, workers)
    return executor
