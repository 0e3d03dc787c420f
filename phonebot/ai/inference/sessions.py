"""One ONNX session per process for every call's VAD and Smart Turn analyzer.

Why: Pipecat's ``SileroVADAnalyzer`` and ``LocalSmartTurnAnalyzerV3`` each load their own
``onnxruntime.InferenceSession``, and every call builds both. Measured on Pipecat 1.14: about
10 MB of RSS per VAD session and 29 MB per Smart Turn session once it has run (its memory arena
grows on the first inference), so ~38 MB per call for two models that never change. Loading them
also took place on the event loop at the start of every call.

Sharing is safe: ``InferenceSession.run`` is thread-safe, and neither model keeps per-stream
state in the session. Silero's recurrent state and audio context are inputs and outputs (each
call keeps its own, `phonebot.ai.inference.vad.SileroStream`), and Smart Turn is stateless per
prediction.

The sessions are built by Pipecat's own constructors (one "template" analyzer of each kind,
built lazily once), so model paths and session options stay exactly Pipecat's. They are the
only process-wide objects here: immutable models, not per-call or per-loop state.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import onnxruntime
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer

from phonebot.pipecat_compat import silero_model
from phonebot.pipecat_compat import smart_turn_session as pipecat_smart_turn_session

__all__ = ["load_shared_models", "silero_session", "smart_turn_session"]

_T = TypeVar("_T")

_templates: dict[type, Any] = {}
_templates_lock = threading.Lock()


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


def silero_session() -> onnxruntime.InferenceSession:
    """The process-wide Silero VAD session."""
    return silero_model(_template(SileroVADAnalyzer)).session


def smart_turn_session() -> onnxruntime.InferenceSession:
    """The process-wide Smart Turn v3 session."""
    return pipecat_smart_turn_session(_template(LocalSmartTurnAnalyzerV3))


def load_shared_models() -> None:
    """Load both sessions now, so the first call does not load them on the event loop."""
    silero_session()
    smart_turn_session()
