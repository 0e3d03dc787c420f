"""The background tasks one part of a call starts: kept until done, cancelled with the call.

`asyncio` keeps only weak references to tasks, so a task nobody holds may vanish mid-way;
and a goodbye or an apology still pending when the pipeline is gone must not outlive it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class CallTasks:
    """A call part's running tasks (`CallControl`'s endings, `ProviderFaults`' apologies)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run `coroutine` in its own task, held here until it is done."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> None:
        """Cancel every task still running: the call is over."""
        for task in list(self._tasks):
            task.cancel()
