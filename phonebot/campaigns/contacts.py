"""A campaign's contacts: read from CSV, checked, normalised, de-duplicated.

Every problem names its field and its row (the 1-based position in the list, which in a
CSV file is the data row under the header), so a list of thousands can be fixed in one go:
all problems are reported, not only the first.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from phonebot.campaigns.models import CampaignIn, ContactIn
from phonebot.campaigns.windows import contact_zone, known_zone
from phonebot.config import Settings
from phonebot.twilio.dial_guard import check_destination
from phonebot.twilio.dialout import validate_dial_parameters
from phonebot.twilio.twiml import ParameterError

# CSV header names for the number; other known columns; every other column is a parameter.
NUMBER_COLUMNS = ("to", "number", "phone", "phone_number")
KNOWN_COLUMNS = ("customer_id", "timezone")
# Errors listed in one 422 at most (a broken 10 000-row file must not make a 10 MB answer).
MAX_ERRORS = 50


class ContactErrors(ValueError):
    """Rows that can't be called; `errors` are FastAPI-shaped, each with its row."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} contact problems")
        self.errors = errors[:MAX_ERRORS]


def problem(loc: list[Any], msg: str, row: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"loc": loc, "msg": msg, "type": "value_error"}
    if row is not None:
        error["row"] = row
    return error


def read_csv(text: str) -> list[dict[str, Any]]:
    """Contacts from a CSV with a header row: `to` (or number/phone), optional customer_id
    and timezone; any other column becomes a call parameter of that contact."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [name.strip() for name in reader.fieldnames or []]
    number_column = next((name for name in header if name.lower() in NUMBER_COLUMNS), None)
    if number_column is None:
        raise ContactErrors(
            [problem(["contacts", "header"],
                     f"needs a column named one of {', '.join(NUMBER_COLUMNS)}")]
        )
    contacts = []
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        contact: dict[str, Any] = {"to": row.pop(number_column, "")}
        for name in KNOWN_COLUMNS:
            if row.get(name):
                contact[name] = row.pop(name)
            row.pop(name, None)
        contact["parameters"] = {k: v for k, v in row.items() if k and v}
        contacts.append(contact)
    return contacts


@dataclass
class PreparedContact:
    row: int
    to: str
    timezone: str
    customer_id: str | None
    parameters: dict[str, str]


@dataclass
class Prepared:
    contacts: list[PreparedContact] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)


def prepare(campaign: CampaignIn, settings: Settings) -> Prepared:
    """Checked, normalised (E.164) and merged contacts; ContactErrors lists every bad row."""
    if len(campaign.contacts) > settings.max_campaign_contacts:
        raise ContactErrors([problem(
            ["body", "contacts"],
            f"{len(campaign.contacts)} contacts: at most MAX_CAMPAIGN_CONTACTS"
            f" ({settings.max_campaign_contacts})",
        )])
    errors: list[dict[str, Any]] = []
    shared = _shared_parameters(campaign, settings, errors)
    prepared = Prepared()
    seen: dict[str, PreparedContact] = {}
    rows_of: dict[str, list[int]] = {}
    for index, contact in enumerate(campaign.contacts):
        row = index + 1
        checked = _check(contact, row, index, shared, settings, errors)
        if checked is None:
            continue
        rows_of.setdefault(checked.to, []).append(row)
        first = seen.get(checked.to)
        if first is None:
            seen[checked.to] = checked
            prepared.contacts.append(checked)
        else:  # merged into the first row: its values win, the duplicate fills gaps
            first.customer_id = first.customer_id or checked.customer_id
            first.parameters = {**checked.parameters, **first.parameters}
    if errors:
        raise ContactErrors(errors)
    prepared.duplicates = [
        {"to": to, "rows": rows} for to, rows in rows_of.items() if len(rows) > 1
    ]
    return prepared


def _shared_parameters(
    campaign: CampaignIn, settings: Settings, errors: list[dict[str, Any]]
) -> dict[str, str]:
    try:
        return validate_dial_parameters(campaign.parameters, settings, where="parameters")
    except ParameterError as error:
        errors.append(problem(["body", *error.field.split(".", 1)], error.message))
        return {}


def _check(
    contact: ContactIn,
    row: int,
    index: int,
    shared: dict[str, str],
    settings: Settings,
    errors: list[dict[str, Any]],
) -> PreparedContact | None:
    """One contact normalised, or None with its problems appended to `errors`."""
    loc = ["body", "contacts", index]
    before = len(errors)
    number = normalise(contact.to)
    if number is None:
        errors.append(problem([*loc, "to"], f"row {row}: {contact.to!r} is not a valid phone"
                              " number (E.164, e.g. +12025550123)", row))
    elif (refused := check_destination(number, settings)) is not None:
        errors.append(problem([*loc, "to"], f"row {row}: {refused.detail}", row))
    if contact.timezone and known_zone(contact.timezone) is None:
        errors.append(problem([*loc, "timezone"], f"row {row}: unknown time zone"
                              f" {contact.timezone!r} (IANA name, e.g. America/New_York)", row))
    parameters = {**shared, **contact.parameters}
    try:
        validate_dial_parameters(parameters, settings, where="parameters")
    except ParameterError as error:
        errors.append(problem([*loc, *error.field.split(".", 1)], f"row {row}: {error.message}",
                              row))
    if len(errors) > before or number is None:
        return None
    zone = contact_zone(number, contact.timezone, settings.campaign_default_timezone)
    return PreparedContact(row, number, zone, contact.customer_id, contact.parameters)


def normalise(number: str) -> str | None:
    """E.164 for a valid number (`+1 (202) 555-0123` → `+12025550123`), else None."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
