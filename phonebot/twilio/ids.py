"""Twilio's call identifiers: a CallSid is `CA` and 32 hex digits.

Callbacks key records and the shared verdict store by it, so a webhook's CallSid is checked
here, the same way everywhere, before it is used.
"""

from __future__ import annotations

import re

from phonebot.twilio.twiml import ParameterError

CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")


def check_call_sid(call_sid: str, field: str = "CallSid") -> str:
    """`call_sid` if it looks like one; ParameterError names the field if not."""
    if not CALL_SID.match(call_sid):
        raise ParameterError(field, "must be CA followed by 32 hex digits")
    return call_sid
