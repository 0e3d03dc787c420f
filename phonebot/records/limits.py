"""Every value that reaches a call record fits its column.

PostgreSQL refuses a string longer than its `varchar(n)` column, and the writer writes a
batch of many calls' changes in one transaction: one 317-character `From` once failed a
batch and lost other calls' writes. So values are bounded twice, always by the column's
own length (`schema.column_length`), never by a number repeated here:

- at the edge, request input that can't be right (a `From` longer than any phone number
  or SIP URI column) is refused with a 422 naming the field (`check_fits`,
  `check_call_parameters`, `check_webhook`);
- in the writer, as the last line of defence, anything still too long is truncated with
  one log line naming the call and the field, never the value (`fit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loguru import logger

from phonebot.records.schema import CallRecord, column_length
from phonebot.twilio.twiml import ParameterError

# Call parameters that become record columns of their own (phonebot.records.call_log).
PARAMETER_COLUMNS = {
    "campaign_id": CallRecord.campaign_id,
    "customer_id": CallRecord.customer_id,
}
# A webhook's form fields that end up in the record (From and To through the stream's
# caller_id and called_number parameters).
WEBHOOK_COLUMNS = {
    "CallSid": CallRecord.call_sid,
    "From": CallRecord.from_number,
    "To": CallRecord.to_number,
}


def check_fits(field: str, value: object, column: Any) -> None:
    """ParameterError (a 422 naming `field`) when `value` is longer than `column` holds."""
    limit = column_length(column)
    if isinstance(value, str) and limit is not None and len(value) > limit:
        raise ParameterError(field, f"is longer than {limit} characters")


def check_call_parameters(parameters: Mapping[str, str], *, where: str) -> None:
    """The parameters kept in record columns (campaign_id, customer_id) must fit them;
    `where` prefixes the field name, like `validate_custom_parameters`."""
    for name, column in PARAMETER_COLUMNS.items():
        check_fits(f"{where}.{name}", parameters.get(name), column)


def check_webhook(form: Mapping[str, Any], query: Mapping[str, str]) -> None:
    """A voice webhook's CallSid, From, To and record parameters fit the call record."""
    for name, column in WEBHOOK_COLUMNS.items():
        check_fits(name, form.get(name), column)
    check_call_parameters(query, where="query")


def fit(table: Any, fields: dict[str, Any], call_sid: str) -> dict[str, Any]:
    """`fields` with every string cut to its column's length in `table` (one log line per
    cut field, with the CallSid and the lengths, never the value: it may hold anything)."""
    columns = table.__table__.columns
    for name, value in fields.items():
        limit = column_length(columns.get(name))
        if isinstance(value, str) and limit is not None and len(value) > limit:
            logger.warning(
                f"Call records: call {call_sid[:64]}: {name} has {len(value)} characters,"
                f" more than its column holds ({limit}); stored truncated"
            )
            fields[name] = value[:limit]
    return fields
