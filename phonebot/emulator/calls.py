"""Call records kept by the REST emulator, rendered in Twilio's 2010-04-01 JSON shape.

The JSON carries every field `twilio`'s `CallInstance` reads, so `client.calls.create()`
and `create_async()` parse it as they would a real answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from phonebot.emulator.twiml import TwiML

if TYPE_CHECKING:
    from phonebot.emulator.media_stream import MediaStreamCaller
    from phonebot.emulator.result import CallResult

API_VERSION = "2010-04-01"
ACTIVE_STATUSES = frozenset({"queued", "ringing", "in-progress"})


def twilio_error(code: int, message: str, status: int) -> dict[str, Any]:
    """Twilio's REST error body, e.g. `{"code": 20003, "message": "Authenticate", …}`."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _rfc2822(moment: datetime | None) -> str | None:
    return format_datetime(moment) if moment else None


def _formatted(number: str) -> str:
    """`+14155551212` → `(415) 555-1212` for NANP numbers, else unchanged (as Twilio)."""
    digits = number[2:] if number.startswith("+1") else ""
    if len(digits) == 10 and digits.isdigit():
        return f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"
    return number


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class EmulatedCall:
    """One call the emulator knows: created via REST (outbound) or registered (inbound).

    `result` is the media stream's `CallResult` once the stream ends (the last one's, when
    a redirect opened another: `streams` has every stream's caller, in order); `error` says
    why answering failed (webhook error, TwiML without a stream, script failure).
    `conference` names the room the call is in (phonebot.emulator.conference).
    """

    sid: str
    account_sid: str
    to: str
    from_: str
    direction: str = "outbound-api"
    status: str = "queued"
    form: dict[str, str] = field(default_factory=dict)
    date_created: datetime = field(default_factory=utcnow)
    date_updated: datetime = field(default_factory=utcnow)
    start_time: datetime | None = None
    end_time: datetime | None = None
    answered_by: str | None = None
    twiml: TwiML | None = None
    updates: list[dict[str, str]] = field(default_factory=list)
    dialed: list[str] = field(default_factory=list)
    status_callbacks_sent: int = 0  # the next callback's SequenceNumber
    caller: MediaStreamCaller | None = None
    streams: list[MediaStreamCaller] = field(default_factory=list)
    conference: str | None = None
    result: CallResult | None = None
    error: str | None = None
    exception: BaseException | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def uri(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}.json"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def set_status(self, status: str) -> None:
        """Move to `status`, stamping start/end times the way Twilio reports them."""
        now = utcnow()
        self.status, self.date_updated = status, now
        if status == "in-progress" and self.start_time is None:
            self.start_time = now
        if status not in ACTIVE_STATUSES and self.end_time is None:
            self.end_time = now
            self.ended.set()

    async def wait_answered(self, timeout: float = 10.0) -> None:
        """Until the media stream is live (the callee 'picked up')."""
        await asyncio.wait_for(self.answered.wait(), timeout)

    async def wait_ended(self, timeout: float = 30.0) -> None:
        """Until the call's status is final (completed, canceled, failed)."""
        await asyncio.wait_for(self.ended.wait(), timeout)

    async def wait_finished(self, timeout: float = 60.0) -> None:
        """Until the emulator is done with the call: stream over, or it never started.

        After this, `result`, `error` and `exception` are final.
        """
        await asyncio.wait_for(self.finished.wait(), timeout)

    def to_json(self) -> dict[str, Any]:
        """The Call resource as Twilio's REST API returns it."""
        duration = None
        if self.start_time and self.end_time:
            duration = str(int((self.end_time - self.start_time).total_seconds()))
        base = self.uri[: -len(".json")]
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(self.date_updated),
            "direction": self.direction,
            "duration": duration,
            "end_time": _rfc2822(self.end_time),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": _formatted(self.from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": _rfc2822(self.start_time),
            "status": self.status,
            "subresource_uris": {
                "notifications": f"{base}/Notifications.json",
                "recordings": f"{base}/Recordings.json",
                "payments": f"{base}/Payments.json",
                "events": f"{base}/Events.json",
                "siprec": f"{base}/Siprec.json",
                "streams": f"{base}/Streams.json",
                "transcriptions": f"{base}/Transcriptions.json",
                "user_defined_message_subscriptions": (
                    f"{base}/UserDefinedMessageSubscriptions.json"
                ),
                "user_defined_messages": f"{base}/UserDefinedMessages.json",
            },
            "to": self.to,
            "to_formatted": _formatted(self.to),
            "trunk_sid": None,
            "uri": self.uri,
        }
