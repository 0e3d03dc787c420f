"""Offline speech engines (espeak-ng TTS, pocketsphinx STT) so the bot runs with no API keys.

Everything here uses models shipped inside installed wheels; nothing is downloaded at run time.
"""
