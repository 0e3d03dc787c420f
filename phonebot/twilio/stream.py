"""Turning an incoming Media Streams websocket into a verified call.

The handshake (`connected`, `start`) is read by Pipecat's `parse_telephony_websocket`
through a strict screen and within `STREAM_HANDSHAKE_TIMEOUT_S`
(`phonebot.twilio.stream_guard.read_handshake`); what it returns is then checked here (Twilio,
CallSid and StreamSid, string parameters) and the call is only let through when its
`token` Parameter is the HMAC of its CallSid. So a stranger who learns the stream URL, or
a peer that sends junk or nothing, gets a closed socket and costs nothing: no STT, LLM or
TTS has been constructed at that point. After that, every inbound message passes the
call's `InboundGuard` before it is decoded.
"""

from __future__ import annotations

import base64
from contextlib import suppress
from dataclasses import dataclass, field, replace

from fastapi import WebSocket
from loguru import logger
from pipecat.audio.utils import ulaw_to_pcm
from pipecat.frames.frames import Frame, InputAudioRawFrame, InputTransportMessageFrame
from pipecat.runner.types import CallData
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from phonebot.config import Settings
from phonebot.pipecat_compat import (
    serializer_call,
    serializer_input_audio,
    serializer_params,
    serializer_rest_account,
)
from phonebot.twilio.rest import RetryPolicy, TwilioAccount, hang_up_call
from phonebot.twilio.stream_guard import (
    Handshake,
    HandshakeError,
    InboundGuard,
    describe,
    read_handshake,
)
from phonebot.twilio.stream_token import TOKEN_PARAMETER, covered_parameters, verify_call_token
from phonebot.twilio.transport import (
    INBOUND_BATCH_MS,
    OUTBOUND_CHUNK_10MS,
    ULAW_BYTES_PER_MS,
    AudioBatcher,
    barge_in_transport,
)

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


async def accept_twilio_stream(
    websocket: WebSocket, settings: Settings, handshake: Handshake | None = None
) -> CallSession:
    """Read the handshake (unless a runner already did) and check it, or raise StreamRejected.

    `handshake` is what Pipecat's runner parsed, when it did so before calling `bot()`.
    Its screen did not run then (Pipecat's parser skips junk, so junk or `media` before
    `start` cannot be refused on that path), which is why the checks in `twilio_call`
    and the token apply to whatever `parse_telephony_websocket` returned.
    """
    if handshake is None:
        try:
            handshake = await read_handshake(websocket, settings.stream_handshake_timeout_s)
        except HandshakeError as error:
            raise StreamRejected(f"no valid Media Streams handshake ({error})") from None
    call = twilio_call(*handshake)
    check = verify_call_token(call.call_sid, call.parameters, settings.stream_token_secret)
    if not check.ok:
        # Unverified, so only a truncated form of the CallSid is logged.
        raise StreamRejected(
            f"missing or invalid stream token ({check.problem}) for "
            f"CallSid={describe(call.call_sid)}"
        )
    # Only what the token vouches for goes on: the platform's own `_…` parameters are dropped.
    return replace(call, parameters=covered_parameters(call.parameters))


def twilio_call(transport_type: str, call_data: CallData) -> CallSession:
    """What `parse_telephony_websocket` returned, as a Twilio call, or StreamRejected."""
    if transport_type != "twilio":
        raise StreamRejected(
            f"not a Twilio Media Stream (Pipecat detected {describe(transport_type)})"
        )
    call_sid, stream_sid, parameters = call_data.call_id, call_data.stream_id, call_data.body
    if not (isinstance(call_sid, str) and call_sid and isinstance(stream_sid, str) and stream_sid):
        raise StreamRejected("Twilio 'start' without callSid or streamSid")
    if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
        raise StreamRejected("Twilio 'start' with customParameters that are not strings")
    return CallSession(call_sid=call_sid, stream_sid=stream_sid, parameters=dict(parameters))


