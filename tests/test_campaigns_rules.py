"""The pure rules: where calls may go (toll-fraud guard), time zones and calling windows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from phonebot.campaigns.windows import Window, contact_zone, zone_for_number
from phonebot.twilio.dial_guard import (
    RULE_COUNTRIES,
    RULE_PREMIUM,
    RULE_SHORT,
    DialRefused,
    allowed_countries,
    check_destination,
)
from phonebot.twilio.dialout import DialoutRequest, place_call
from tests.conftest import make_settings

GUARD = [
    ("us-number", "+12025550100", {}, None),
    ("fictional-555", "+15551234567", {}, None),  # what /dialout tests have always dialed
    ("premium-900", "+19005550100", {}, RULE_PREMIUM),
    ("caribbean-nanp", "+18765550100", {}, RULE_COUNTRIES),  # Jamaica shares +1
    ("france-by-default", "+33612345678", {}, RULE_COUNTRIES),
    ("france-allowed", "+33612345678", {"dialout_allowed_countries": "us, fr"}, None),
    ("us-not-allowed", "+12025550100", {"dialout_allowed_countries": "FR"}, RULE_COUNTRIES),
    ("short", "+1911", {}, RULE_SHORT),
    ("uk-premium", "+449090901234", {"dialout_allowed_countries": "GB"}, RULE_PREMIUM),
    ("no-home-country", "+12025550100", {"twilio_phone_number": None}, RULE_COUNTRIES),
]


@pytest.mark.parametrize(("number", "settings", "rule"), [g[1:] for g in GUARD],
                         ids=[g[0] for g in GUARD])
def test_the_destination_guard(number, settings, rule):
    refused = check_destination(number, make_settings(**settings))
    assert (refused.rule if refused else None) == rule


def test_the_default_country_is_that_of_our_number():
    assert allowed_countries(make_settings(twilio_phone_number="+442071838750")) == {"GB"}
    assert allowed_countries(make_settings()) == {"US"}  # +1 555 0001111: +1's main country
    with pytest.raises(ValueError, match="XX"):
        make_settings(dialout_allowed_countries="US,XX")


async def test_place_call_refuses_before_asking_twilio():
    """No Twilio account is reachable here: a refused number never gets that far."""
    settings = make_settings(twilio_api_base_url="http://127.0.0.1:9")
    with pytest.raises(DialRefused) as refused:
        await place_call(DialoutRequest(to="+19005550100"), settings, "http://test")
    assert refused.value.rule == RULE_PREMIUM


def test_time_zones_from_the_contact_the_number_or_the_default():
    assert zone_for_number("+12025550100") == "America/New_York"
    assert zone_for_number("+18005550100") is None  # toll-free: the whole of +1
    assert contact_zone("+12025550100", "Europe/Paris", "UTC") == "Europe/Paris"
    assert contact_zone("+18005550100", None, "America/Chicago") == "America/Chicago"


def test_a_window_is_wall_clock_time_across_daylight_saving():
    window = Window.of("09:00", "17:00", ["mon", "tue", "wed", "thu", "fri"])
    summer = datetime(2026, 7, 1, 13, 0, tzinfo=UTC)  # Wed 09:00 EDT (UTC-4)
    winter = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)  # Wed 08:00 EST (UTC-5)
    assert window.is_open(summer, "America/New_York")
    assert not window.is_open(winter, "America/New_York")
    assert window.next_open(winter, "America/New_York") == datetime(2026, 12, 2, 14, 0,
                                                                     tzinfo=UTC)
    friday_night = datetime(2026, 12, 4, 23, 0, tzinfo=UTC)  # Fri 18:00 EST
    assert window.next_open(friday_night, "America/New_York") == datetime(
        2026, 12, 7, 14, 0, tzinfo=UTC)  # Monday 09:00
    assert window.is_open(datetime(2026, 12, 2, 21, 59, tzinfo=UTC), "America/New_York")
    assert not window.is_open(datetime(2026, 12, 2, 22, 0, tzinfo=UTC), "America/New_York")
