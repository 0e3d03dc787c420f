"""Handing a live call to a person: the TwiML pushed onto calls over REST.

Cold (`dial_twiml`): the caller's TwiML is replaced by `<Dial>`. Twilio leaves
`<Connect><Stream>` when a call's TwiML is replaced, stops our media stream and dials the
target; the caller stays on the line. So the bot's pipeline must end *without* its usual
REST hang-up, or it would hang up the transferred caller.

Warm (phonebot.call.warm_transfer): the bot stays with the caller while it calls the person
through `/outbound` with `TRANSFER_OF_PARAMETER` (the caller's CallSid) and a summary; the
person is briefed by the bot on their own call. Once they accept, both calls are moved
into one conference room (`join_twiml`): the person first (waiting to start), then the
caller, whose entering starts it. Either leaving ends it for both (endConferenceOnExit), as
a two-party call would (TwiML `<Conference>`: https://www.twilio.com/docs/voice/twiml/conference).
"""

from __future__ import annotations

from twilio.twiml.voice_response import Dial, VoiceResponse

from phonebot.phone_numbers import SIP_URI

# On the person's call (set by the server on its own /outbound URL, refused from anyone
# else): the CallSid of the caller waiting for them, and what the bot tells them.
TRANSFER_OF_PARAMETER = "transfer_of"
TRANSFER_SUMMARY_PARAMETER = "transfer_summary"
TRANSFER_PARAMETERS = (TRANSFER_OF_PARAMETER, TRANSFER_SUMMARY_PARAMETER)
# The longest summary the person is read: a sentence or two, and a URL Twilio accepts.
SUMMARY_MAX_CHARS = 250


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


def conference_room(caller_sid: str) -> str:
    """The conference a warm transfer joins the caller and the person in: one per caller."""
    return f"transfer-{caller_sid}"


def join_twiml(room: str, *, starts: bool) -> str:
    """`<Dial><Conference>` into `room`. The one who `starts` it enters last; the other
    waits for them, hearing Twilio's hold music (`waitUrl` left at its default). No beep,
    and either one hanging up ends the conference, so the other is not left alone in it."""
    response = VoiceResponse()
    dial = Dial()
    dial.conference(
        room,
        start_conference_on_enter=starts,
        end_conference_on_exit=True,
        beep=False,
    )
    response.append(dial)
    return str(response)
