"""Turning an incoming Media Streams websocket into a verified call.

The first two messages (`connected`, `start`) are read with Pipecat's
`parse_telephony_websocket`; the call is only let through when its `token` Parameter is
the HMAC of its CallSid, so a stranger who learns the stream URL gets a closed socket and
costs nothing: no STT, LLM or TTS has been constructed at that point.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field

from fastapi import WebSocket
from loguru import logger
from pipecat.frames.frames import Frame, InputTransportMessageFrame
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from phonebot.config import Settings
from phonebot.security import TOKEN_PARAMETER, verify_call_token

POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class CallSession:
    """What the bot knows about the call it is on."""

    call_sid: str
    stream_sid: str
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return self.parameters.get("call_type", "inbound")

    def loggable_parameters(self) -> dict[str, str]:
        """The call's parameters minus the stream token, for logs."""
        return {k: v for k, v in self.parameters.items() if k != TOKEN_PARAMETER}


class StreamRejected(Exception):
    """The websocket is not a Twilio stream we issued; the reason is safe to log."""


async def accept_twilio_stream(websocket: WebSocket, settings: Settings) -> CallSession:
    """Read `connected` + `start` and check the per-call token, or raise StreamRejected."""
    try:
        transport_type, call_data = await parse_telephony_websocket(websocket)
    except Exception as error:  # Pipecat raises ValueError, or JSON errors, on junk.
        raise StreamRejected(f"no valid Media Streams handshake ({error})") from None
    if transport_type != "twilio":
        raise StreamRejected(f"not a Twilio Media Stream (detected {transport_type!r})")
    parameters = {str(k): str(v) for k, v in (call_data.body or {}).items()}
    call_sid, stream_sid = call_data.call_id or "", call_data.stream_id or ""
    token = parameters.get(TOKEN_PARAMETER)
    if not verify_call_token(call_sid, token, settings.stream_token_secret):
        raise StreamRejected(f"missing or invalid stream token for CallSid={call_sid or '?'}")
    return CallSession(call_sid=call_sid, stream_sid=stream_sid, parameters=parameters)


async def reject_stream(websocket: WebSocket, reason: str) -> None:
    logger.warning(f"Media stream rejected: {reason}")
    with suppress(RuntimeError):  # Already closed by the peer.
        await websocket.close(code=POLICY_VIOLATION)


class TwilioMarkSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, plus Twilio's `mark` echoes as transport messages.

    Pipecat drops inbound `mark` events; we need them, because Twilio echoes a mark only
    once all audio sent before it has been played, which is how the bot knows its
    goodbye was heard before it hangs up (see `phonebot.call_control`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hang_up_configured = self._params.auto_hang_up

    def keep_call_on_end(self, keep: bool = True) -> None:
        """Don't complete the call when the pipeline ends (it was transferred)."""
        self._params.auto_hang_up = self._hang_up_configured and not keep

    async def deserialize(self, data: str | bytes) -> Frame | None:
        if isinstance(data, str) and '"mark"' in data:
            with suppress(ValueError):
                message = json.loads(data)
                if isinstance(message, dict) and message.get("event") == "mark":
                    return InputTransportMessageFrame(message=message)
        return await super().deserialize(data)


def twilio_transport(
    websocket: WebSocket, call: CallSession, settings: Settings
) -> tuple[FastAPIWebsocketTransport, TwilioMarkSerializer]:
    """The 8 kHz μ-law transport for one call.

    With Twilio credentials the serializer completes the call through the REST API
    (`TWILIO_API_BASE_URL`) when the pipeline ends; without them (offline, emulator with
    no account) there is nothing to hang up and auto hang-up stays off.
    """
    credentials = settings.twilio_credentials
    serializer = TwilioMarkSerializer(
        stream_sid=call.stream_sid,
        call_sid=call.call_sid,
        account_sid=credentials[0] if credentials else None,
        auth_token=credentials[1] if credentials else None,
        base_url=settings.twilio_api_base_url,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=credentials is not None),
    )
    params = FastAPIWebsocketParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        add_wav_header=False,
        serializer=serializer,
        # Pipecat pads 2 s of silence after an EndFrame so the last words aren't cut; we
        # wait for Twilio's playback mark instead (phonebot.call_control), so no padding.
        audio_out_end_silence_secs=0,
    )
    return FastAPIWebsocketTransport(websocket=websocket, params=params), serializer
