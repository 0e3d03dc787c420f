"""One live call: `PhoneCall` and its parts (control, playout, idle watchdog, turns, barge-in,
voicemail screen, provider faults, bot speech), its LLM tools. `python -m phonebot.call` rings it.
"""
