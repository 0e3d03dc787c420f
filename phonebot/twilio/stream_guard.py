"""What the Media Streams websocket lets through from a peer that may not be a polite Twilio.

Pipecat's receive loop ends the call on the first exception its serializer raises, and its
Twilio serializer logs a non-JSON message in full. A peer that sends junk (or a Twilio bug,
or a proxy mangling frames) must cost one log line, not the call, and a flooding peer must
not make VAD and STT chew unbounded audio. So every inbound message passes an
`InboundGuard` before Pipecat's serializer decodes it:

- binary frames, messages over `MAX_MEDIA_MESSAGE_BYTES`, non-JSON, JSON that is not an
  object, `media`/`mark`/`dtmf` for another streamSid, undecodable `media` (bad base64)
  or `dtmf`: dropped, with a warning naming the call and the reason, never the payload;
- audio arriving faster than real time beyond `AUDIO_BURST_S`, and keypad events faster
  than a person presses keys: dropped (`TokenBucket`);
- unknown events: ignored (debug log only), as Twilio may add events.

Warnings are rate-limited per call (`FaultLog`): the first `FAULT_WARNINGS` one by one,
then one summary line per `FAULT_SUMMARY_INTERVAL_S` with counts per reason.

Before any of that, `read_handshake` reads the handshake (`connected`, then `start`) with
Pipecat's `parse_telephony_websocket`, through a view that passes it only a well-formed
Twilio handshake, within a deadline: junk, `media` before `start` or a silent socket is
rejected before a pipeline is built.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

from loguru import logger
from pipecat.runner.types import CallData
from pipecat.runner.utils import parse_telephony_websocket
from starlette.websockets import WebSocket, WebSocketDisconnect

from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.state.token_bucket import Clock, TokenBucket

# A Twilio `media` message is ~300 bytes and `start` a few KB (custom parameters are capped
# by phonebot.twilio.twiml); 64 KiB leaves room for both and bounds what one message can cost.
# Also the server's uvicorn `ws_max_size`, so an oversized frame is refused unbuffered.
MAX_MEDIA_MESSAGE_BYTES = 64 * 1024
# μ-law at Twilio's 8 kHz: one byte per sample.
AUDIO_BYTES_PER_S = TWILIO_SAMPLE_RATE
# How far ahead of real time a caller's audio may get. Twilio streams in real time from
# `start`, but the audio sent while the call's pipeline is being built (1-3 s on a loaded
# box) or during a network stall arrives as one burst and must pass; a flood can't get
# further ahead than this, so the pipeline's input queue never holds more.
AUDIO_BURST_S = 5.0
# Each key can start an LLM turn (`#` ends an entry), so a keypad flood would cost money
# as well as CPU; people press at most ~8 keys a second.
DTMF_KEYS_PER_S = 10.0
DTMF_BURST = 20
FAULT_WARNINGS = 5
FAULT_SUMMARY_INTERVAL_S = 5.0
DETAIL_CHARS = 80
# Twilio's first two messages, in order; anything else before `start` is not Twilio.
HANDSHAKE_EVENTS = ("connected", "start")
SID_EVENTS = frozenset({"media", "mark", "dtmf"})


class HandshakeError(Exception):
    """The first messages are not a Twilio Media Streams handshake; the reason is loggable."""


def describe(value: Any) -> str:
    """A short, log-safe description of an untrusted value (an event name, a streamSid)."""
    if isinstance(value, str):
        return repr(value[:40] + "…") if len(value) > 40 else repr(value)
    return type(value).__name__


def error_detail(error: BaseException) -> str:
    """`Type: message`, truncated: library messages name the problem, not the payload."""
    text = f"{type(error).__name__}: {error}"
    return text[:DETAIL_CHARS] + ("…" if len(text) > DETAIL_CHARS else "")


class MalformedMessage(ValueError):
    """Text that is not a JSON object; `kind` and `detail` are loggable, the text is not."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def parse_object(data: str) -> dict[str, Any]:
    """JSON text → object, or MalformedMessage saying why not (never quoting the text)."""
    try:
        message = json.loads(data)
    except RecursionError:  # `[[[[…` nests deeper than the parser's stack
        raise MalformedMessage("not JSON", "nested too deeply") from None
    except ValueError as error:
        raise MalformedMessage("not JSON", error_detail(error)) from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"not a JSON object ({type(message).__name__})")
    return message


