"""One ONNX session per process for the per-call VAD and Smart Turn analyzers.

Why: Pipecat's ``SileroVADAnalyzer`` and ``LocalSmartTurnAnalyzerV3`` each load their own
``onnxruntime.InferenceSession``, and every call builds both. Measured on Pipecat 1.14: about
10 MB of RSS per VAD session and 29 MB per Smart Turn session once it has run (its memory arena
grows on the first inference), so ~38 MB per call for two models that never change. Loading them
also took place on the event loop at the start of every call.

Sharing is safe: ``InferenceSession.run`` is thread-safe, and neither model keeps per-stream
state in the session. Silero's recurrent state and audio context are inputs and outputs held by
Pipecat's Python wrapper (``SileroOnnxModel``), and Smart Turn is stateless per prediction. So
each call gets its own wrapper and analyzer state, and all calls run the same session.

The shared sessions are built by Pipecat's own constructors (one "template" analyzer of each
kind, built lazily once), so model paths and session options stay exactly Pipecat's.
"""

from __future__ import annotations

import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import onnxruntime
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState
from pipecat.utils.env import env_truthy

from phonebot.pipecat_compat import (
    init_silero_state,
    init_smart_turn_state,
    run_silero,
    silero_model,
)
from phonebot.pipecat_compat import smart_turn_session as pipecat_smart_turn_session

__all__ = [
    "SharedSileroVADAnalyzer",
    "SharedSmartTurnAnalyzer",
    "load_shared_models",
    "silero_session",
    "smart_turn_session",
]

_T = TypeVar("_T")

_templates: dict[type, Any] = {}
_templates_lock = threading.Lock()
_turn_executor: ThreadPoolExecutor | None = None
_turn_executor_lock = threading.Lock()


def _template(cls: type[_T]) -> _T:
    """The one Pipecat-built analyzer of ``cls`` whose session all calls share.

    Built under a lock so that calls starting together never load the model twice. It is only
    a holder of the session: it never analyses audio, so its own state is never touched.
    """
    with _templates_lock:
        template = _templates.get(cls)
        if template is None:
            template = _templates[cls] = cls()
        return template


def _silero_model() -> SileroOnnxModel:
    return silero_model(_template(SileroVADAnalyzer))


def silero_session() -> onnxruntime.InferenceSession:
    """The process-wide Silero VAD session."""
    return _silero_model().session


def smart_turn_session() -> onnxruntime.InferenceSession:
    """The process-wide Smart Turn v3 session."""
    return pipecat_smart_turn_session(_template(LocalSmartTurnAnalyzerV3))


def load_shared_models() -> None:
    """Load both sessions now, so the first call does not load them on the event loop."""
    silero_session()
    smart_turn_session()


def _smart_turn_executor() -> ThreadPoolExecutor:
    """Threads for every call's Smart Turn inference, one per core.

    The model is CPU-bound and its session runs on one thread (Pipecat's ``cpu_count=1``), so
    more threads than cores add no throughput; they would only let many inferences overlap,
    each growing the shared session's memory arena and its thread's malloc arena.
    """
    global _turn_executor
    with _turn_executor_lock:
        if _turn_executor is None:
            _turn_executor = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="smart-turn"
            )
        return _turn_executor


class SharedSileroVADAnalyzer(SileroVADAnalyzer):
    """Pipecat's Silero VAD analyzer, minus the per-instance ONNX session."""

    def __init__(self, *, sample_rate: int | None = None, params: VADParams | None = None):
        """Set up what ``SileroVADAnalyzer.__init__`` sets up, without loading a model.

        We go around Pipecat's constructor because it unconditionally creates an
        ``InferenceSession``. The model wrapper is a shallow copy of the template's (same
        session, same settings) with fresh recurrent state, so this call's state is its own.
        """
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        model = copy.copy(_silero_model())
        model.reset_states()
        init_silero_state(self, model)

    async def analyze_audio(self, buffer: bytes) -> VADState:
        """Run the model inline, on the event loop, instead of in a thread per chunk.

        Pipecat hands every audio chunk to a one-thread executor per call. At 8 kHz one
        Silero window (32 ms of audio) takes ~0.1 ms to infer, far less than the hand-off
        (submit, wake the thread, fight for the GIL, wake the loop), which under load was
        the largest single cost in the server's profile. Inline, the per-call executor
        never starts a thread either.
        """
        return run_silero(self, buffer)


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
        """The shared threads instead of one thread per call (see ``_smart_turn_executor``).

        ``self._executor`` stays None, so Pipecat's ``cleanup`` leaves the shared pool alone.
        """
        return _smart_turn_executor()
