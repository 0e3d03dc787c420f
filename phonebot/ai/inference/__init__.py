"""The models every call runs, one session per process shared by all its calls: Silero VAD
(all calls' windows scored in one run) and Smart Turn on a pool of one thread per core."""

from phonebot.ai.inference.sessions import load_shared_models, silero_session, smart_turn_session
from phonebot.ai.inference.turn import SharedSmartTurnAnalyzer
from phonebot.ai.inference.vad import SharedSileroVADAnalyzer, SileroBatcher

__all__ = [
    "SharedSileroVADAnalyzer",
    "SharedSmartTurnAnalyzer",
    "SileroBatcher",
    "load_shared_models",
    "silero_session",
    "smart_turn_session",
]
