"""Twilio on your laptop: the voice webhook, Media Streams and REST API with scripted callees,
used by `python -m phonebot.call`, `python -m phonebot.emulator twilio` and the tests."""

from phonebot.emulator.callees import Callee, CalleeBook
from phonebot.emulator.calls import EmulatedCall
from phonebot.emulator.errors import (
    CallFailedError,
    EmulatorError,
    ExpectationError,
    NoBotAudioError,
    NoStreamError,
    ServerNotRunningError,
    StreamClosedError,
    StreamConnectError,
    TwiMLError,
    WebhookError,
    WebhookHTTPError,
)
from phonebot.emulator.media_stream import MediaStreamCaller
from phonebot.emulator.rest import RecordedRequest, TwilioRestEmulator
from phonebot.emulator.result import (
    CallEvent,
    CallResult,
    ClearRecord,
    CloseInfo,
    MarkRecord,
    Utterance,
)
from phonebot.emulator.script import (
    Dtmf,
    Hangup,
    Menu,
    Pause,
    Speak,
    Step,
    WaitForBot,
    WaitForHangup,
)
from phonebot.emulator.signature import compute_signature, validate_signature
from phonebot.emulator.twiml import StreamTarget, TwiML, parse_twiml
from phonebot.emulator.webhook import DialIn, dial_in, post_webhook, voice_webhook_form

__all__ = [
    "CallEvent",
    "Callee",
    "CalleeBook",
    "CallFailedError",
    "CallResult",
    "ClearRecord",
    "CloseInfo",
    "DialIn",
    "Dtmf",
    "EmulatedCall",
    "EmulatorError",
    "ExpectationError",
    "Hangup",
    "MarkRecord",
    "MediaStreamCaller",
    "Menu",
    "NoBotAudioError",
    "NoStreamError",
    "Pause",
    "RecordedRequest",
    "ServerNotRunningError",
    "Speak",
    "Step",
    "StreamClosedError",
    "StreamConnectError",
    "StreamTarget",
    "TwiML",
    "TwiMLError",
    "TwilioRestEmulator",
    "Utterance",
    "WaitForBot",
    "WaitForHangup",
    "WebhookError",
    "WebhookHTTPError",
    "compute_signature",
    "dial_in",
    "parse_twiml",
    "post_webhook",
    "validate_signature",
    "voice_webhook_form",
]
