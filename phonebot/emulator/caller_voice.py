"""The emulated caller's voice: Piper's joe, the same text always the same audio.

The caller's lines (`python -m phonebot.call --say`, the scripted callees, the tests' `say`)
are heard by the bot's offline recogniser, so they should sound like a person on a phone, not
like espeak-ng's robot: Whisper tiny.en misheard espeak-ng lines that it hears right in joe's
voice. Piper's noise is turned off (``piper_voice.synthesis_config``), so a line is the same
audio on every run and a test that passed once passes again. Without the Piper packages the
caller falls back to espeak-ng, like the bot does.
"""

from __future__ import annotations

from functools import lru_cache

from phonebot.ai.offline import piper_voice
from phonebot.ai.offline.tts import piper_available
from phonebot.audio import TWILIO_SAMPLE_RATE

__all__ = ["caller_pcm"]


@lru_cache(maxsize=256)
def caller_pcm(text: str, sample_rate: int = TWILIO_SAMPLE_RATE) -> bytes:
    """``text`` spoken by the caller as 16-bit PCM (cached: scripts and campaigns repeat lines).

    Raises what the voice raises (a bad voice file: ``piper_voice.VoiceFileError``).
    """
    if piper_available():
        return piper_voice.synthesize_at(text, sample_rate, deterministic=True)
    from phonebot.ai.offline.espeak import synthesize_at

    return synthesize_at(text, sample_rate)
