"""Talking to Twilio's REST API with the official `twilio` client.

One constructor for the client, so the `TWILIO_API_BASE_URL` override (a Twilio-compatible
endpoint on loopback, such as the project's emulator) applies to every REST call, and one
error type that the HTTP layer turns into a 502 carrying Twilio's code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from phonebot.config import Settings

REST_TIMEOUT_S = 10.0


class TwilioUnavailable(RuntimeError):
    """Twilio refused or failed a REST call; carries what Twilio said, never a traceback."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True)
class CreatedCall:
    sid: str
    status: str
    to: str


def amd_arguments(callback_url: str | None) -> dict[str, str]:
    """`calls.create` arguments for async AMD that waits for the end of a machine's greeting.

    `DetectMessageEnd` makes Twilio call back after the beep, the moment to leave a
    message; `async_amd` connects the call at once, so a human isn't kept waiting.
    """
    if callback_url is None:
        return {}
    return {
        "machine_detection": "DetectMessageEnd",
        "async_amd": "true",  # the client sends it as given; Twilio wants "true"
        "async_amd_status_callback": callback_url,
        "async_amd_status_callback_method": "POST",
    }


@asynccontextmanager
async def twilio_client(settings: Settings) -> AsyncIterator[Client]:
    """An async Twilio client aimed at TWILIO_API_BASE_URL; closes its HTTP session.

    Any REST failure inside the block comes out as `TwilioUnavailable`.
    """
    credentials = settings.twilio_credentials
    if credentials is None:
        raise TwilioUnavailable("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set")
    http_client = AsyncTwilioHttpClient(timeout=REST_TIMEOUT_S)
    client = Client(*credentials, http_client=http_client)
    client.api.base_url = settings.twilio_api_base_url.rstrip("/")
    try:
        yield client
    except TwilioRestException as error:
        raise TwilioUnavailable(error.msg, code=error.code, status=error.status) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        raise TwilioUnavailable(f"Twilio REST API unreachable: {error}") from None
    finally:
        await http_client.close()


async def create_call(
    settings: Settings,
    *,
    to: str,
    from_: str,
    twiml_url: str,
    amd_callback_url: str | None = None,
) -> CreatedCall:
    """`calls.create` with a TwiML URL; Twilio fetches it (signed) once the call connects.

    With `amd_callback_url`, Twilio also runs answering-machine detection in the
    background (the call is not held up) and POSTs its verdict there, signed.
    """
    async with twilio_client(settings) as client:
        call = await client.calls.create_async(
            to=to, from_=from_, url=twiml_url, method="POST", **amd_arguments(amd_callback_url)
        )
    return CreatedCall(sid=call.sid or "", status=call.status or "queued", to=call.to or to)


async def update_call_twiml(settings: Settings, call_sid: str, twiml: str) -> None:
    """Replace a live call's TwiML (`calls(sid).update(twiml=…)`)."""
    async with twilio_client(settings) as client:
        await client.calls(call_sid).update_async(twiml=twiml)