async def reject_stream(websocket: WebSocket, reason: str) -> None:
    logger.warning(f"Media stream rejected: {reason}")
    with suppress(RuntimeError):  # Already closed by the peer.
        await websocket.close(code=POLICY_VIOLATION)


class TwilioMarkSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, plus Twilio's `mark` echoes as transport messages.

    Pipecat drops inbound `mark` events; we need them, because Twilio echoes a mark only
    once all audio sent before it has been played, which is how the bot knows its
    goodbye was heard before it hangs up (see `phonebot.call.control`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hang_up_configured = serializer_params(self).auto_hang_up
        call_sid, stream_sid = serializer_call(self)
        self._guard = InboundGuard(call_sid or "?", stream_sid)
        self._batcher = AudioBatcher(INBOUND_BATCH_MS * ULAW_BYTES_PER_MS)

    def keep_call_on_end(self, keep: bool = True) -> None:
        """Don't complete the call when the pipeline ends (it was transferred)."""
        serializer_params(self).auto_hang_up = self._hang_up_configured and not keep

    # Retries of the end-of-call hang-up; `twilio_transport` sets it from the settings.
    rest_policy: RetryPolicy = RetryPolicy()

    async def _hang_up_call(self) -> None:  # registered in pipecat_compat.OVERRIDDEN
        """Complete the call when the pipeline ends, through `twilio_api.hang_up_call`.

        Replaces Pipecat's single POST, after which one Twilio 5xx would leave the caller
        on a silent line: 5xx, 429 and network errors are retried with backoff within
        `rest_policy`'s bound, a 404 means the call is already over, and a final failure is
        logged, never raised, so the pipeline still ends.
        """
        account = TwilioAccount(*serializer_rest_account(self))
        call_sid, _ = serializer_call(self)
        await hang_up_call(account, call_sid or "", policy=self.rest_policy)

    @property
    def dropped_messages(self) -> int:
        """Inbound messages dropped so far as malformed, misaddressed or flooding."""
        return self._guard.faults.total

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """Screened by the call's guard, decoded by Pipecat or `_media_frame`; never raises.

        Pipecat's receive loop ends the call on any exception from here, so a malformed
        message is dropped and logged (`phonebot.twilio.stream_guard`) and the call goes on.
        """
        message = self._guard.screen(data)
        if message is None:
            return None
        event = message.get("event")
        if event == "mark":
            return InputTransportMessageFrame(message=message)
        try:
            if event == "media":
                return await self._media_frame(message)
            return await super().deserialize(data)
        except Exception as error:
            self._guard.decoding_failed(message, error)
            return None

    async def _media_frame(self, message: dict) -> InputAudioRawFrame | None:
        """One audio frame per `INBOUND_BATCH_MS` of caller audio (`phonebot.twilio.transport`).

        Decodes what Pipecat's `deserialize` would (μ-law → PCM at the pipeline's rate),
        from the message the guard has already parsed and checked, so JSON is parsed once.
        """
        batch = self._batcher.add(base64.b64decode(message["media"]["payload"]))
        if batch is None:
            return None
        twilio_rate, pipeline_rate, resampler = serializer_input_audio(self)
        pcm = await ulaw_to_pcm(batch, twilio_rate, pipeline_rate, resampler)
        return InputAudioRawFrame(audio=pcm, num_channels=1, sample_rate=pipeline_rate)


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
    serializer.rest_policy = RetryPolicy.from_settings(settings)
    params = FastAPIWebsocketParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        add_wav_header=False,
        serializer=serializer,
        # Pipecat pads 2 s of silence after an EndFrame so the last words aren't cut; we
        # wait for Twilio's playback mark instead (phonebot.call.control), so no padding.
        audio_out_end_silence_secs=0,
        audio_out_10ms_chunks=OUTBOUND_CHUNK_10MS,  # see phonebot.twilio.transport
    )
    # Pipecat's transport, with an output that sends nothing of an interrupted reply
    # after Twilio's `clear` (phonebot.twilio.transport).
    return barge_in_transport(websocket, params), serializer
