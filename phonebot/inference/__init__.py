"""The models every call runs, shared by all calls of a process (issue 11, capacity per core).

- `sessions`: one ONNX session per model per process (Silero VAD, Smart Turn v3).
- `vad`: Silero VAD scored for all calls at once, one ONNX run per event-loop turn.
- `turn`: Smart Turn on a process-wide pool of one thread per core.

A call's CPU at 10 calls with instant services went ~30 % to Silero and ~14 % to Smart Turn
(py-spy, docs/scaling.md "Capacity per core"); these modules are where that is kept down.
"""

from phonebot.inference.sessions import load_shared_models, silero_session, smart_turn_session
from phonebot.inference.turn import SharedSmartTurnAnalyzer
from phonebot.inference.vad import SharedSileroVADAnalyzer, SileroBatcher

__all__ = [
    "SharedSileroVADAnalyzer",
    "SharedSmartTurnAnalyzer",
    "SileroBatcher",
    "load_shared_models",
    "silero_session",
    "smart_turn_session",
]
