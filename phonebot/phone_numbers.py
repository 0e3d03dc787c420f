"""Phone number syntax, on the ground floor: what settings, dial-outs and transfers accept.

Settings (`TRANSFER_TARGET`) are checked with it as they load, so it must not sit above
`phonebot.config`; the Twilio code (`phonebot.twilio.transfer`, `.dialout`) uses the same
patterns, so a number that passes one check passes them all.
"""

from __future__ import annotations

import re

# A phone number as Twilio writes it (E.164): "+", country code, at most 15 digits in all.
E164 = r"^\+[1-9]\d{1,14}$"
E164_NUMBER = re.compile(E164)
# What `<Dial><Sip>` reaches: sip: or sips:, a user, @, a host.
SIP_URI = re.compile(r"^sips?:[^\s<>]+@[^\s<>]+$")


def is_transfer_target(target: str) -> bool:
    """An E.164 number or a SIP URI: what `<Dial>` can reach."""
    return bool(E164_NUMBER.match(target) or SIP_URI.match(target))
