"""Handing a live call to a person: `<Dial>` TwiML pushed onto the call over REST.

Twilio leaves `<Connect><Stream>` when the call's TwiML is replaced, stops our media
stream and dials the target; the caller stays on the line. So the bot's pipeline must end
*without* its usual REST hang-up, or it would hang up the transferred caller.
"""

from __future__ import annotations

import re

from twilio.twiml.voice_response import Dial, VoiceResponse

from phonebot.caller_id import E164

E164_NUMBER = re.compile(E164)
SIP_URI = re.compile(r"^sips?:[^\s<>]+@[^\s<>]+$")


def is_transfer_target(target: str) -> bool:
    """An E.164 number or a SIP URI: what `<Dial>` can reach."""
    return bool(E164_NUMBER.match(target) or SIP_URI.match(target))


def dial_twiml(target: str) -> str:
    """`<Response><Dial><Number>…</Number></Dial></Response>` (or `<Sip>` for a SIP URI)."""
    response = VoiceResponse()
    dial = Dial()
    if SIP_URI.match(target):
        dial.sip(target)
    else:
        dial.number(target)
    response.append(dial)
    return str(response)
