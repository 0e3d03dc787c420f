"""Smart Turn v3 for every call of a process: one session, one pool of threads per core.

Why a pool and not batches: an end-of-turn prediction is ~57 ms of CPU on a 2-core AMD EPYC
(~110-145 ms before `single_threaded_blas`, most of the difference OpenBLAS spinning), nearly
all of it the model's matrix products on 8 s of features; measured with `bench/inference.py`,
scoring 2, 4 or 8 turns in one ONNX run costs the same CPU per turn as scoring them one by
one (the model is compute-bound, not overhead-bound like Silero). So batching would only
make the first caller wait for the last one's features. What keeps simultaneous turn ends
from queueing behind each other is running them side by side on every core: a process-wide
pool of one thread per core the process may use (`phonebot.ops.cores`; Pipecat gives each
analyzer a thread of its own, which lets hundreds of inferences overlap and grows memory
arenas without adding throughput).
The other half, not holding the caller's audio and transcripts while the model runs, is in
`phonebot.call.turns.PhoneTurnStopStrategy`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.utils.env import env_truthy
from threadpoolctl import threadpool_limits

from phonebot.ai.inference.sessions import smart_turn_session
from phonebot.ops.cores import process_cores
from phonebot.pipecat_compat import init_smart_turn_state

__all__ = [
    "SMART_TURN_NICE",
    "SMART_TURN_THREADS",
    "SharedSmartTurnAnalyzer",
    "smart_turn_executor",
]

SMART_TURN_THREADS = process_cores()
# The inference threads' scheduling priority, under the event loop's (Linux `nice`: each
# step is ~1.25x less CPU share when both want a core). When many calls' turns end at once
# (40 calls started by a campaign within a second), the predictions used every core, and
# the event loop, which paces every call's audio and carries the transcripts, greetings
# and replies, waited behind them. A prediction that comes late costs little (a finished
# sentence is answered at TURN_INCOMPLETE_WAIT_S without it: phonebot.call.turns); a loop
# that comes late delays everything.
SMART_TURN_NICE = 10
_turn_executor: ThreadPoolExecutor | None = None
_turn_executor_lock = threading.Lock()


def _yield_to_the_event_loop() -> None:
    """The pool's thread initializer: this thread runs at `SMART_TURN_NICE` (Linux sets a
    priority per thread; elsewhere, or where not permitted, the thread keeps its own)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + SMART_TURN_NICE)
    except (AttributeError, OSError):
        pass


def single_threaded_blas() -> None:
    """Keep NumPy's OpenBLAS on the calling thread, process-wide.

    Why: Smart Turn's features multiply by a mel filter bank (NumPy ``@``, an OpenBLAS
    product), and OpenBLAS splits each such product with a worker thread of its own, which
    then spins waiting for the next one. Profiled at 40 calls (``perf record`` on that
    thread): 0.25-0.33 of a core, 98 % of it spinning in ``blas_thread_server`` and under
    1 % multiplying, at normal priority beside the event loop. Parallelism comes from
    running the predictions side by side (one thread per core, below), not from inside
    one product. Set at run time (threadpoolctl) rather than with ``OPENBLAS_NUM_THREADS``,
    which only works if set before NumPy is first imported, by whoever starts the process.
    """
    threadpool_limits(limits=1, user_api="blas")


def smart_turn_executor() -> ThreadPoolExecutor:
    """Threads for every call's Smart Turn inference, one per core.

    The model is CPU-bound and its session runs on one thread (Pipecat's ``cpu_count=1``), so
    more threads than cores add no throughput; they would only let many inferences overlap,
    each growing the shared session's memory arena and its thread's malloc arena. Like the
    session, the pool is process-wide and holds no per-call or per-loop state.
    """
    global _turn_executor
    with _turn_executor_lock:
        if _turn_executor is None:
            single_threaded_blas()
            _turn_executor = ThreadPoolExecutor(
                max_workers=SMART_TURN_THREADS,
                thread_name_prefix="smart-turn",
                initializer=_yield_to_the_event_loop,
            )
        return _turn_executor


class SharedSmartTurnAnalyzer(LocalSmartTurnAnalyzerV3):
    """Pipecat's local Smart Turn v3 analyzer on the process-wide session and threads."""

    def __init__(self, **kwargs: Any) -> None:
        """Set up what ``LocalSmartTurnAnalyzerV3.__init__`` sets up, without loading a model.

        We go around Pipecat's constructor because it unconditionally creates an
        ``InferenceSession``; the bundled model with Pipecat's options is the template's.

        Args:
            **kwargs: Passed to ``BaseSmartTurn`` (``sample_rate``, ``params``).
        """
        BaseSmartTurn.__init__(self, **kwargs)
        log_data = env_truthy("PIPECAT_SMART_TURN_LOG_DATA", default=False)
        init_smart_turn_state(self, smart_turn_session(), log_data)

    @property
    def _model_executor(self) -> ThreadPoolExecutor:  # registered in pipecat_compat.OVERRIDDEN
        """The shared threads instead of one thread per call (see ``smart_turn_executor``).

        ``self._executor`` stays None, so Pipecat's ``cleanup`` leaves the shared pool alone.
        """
        return smart_turn_executor()
