"""The heap a server starts with, kept out of the garbage collector's way.

After start-up a server process holds a few hundred thousand long-lived objects (FastAPI,
Pipecat, SQLAlchemy, the models' wrappers) that will never be garbage. CPython's full
(generation 2) collection walks all of them each time it runs: measured here at ~130 ms
of CPU on an idle server, during which the event loop sends no call's audio. On a loaded
machine that pause stretched to 0.6-0.7 s (tests/test_abuse.py's webhook flood, whose
allocations set one off, broke a live call's greeting in two). `gc.freeze()` moves what
is alive at that moment to the permanent generation, which collections skip
(https://docs.python.org/3/library/gc.html#gc.freeze: "useful to ... make the
collections faster"); calls' own objects are collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Undo `freeze_startup_heap` at shutdown (an app run inside a test's process)."""
    gc.unfreeze()
