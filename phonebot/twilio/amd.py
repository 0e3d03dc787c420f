"""Twilio's answering-machine detection (AMD), as the dial-out, the webhooks and the call
share it: the callback's path, its `AnsweredBy` values and the parameter that marks a call
as waiting for a verdict.

Named here, under the code that places the call and answers Twilio, so the dial-out does
not reach up into the call (`phonebot.call.voicemail` decides what the bot does with it).
"""

from __future__ import annotations

# The Stream Parameter (and /outbound query pair) that says "wait for the AMD verdict".
AMD_PARAMETER = "amd"
AMD_REQUESTED = "1"
# `machine_detection: "bot"`: no AMD request to Twilio; the bot listens and decides itself.
AMD_BY_BOT = "bot"
AMD_CALLBACK_PATH = "/amd"

# Twilio's AnsweredBy values. `machine_start` only comes with MachineDetection=Enable;
# it is still a machine, so it gets the message rather than a conversation.
MACHINE_ANSWERS = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"}
)
ANSWERED_BY = MACHINE_ANSWERS | {"human", "fax", "unknown"}
