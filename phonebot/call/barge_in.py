"""Barge-in, the call's half: hearing a caller who talks over the bot within ~0.15 s.

The other half, sending nothing of the interrupted reply after Twilio's `clear`, is the
transport's (phonebot.twilio.transport).
"""

from __future__ import annotations

from pipecat.audio.vad.vad_analyzer import VADParams

from phonebot.config import Settings


def vad_params(settings: Settings) -> VADParams:
    """Silero VAD tuned to hear a caller barging in within ~0.15 s, not ~0.35 s.

    Measured with espeak phrases through μ-law in the server's 60 ms batches
    (`bench/barge_in_vad.py`): with Pipecat's defaults (confidence 0.7, start 0.2 s, min
    volume 0.6) the VAD confirms speech 0.34-0.46 s after its onset, and the `clear` left
    0.35-0.43 s after it on the wire. Two things add up: `start_secs` (0.2 s of voiced
    32 ms windows) and the volume gate, a 0.4 s loudness window smoothed again (factor
    0.2), which needs ~0.15 s of speech before it passes 0.6. Line hiss and cough-like
    bursts never reach Silero's 0.7 confidence (at most 0.14 measured), so the confidence
    stays and the start and the volume gate come down (`VAD_START_S` 0.06 = two windows,
    `VAD_MIN_VOLUME` 0.3): speech confirmed 0.13-0.17 s after onset, `clear` on the wire
    0.16-0.20 s after it. The stop side (`stop_secs`) is Pipecat's, which the turn-taking
    in `phonebot.call.turns` builds on (measured: when the VAD reports the end of speech is
    unchanged by these two settings).
    """
    return VADParams(
        confidence=settings.vad_confidence,
        start_secs=settings.vad_start_s,
        min_volume=settings.vad_min_volume,
    )
