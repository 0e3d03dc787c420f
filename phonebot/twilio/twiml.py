"""The TwiML this server answers with, and the `<Parameter>`s a call carries.

Both directions end in the same document: `<Connect><Stream url="wss://…/ws">` with the
call's parameters, then `<Say>STREAM_CLOSED_PHRASE</Say><Hangup/>`. Twilio runs what
follows `</Connect>` as soon as the websocket closes (error 31921's notes; the `<Connect>`
docs): a call the bot ends is already hung up by then (REST `Status=completed`), and a
transfer replaces the whole document (REST `Twiml=<Dial>`), so only a stream that closed
without either (refused, unadmitted, a failed hang-up, a crash) reaches the `<Say>`: the
caller hears why instead of silence. Built with the `twilio` library's `VoiceResponse`,
which escapes values for us.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from phonebot.config import Settings
from phonebot.twilio.transfer import TRANSFER_PARAMETERS

LOOPBACK_NAMES = frozenset({"localhost"})

# Names the server sets itself; a caller-supplied value must never override them.
RESERVED_PARAMETERS = frozenset(
    {"token", "caller_id", "called_number", "call_type", "_pipecatCloudServiceHost"}
    | set(TRANSFER_PARAMETERS)  # a warm transfer's person: only the server calls one
)
PARAMETER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class ParameterError(ValueError):
    """A custom parameter that can't be sent; `field` names it for the 4xx answer."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_custom_parameters(
    parameters: Mapping[str, str], settings: Settings, *, where: str
) -> dict[str, str]:
    """Bound a call's custom parameters in count, name and value; `where` prefixes errors."""
    if len(parameters) > settings.max_call_parameters:
        raise ParameterError(where, f"at most {settings.max_call_parameters} parameters")
    for name, value in parameters.items():
        field = f"{where}.{name[:64]}"
        if name in RESERVED_PARAMETERS:
            raise ParameterError(field, "is reserved; the server sets it")
        if len(name) > settings.max_parameter_name_length or not PARAMETER_NAME.match(name):
            raise ParameterError(
                field,
                f"name must match {PARAMETER_NAME.pattern} and be at most "
                f"{settings.max_parameter_name_length} characters",
            )
        if len(value) > settings.max_parameter_value_length:
            raise ParameterError(
                field, f"value is longer than {settings.max_parameter_value_length} characters"
            )
    return dict(parameters)


@dataclass(frozen=True)
class StreamTarget:
    """Where Twilio should open the media stream, plus any parameter the host needs."""

    url: str
    extra_parameters: dict[str, str]


def stream_target(settings: Settings, base_url: str) -> StreamTarget:
    """Our own `/ws`, or Pipecat Cloud's Twilio websocket when ENV=production."""
    if settings.env == "production":
        service_host = f"{settings.agent_name}.{settings.organization_name}"
        return StreamTarget(
            settings.pipecat_cloud_ws_url, {"_pipecatCloudServiceHost": service_host}
        )
    ws_base = re.sub(r"^http", "ws", base_url)
    return StreamTarget(f"{ws_base}/ws", {})


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_stream_url(url: str) -> str | None:
    """Why Twilio would refuse this `<Stream url>`, or None.

    Twilio opens media streams over `wss://` only (error 31922, "URL Schema Not
    Supported"). A `ws://` URL is only usable on loopback, where the emulator (not
    Twilio) connects; elsewhere it means the server derived the URL from a plain-HTTP
    request because it doesn't know its public https address.
    """
    parts = urlsplit(url)
    if parts.scheme == "wss" or is_loopback_host(parts.hostname):
        return None
    return (
        f"the stream URL {url} is not wss://, so Twilio will refuse it (error 31922) and "
        "every caller hears STREAM_CLOSED_PHRASE: set PUBLIC_URL to this server's public "
        "https URL (or have your proxy send X-Forwarded-Proto: https)"
    )


def closing_phrase(settings: Settings) -> str | None:
    """What Twilio should say when the stream closes without a hang-up, or None.

    With Twilio credentials (or on Pipecat Cloud, whose bot has its own) the bot hangs up
    through REST when it ends a call, so reaching the `<Say>` means something failed and
    the apology is owed. Without them (the offline quick start, the emulator) the bot can
    only end a call by closing the stream, so an apology would follow every goodbye: the
    document then ends with a bare `<Hangup/>`, still never dead air.
    """
    if settings.twilio_credentials or settings.env == "production":
        return settings.stream_closed_phrase
    return None


def connect_stream_twiml(
    target: StreamTarget, parameters: Mapping[str, str], closing_phrase: str | None
) -> str:
    """`<Response><Connect><Stream>…<Parameter/>…</Stream></Connect><Say/><Hangup/>`.

    What follows `</Connect>` is what the caller gets if the stream closes without a
    hang-up or transfer (see the module docstring): a short apology (`closing_phrase`,
    when there is one), then the end of the call, never dead air.
    """
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=target.url)
    for name, value in {**parameters, **target.extra_parameters}.items():
        stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    if closing_phrase:
        response.say(closing_phrase)
    response.hangup()
    return str(response)


BUSY_MESSAGE = "Sorry, all our lines are busy right now. Please call again later. Goodbye."


def busy_twiml() -> str:
    """Answer for a call over MAX_CONCURRENT_CALLS: say so and hang up, no stream."""
    response = VoiceResponse()
    response.say(BUSY_MESSAGE)
    response.hangup()
    return str(response)
