"""Thread pools start whole at start-up (phonebot.ops.threads): no thread is added under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from phonebot.ops.threads import (
    asyncio_default_workers,
    start_every_thread,
    started_default_executor,
)


def threads_named(prefix: str) -> int:
    return sum(thread.name.startswith(prefix) for thread in threading.enumerate())


def test_every_thread_of_a_pool_is_running_before_any_work():
    executor = ThreadPoolExecutor(4, thread_name_prefix="pool-under-test")
    try:
        assert threads_named("pool-under-test") == 0  # a pool starts threads lazily
        start_every_thread(executor, 4)
        assert threads_named("pool-under-test") == 4
        # A burst of work afterwards adds none: the count is fixed from the start.
        list(executor.map(time.sleep, [0.01] * 20))
        assert threads_named("pool-under-test") == 4
        start_every_thread(executor, 4)  # again (a second app in one process): still 4
        assert threads_named("pool-under-test") == 4
    finally:
        executor.shutdown()


def test_the_default_executor_replacement_has_asyncio_s_size_all_started():
    executor = started_default_executor()
    try:
        assert threads_named("asyncio") >= asyncio_default_workers()
        assert executor._max_workers == asyncio_default_workers()
    finally:
        executor.shutdown()
