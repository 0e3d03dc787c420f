"""Errors the emulator raises, each with a one-line message fit for a terminal.

They share `EmulatorError` so the CLI can turn any of them into a clean exit code, and
tests can assert on the exact kind of failure.
"""

from __future__ import annotations

from phonebot.emulator.result import CallResult


class EmulatorError(Exception):
    """Base class: something about the call went wrong in a way worth a clear message."""


class TwiMLError(EmulatorError):
    """The server's TwiML could not be parsed or lacks what the emulator needs."""


class NoStreamError(TwiMLError):
    """The TwiML has no `<Connect><Stream>`, so there is nothing to stream to."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("TwiML has no <Connect><Stream>" + (f" ({detail})" if detail else ""))


class WebhookError(EmulatorError):
    """The voice webhook request failed."""


class ServerNotRunningError(WebhookError):
    """Nothing listens at the server URL (connection refused or unreachable)."""


class WebhookHTTPError(WebhookError):
    """The webhook answered with a non-200 status; `status` and `body` say what it said."""

    def __init__(self, url: str, status: int, body: str) -> None:
        snippet = " ".join(body.split())[:300]
        super().__init__(f"{url} answered HTTP {status}: {snippet or '(empty body)'}")
        self.url = url
        self.status = status
        self.body = body


class CallFailedError(EmulatorError):
    """The media-stream call ended badly; `result` holds everything recorded until then."""

    def __init__(self, message: str, result: CallResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class StreamConnectError(CallFailedError):
    """The websocket to the stream URL could not be opened."""


class StreamClosedError(CallFailedError):
    """The server closed the media stream before the caller's script had finished."""


class NoBotAudioError(CallFailedError):
    """The bot sent no (non-silent) audio within the allowed time."""


class ExpectationError(CallFailedError):
    """A scripted expectation (e.g. that the server hangs up) was not met in time."""