# --------------------------------------------------------------------------- handshake

# What `parse_telephony_websocket` returns: the detected provider and the parsed `start`.
Handshake = tuple[str, CallData]


async def read_handshake(websocket: WebSocket, timeout_s: float) -> Handshake:
    """Pipecat's `parse_telephony_websocket` on a screened view of `websocket`, in `timeout_s`.

    Pipecat reads the handshake and caches its result on the websocket, so Pipecat's
    runner, the bot and `/ws` can each call it and the messages are read once. The
    deadline is ours: a stream slot is held from accept until this returns, so a peer
    that says nothing (Pipecat would wait forever) must release it quickly.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await parse_telephony_websocket(ScreenedHandshake(websocket))
    except TimeoutError:
        raise HandshakeError(f"no 'start' within {timeout_s:g} s") from None
    except (RuntimeError, WebSocketDisconnect) as error:  # the socket went away oddly
        raise HandshakeError(f"socket error before 'start' ({error_detail(error)})") from None
    except ValueError as error:
        # Pipecat raises ValueError for a socket closed before its first message and for a
        # value its `CallData` model rejects (pydantic's ValidationError); the screen below
        # raises first in both cases today, so this only catches what a newer Pipecat rejects.
        raise HandshakeError(f"Pipecat could not parse it ({error_detail(error)})") from None


class ScreenedHandshake:
    """The websocket as `parse_telephony_websocket` reads it: Twilio's handshake, or an error.

    We go around Pipecat's reading (not its parsing) because it is lenient where a handshake
    that holds a stream slot must be strict, and loud where it must be quiet: it skips a
    message that is not JSON and reads on, accepts `media` (or anything) before `start`,
    has no size cap, and a `start` of the wrong shape makes it log the exception at ERROR
    (pydantic's message quotes the offending value) before raising. So this view hands it
    a message only if it is the one Twilio sends at that point (`connected`, then a
    well-formed `start`; https://www.twilio.com/docs/voice/media-streams/websocket-messages)
    and otherwise raises `HandshakeError`, which Pipecat does not catch, naming what
    arrived but never quoting it. Every other attribute, including the one Pipecat caches
    its result in, is the real websocket's, so that cache is shared with whoever parses next.
    """

    def __init__(self, websocket: WebSocket):
        object.__setattr__(self, "_websocket", websocket)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._websocket, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._websocket, name, value)

    async def iter_text(self) -> AsyncIterator[str]:
        """`connected`'s text, then `start`'s; HandshakeError for anything else."""
        for expected in HANDSHAKE_EVENTS:
            text = _handshake_text(await self._websocket.receive())
            message = _handshake_object(text)
            event = message.get("event")
            if event != expected:
                raise HandshakeError(_unexpected(event, expected))
            if event == "start":
                _check_start(message)
            yield text


def _handshake_text(received: Mapping[str, Any]) -> str:
    """One ASGI websocket event → its text, if it is a text message of a sane size."""
    if received.get("type") == "websocket.disconnect":
        raise HandshakeError("closed before 'start'")
    text = received.get("text")
    if text is None:
        size = len(received.get("bytes") or b"")
        raise HandshakeError(f"binary frame ({size} bytes) before 'start'")
    if len(text) > MAX_MEDIA_MESSAGE_BYTES:
        raise HandshakeError(f"message of {len(text)} characters before 'start'")
    return text


def _handshake_object(text: str) -> dict[str, Any]:
    try:
        return parse_object(text)
    except MalformedMessage as error:
        raise HandshakeError(f"{error} before 'start'") from None


def _unexpected(event: Any, expected: str) -> str:
    if event == "connected":
        return "a second 'connected' instead of 'start'"
    if event == "start":
        return "'start' before 'connected'"
    return f"{describe(event)} event before 'start'"


def _check_start(message: dict[str, Any]) -> None:
    """The shape Pipecat's parser needs to neither misdetect nor log an exception at ERROR."""
    start = message.get("start")
    if not isinstance(start, dict):
        raise HandshakeError("'start' without a start object")
    for name in ("streamSid", "callSid"):
        if not isinstance(start.get(name), str) or not start[name]:
            raise HandshakeError(f"'start' without {name}")
    parameters = start.get("customParameters", {})
    if not isinstance(parameters, dict):
        raise HandshakeError("'start' with customParameters that are not an object")
    # TwiML <Parameter> values are strings; Pipecat's model rejects e.g. a numeric from_number.
    if not all(isinstance(value, str) for value in parameters.values()):
        raise HandshakeError("'start' with a customParameters value that is not a string")


# --------------------------------------------------------------------- during the call


class FaultLog:
    """Per-call warnings for dropped messages, rate-limited so a flood can't flood the log."""

    def __init__(self, call_sid: str, clock: Clock = time.monotonic):
        self._call_sid = call_sid
        self._clock = clock
        self._warned = 0
        self._suppressed: Counter[str] = Counter()
        self._window_start = 0.0
        self.total = 0

    def drop(self, kind: str, detail: str = "") -> None:
        self.total += 1
        if self._warned < FAULT_WARNINGS:
            self._warned += 1
            reason = f"{kind}: {detail}" if detail else kind
            more = "; further drops are summarised" if self._warned == FAULT_WARNINGS else ""
            logger.warning(
                f"Call {self._call_sid}: dropped a Media Streams message ({reason}){more}"
            )
            return
        if not self._suppressed:
            self._window_start = self._clock()
        self._suppressed[kind] += 1

    def tick(self) -> None:
        """Log the summary if one is due (called on every message, so it's never late)."""
        if self._suppressed and self._clock() - self._window_start >= FAULT_SUMMARY_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Log what was suppressed since the last summary (also at Twilio's `stop`)."""
        if not self._suppressed:
            return
        count = sum(self._suppressed.values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in self._suppressed.most_common())
        logger.warning(
            f"Call {self._call_sid}: {count} more Media Streams messages dropped ({kinds}); "
            "warnings suppressed"
        )
        self._suppressed.clear()


class InboundGuard:
    """Screens one call's inbound messages before Pipecat's serializer decodes them."""

    def __init__(self, call_sid: str, stream_sid: str, clock: Clock = time.monotonic):
        self._call_sid = call_sid
        self._stream_sid = stream_sid
        self.faults = FaultLog(call_sid, clock)
        self._audio = TokenBucket(1.0, AUDIO_BURST_S, clock)  # seconds of audio per second
        self._keys = TokenBucket(DTMF_KEYS_PER_S, DTMF_BURST, clock)

    def screen(self, data: str | bytes) -> dict[str, Any] | None:
        """The parsed message if it may be decoded, else None (dropped or ignored)."""
        self.faults.tick()
        if not isinstance(data, str):
            return self._drop("binary frame", f"{len(data)} bytes")
        if len(data) > MAX_MEDIA_MESSAGE_BYTES:
            return self._drop("oversized", f"{len(data)} characters")
        try:
            message = parse_object(data)
        except MalformedMessage as error:
            return self._drop(error.kind, error.detail)
        return self._screen_event(message)

    def decoding_failed(self, message: Mapping[str, Any], error: Exception) -> None:
        """Pipecat's serializer raised on a message that passed `screen`."""
        self.faults.drop(f"undecodable {message.get('event')}", error_detail(error))

    def _screen_event(self, message: dict[str, Any]) -> dict[str, Any] | None:
        event = message.get("event")
        if event in SID_EVENTS and message.get("streamSid") != self._stream_sid:
            sid = describe(message.get("streamSid"))
            return self._drop("wrong streamSid", f"{event} for {sid}")
        if event == "media":
            return self._screen_media(message)
        if event == "dtmf" and not self._keys.admit(1):
            return self._drop("keys faster than a person presses them")
        if event == "stop":
            logger.debug(f"Call {self._call_sid}: Twilio sent stop")
            self.faults.flush()
        elif event not in SID_EVENTS:
            logger.debug(f"Call {self._call_sid}: ignored {describe(event)} event")
            return None
        return message

    def _screen_media(self, message: dict[str, Any]) -> dict[str, Any] | None:
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return self._drop("bad media", "no payload string")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except ValueError as error:  # binascii.Error, or non-ASCII text
            return self._drop("bad base64", error_detail(error))
        if not self._audio.admit(len(audio) / AUDIO_BYTES_PER_S):
            return self._drop("audio faster than real time")
        return message

    def _drop(self, kind: str, detail: str = "") -> None:
        self.faults.drop(kind, detail)
        return None
