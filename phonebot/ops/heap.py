"""The heap a server starts with, kept out of the garbage collector's way.

After start-up a server process holds ~230,000 long-lived objects (FastAPI, Pipecat,
SQLAlchemy, the models' wrappers) that will never be garbage. CPython's full (generation
2) collection walks all of them each time it runs: ~130 ms of CPU on an idle server,
during which the event loop sends no call's audio. On a loaded machine that pause
stretched to 0.6-0.7 s (tests/test_abuse.py's webhook flood, whose allocations set one
off, broke a live call's greeting in two).

`gc.freeze()` moves what is alive at the end of start-up to the permanent generation,
which collections skip (https://docs.python.org/3/library/gc.html#gc.freeze). Alone it
made things worse: CPython 3.11 runs a full collection once the objects promoted since
the last one exceed a quarter of the old generation, and with the start-up heap frozen
that generation is only the calls' own objects, so full collections came many times more
often. `FULL_COLLECTION_EVERY` (the generation-2 threshold, 10 by default: full
collections are considered every 10 generation-1 ones) puts them back to about as rare as
before, each now over the calls' objects only. Measured, 40 calls on one process
(`bench/load.py --pattern steady --steps 40 --no-baseline --runs 1`, p95 reply):
unchanged 0.81-1.14 s, frozen 1.08-2.03 s, frozen with the threshold 0.76-0.85 s. A
threshold of 30 instead (2 runs each, interleaved): 1.50-1.62 s against 1.03-1.22 s, for
~15 MB less peak RSS (docs/scaling.md).
"""

from __future__ import annotations

import gc

FULL_COLLECTION_EVERY = 100  # generation-1 collections between full ones
CPYTHON_FULL_COLLECTION_EVERY = 10  # CPython's own, put back by `thaw_heap`


def freeze_startup_heap() -> int:
    """Collect once, freeze what is left and make full collections rare again; returns
    how many objects are frozen."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Undo `freeze_startup_heap` at shutdown (an app run inside a test's process)."""
    gc.unfreeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, CPYTHON_FULL_COLLECTION_EVERY)
