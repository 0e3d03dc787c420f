"""Smart Turn v3 for every call of a process: one session, one pool of threads per core.

Why a pool and not batches: an end-of-turn prediction is ~110-145 ms of CPU, nearly all of
it the model's matrix products on 8 s of features; measured with `bench/inference.py`,
scoring 2, 4 or 8 turns in one ONNX run costs the same CPU per turn as scoring them one by
one (the model is compute-bound, not overhead-bound like Silero). So batching would only
make the first caller wait for the last one's features. What keeps simultaneous turn ends
from queueing behind each other is running them side by side on every core: a process-wide
pool of ``os.cpu_count()`` threads (Pipecat gives each analyzer a thread of its own, which
lets hundreds of inferences overlap and grows memory arenas without adding throughput).
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

from phonebot.ai.inference.sessions import smart_turn_session
from phonebot.pipecat_compat import init_smart_turn_state

__all__ = ["SMART_TURN_THREADS", "SharedSmartTurnAnalyzer", "smart_turn_executor"]

SMART_TURN_THREADS = os.cpu_count() or 1
_turn_executor: ThreadPoolExecutor | None = None
_turn_executor_lock = threading.Lock()


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
            _turn_executor = ThreadPoolExecutor(
                max_workers=SMART_TURN_THREADS, thread_name_prefix="smart-turn"
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
