"""The TwiML this server answers with, and the `<Parameter>`s a call carries.

Both directions end in the same document: `<Connect><Stream url="wss://…/ws">` with the
call's parameters, followed by a `<Pause>` so Twilio keeps the line while the websocket
connects. Built with the `twilio` library's `VoiceResponse`, which escapes values for us.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from phonebot.config import Settings

PAUSE_AFTER_STREAM_S = 40

# Names the server sets itself; a caller-supplied value must never override them.
RESERVED_PARAMETERS = frozenset(
    {"token", "caller_id", "called_number", "call_type", "_pipecatCloudServiceHost"}
)
# A phone number as Twilio dials it: E.164, e.g. +15551234567.
E164 = r"^\+[1-9]\d{1,14}$"
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


def connect_stream_twiml(target: StreamTarget, parameters: Mapping[str, str]) -> str:
    """`<Response><Connect><Stream>…<Parameter/>…</Stream></Connect><Pause/></Response>`."""
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=target.url)
    for name, value in {**parameters, **target.extra_parameters}.items():
        stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    response.pause(length=PAUSE_AFTER_STREAM_S)
    return str(response)


BUSY_MESSAGE = "Sorry, all our lines are busy right now. Please call again later. Goodbye."


def busy_twiml() -> str:
    """Answer for a call over MAX_CONCURRENT_CALLS: say so and hang up, no stream."""
    response = VoiceResponse()
    response.say(BUSY_MESSAGE)
    response.hangup()
    return str(response)
