"""What the bot thinks and says with: which STT / LLM / TTS a call uses,
text cleaned for speech, shared VAD / Smart Turn models (inference/), offline engines (offline/).
"""
