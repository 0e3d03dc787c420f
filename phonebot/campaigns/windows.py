"""Calling windows in each contact's local time, and the clock the scheduler reads.

A window is "09:00"–"20:00" on some days of the week, read in the contact's time zone: the
one given for the contact, else the one its number implies (`phonenumbers.timezone`, used
only when the number maps to exactly one zone: +1 900 numbers map to forty), else
CAMPAIGN_DEFAULT_TIMEZONE. Times are wall-clock: across a DST change "09:00" stays 09:00.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Looking this far ahead for the next opening covers any window on any set of days.
HORIZON_DAYS = 8


class Clock(Protocol):
    """What the scheduler reads the time from; tests inject one they move by hand."""

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told (`advance`): for tests and dry runs."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        self._now = moment

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.01))  # let others run; time stands still


def parse_hhmm(text: str) -> time:
    """"09:00" → time(9, 0); ValueError for anything else (24:00 is not a time here)."""
    hours, sep, minutes = text.partition(":")
    if not sep or len(hours) != 2 or len(minutes) != 2:
        raise ValueError(f"{text!r} is not HH:MM")
    return time(int(hours), int(minutes))


def known_zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone_for_number(number: str) -> str | None:
    """The one IANA zone a number is in, or None (unknown, or several: a country-wide or
    non-geographic number)."""
    try:
        zones = number_zones.time_zones_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return None
    if len(zones) == 1 and known_zone(zones[0]) is not None:
        return zones[0]
    return None


def contact_zone(number: str, given: str | None, default: str) -> str:
    """Given zone, else the number's, else the default (all assumed valid)."""
    return given or zone_for_number(number) or default


@dataclass(frozen=True)
class Window:
    """When calls may ring, in the callee's wall-clock time."""

    start: time
    end: time
    days: frozenset[str]

    @classmethod
    def of(cls, start: str, end: str, days: list[str]) -> Window:
        return cls(parse_hhmm(start), parse_hhmm(end), frozenset(days))

    def is_open(self, now: datetime, zone: str) -> bool:
        local = now.astimezone(ZoneInfo(zone))
        return DAYS[local.weekday()] in self.days and self.start <= local.time() < self.end

    def next_open(self, now: datetime, zone: str) -> datetime | None:
        """The first moment at or after `now` inside the window (UTC), or None (no days)."""
        tz = ZoneInfo(zone)
        local = now.astimezone(tz)
        if self.is_open(now, zone):
            return now
        for offset in range(HORIZON_DAYS):
            day = (local + timedelta(days=offset)).date()
            if DAYS[day.weekday()] not in self.days:
                continue
            opening = datetime.combine(day, self.start, tzinfo=tz)
            if opening >= local:
                return opening.astimezone(UTC)
        return None
