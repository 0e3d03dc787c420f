"""Where calls may go: the guard every dial passes, campaign or `POST /dialout`.

A leaked DIALOUT_API_KEY or ADMIN_API_KEY is worth money to whoever holds it only if it can
ring numbers that pay them back: premium-rate lines, short codes, far-away destinations
("toll fraud", what Twilio's Voice Dialing Geographic Permissions exist for:
https://www.twilio.com/docs/voice/tutorials/protect-your-twilio-account-from-toll-fraud).
So this server checks the number itself, with Google's libphonenumber (`phonenumbers`),
before asking Twilio:

- the destination's country must be in DIALOUT_ALLOWED_COUNTRIES (ISO 3166 codes; default:
  the country of TWILIO_PHONE_NUMBER);
- premium-rate and shared-cost numbers are refused;
- short numbers (too short to be a subscriber number: service and short codes) are refused.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType, ValidationResult

from phonebot.config import Settings

# Number types a campaign or a dial-out never needs, and toll fraud always does.
COSTLY_TYPES = {
    PhoneNumberType.PREMIUM_RATE: "premium-rate",
    PhoneNumberType.SHARED_COST: "shared-cost",
}
RULE_COUNTRIES = "DIALOUT_ALLOWED_COUNTRIES"
RULE_PREMIUM = "premium-rate"
RULE_SHORT = "short number"
RULE_DNC = "do-not-call list"


class DialRefused(ValueError):
    """This destination may not be dialed; `rule` names why (HTTP 403 / a 422 row)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def parse(number: str) -> phonenumbers.PhoneNumber | None:
    """The number as libphonenumber sees it, or None when it can't be read (E.164 expected)."""
    try:
        return phonenumbers.parse(number, None)
    except NumberParseException:
        return None


def region_of(parsed: phonenumbers.PhoneNumber) -> str | None:
    """The number's country (ISO code). An unassigned number of a plan (the +1 555 numbers of
    tests and films) counts as the main country of its calling code: Twilio cannot connect
    it anyway, and it must not count as "anywhere"."""
    region = phonenumbers.region_code_for_number(parsed)
    if region and region != "001":
        return region
    if not phonenumbers.is_valid_number(parsed):
        main = phonenumbers.region_code_for_country_code(parsed.country_code)
        return main if main != "ZZ" else None
    return None  # a valid non-geographic number (+800, +882 …): no country


def allowed_countries(settings: Settings) -> frozenset[str]:
    """DIALOUT_ALLOWED_COUNTRIES, else the country of TWILIO_PHONE_NUMBER, else nothing
    (no country known: every dial is refused until one of them is set)."""
    if settings.dialout_allowed_countries:
        return frozenset(settings.dialout_allowed_countries.split(","))
    own = parse(settings.twilio_phone_number or "")
    region = region_of(own) if own is not None else None
    return frozenset({region}) if region else frozenset()


def destination_refusal(number: str, settings: Settings) -> str | None:
    """Why `number` may not be dialed (naming the rule), or None when it may."""
    refused = check_destination(number, settings)
    return None if refused is None else refused.detail


def check_destination(number: str, settings: Settings) -> DialRefused | None:
    """The refusal for `number` (its rule and a sentence), or None."""
    parsed = parse(number)
    if parsed is None:
        return DialRefused(RULE_SHORT, f"{number} is not a phone number in E.164 form")
    reason = phonenumbers.is_possible_number_with_reason(parsed)
    if reason in (ValidationResult.TOO_SHORT, ValidationResult.INVALID_LENGTH):
        return DialRefused(RULE_SHORT, f"{number} is a short number: short numbers are refused")
    kind = COSTLY_TYPES.get(phonenumbers.number_type(parsed))
    if kind is not None:
        return DialRefused(RULE_PREMIUM, f"{number} is a {kind} number: those are refused")
    allowed = allowed_countries(settings)
    region = region_of(parsed)
    if region is None or region not in allowed:
        where = region or "no country"
        listed = ", ".join(sorted(allowed)) or "empty: set it, or TWILIO_PHONE_NUMBER"
        return DialRefused(
            RULE_COUNTRIES,
            f"{number} is in {where}, not in {RULE_COUNTRIES} ({listed})",
        )
    return None
