"""Handing a live call to a person: `<Dial>` TwiML pushed onto the call over REST.

Twilio leaves `<Connect><Stream>` when the call's TwiML is replaced, stops our media
stream and dials the target; the caller stays on the line. So the bot's pipeline must end
*without* its usual REST hang-up, or it would hang up the transferred caller.
"""

from __future__ import annotations

from twilio.twiml.voice_response import Dial, VoiceResponse

from phonebot.phone_numbers import SIP_URI


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
