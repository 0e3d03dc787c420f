"""Withheld caller IDs: Twilio's stand-ins for "no number" are not numbers.

When a caller withholds their number, Twilio's `From` carries a placeholder instead of
an E.164 number: `+266696687` (what "ANONYMOUS" spells on a keypad), or `Anonymous`,
`Restricted`, `Unknown` depending on the carrier (Twilio's "Anonymous and Restricted
caller ID" support notes). Read as a number, the greeting would tell the caller "the
number ending in 6 6 8 7". Every place that shows or says the caller's number goes through
`presented_caller_id`, so a withheld number is simply "no caller ID" (an empty string).
"""

from __future__ import annotations

WITHHELD_NUMBER_DIGITS = "266696687"  # "ANONYMOUS" on a phone keypad
WITHHELD_WORDS = frozenset({"anonymous", "restricted", "unknown"})


def is_withheld(caller_id: str | None) -> bool:
    """True for an empty `From` or one of Twilio's withheld-number placeholders."""
    value = (caller_id or "").strip()
    if not value:
        return True
    if value.lower() in WITHHELD_WORDS:
        return True
    return value.lstrip("+") == WITHHELD_NUMBER_DIGITS


def presented_caller_id(caller_id: str | None) -> str:
    """The caller's number as we may show or say it: "" when withheld."""
    return "" if is_withheld(caller_id) else (caller_id or "").strip()
