"""The first half of a call: Twilio POSTs the voice webhook and reads back TwiML.

Both dial-in (the server's `/` webhook) and dial-out (the `Url` given to `calls.create`)
go through `post_webhook`, so the form fields, the signature and the error messages are the
same in both directions. Errors are `WebhookError`s with one-line, actionable messages.

Every request carries an `I-Twilio-Idempotency-Token`, and with `attempts` > 1 a request
that got no usable answer (connection refused or dropped, timeout, 5xx) is sent again with
the same token and signature, as Twilio retries its webhooks.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from phonebot.emulator.errors import (
    ServerNotRunningError,
    StreamConnectError,
    WebhookError,
    WebhookHTTPError,
)
from phonebot.emulator.ids import new_account_sid, new_call_sid
from phonebot.emulator.media_stream import MediaStreamCaller
from phonebot.emulator.signature import SharedKey, signed_headers
from phonebot.emulator.twiml import TwiML, Verb, parse_twiml, stream_url_refusal

DEFAULT_SERVER_URL = "http://127.0.0.1:8000/"
DEFAULT_FROM = "+15550001111"
DEFAULT_TO = "+15550002222"
API_VERSION = "2010-04-01"
USER_AGENT = "TwilioProxy/1.1 (phonebot emulator)"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"


def voice_webhook_form(
    *,
    call_sid: str,
    account_sid: str,
    from_: str,
    to: str,
    direction: str = "inbound",
    call_status: str = "ringing",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The form fields Twilio POSTs to a voice webhook (geography left blank, as for VoIP)."""
    form = {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": call_status,
        "Called": to,
        "CalledCountry": "US",
        "Caller": from_,
        "CallerCountry": "US",
        "Direction": direction,
        "From": from_,
        "FromCountry": "US",
        "To": to,
        "ToCountry": "US",
    }
    form.update(extra or {})
    return form


def with_query(url: str, params: Mapping[str, str] | None) -> str:
    """Append `params` to the query string of `url`, keeping what is already there."""
    if not params:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def local_stream_url(stream_url: str, webhook_url: str) -> str:
    """Where to really open the stream when the webhook was reached over plain HTTP.

    Behind ngrok the server advertises `wss://public-host/ws`, but the emulator talks to the
    server directly: keep the stream's path and query, take the host from the webhook URL,
    and use `ws`. A `ws://` stream URL, or any over an HTTPS webhook, is used unchanged.
    """
    hook, stream = urlsplit(webhook_url), urlsplit(stream_url)
    if hook.scheme != "http" or stream.scheme != "wss":
        return stream_url
    return urlunsplit(stream._replace(scheme="ws", netloc=hook.netloc))


def _forwarding_headers(post_url: str, signed_url: str) -> dict[str, str]:
    """`X-Forwarded-*` as a tunnel would add them when the signed URL is a public one."""
    posted, signed = urlsplit(post_url), urlsplit(signed_url)
    if (posted.scheme, posted.netloc) == (signed.scheme, signed.netloc):
        return {}
    return {"X-Forwarded-Proto": signed.scheme, "X-Forwarded-Host": signed.netloc}


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every webhook POST: httpx loads the CA bundle (~30 ms of CPU)
    for each new client otherwise, which stalls a load test ringing many calls at once."""
    return httpx.create_ssl_context()


def new_idempotency_token() -> str:
    """A fresh `I-Twilio-Idempotency-Token` (one per request; its retries reuse it)."""
    return str(uuid.uuid4())


async def send_signed_form(
    url: str,
    form: Mapping[str, str],
    *,
    auth_token: str | None = None,
    signed_url: str | None = None,
    timeout: float = 10.0,
    shared_key: SharedKey | None = None,
    attempts: int = 1,
    idempotency_token: str | None = None,
) -> httpx.Response:
    """POST a form as Twilio does (signed when a token or SharedKey is set).

    `signed_url` is the URL as Twilio would have seen it (e.g. the public ngrok URL) when
    `url` is the loopback address actually posted to. Up to `attempts` tries, each with the
    same `I-Twilio-Idempotency-Token` (Twilio's retry, https://www.twilio.com/docs/usage/
    webhooks/webhooks-connection-overrides), while the answer is a 5xx or none at all; the
    last answer (any status) returns. Raises `ServerNotRunningError` or `WebhookError` when
    no HTTP answer comes back at all.
    """
    headers = {
        "User-Agent": USER_AGENT,
        IDEMPOTENCY_HEADER: idempotency_token or new_idempotency_token(),
    }
    headers.update(signed_headers(auth_token, signed_url or url, form, shared_key))
    headers.update(_forwarding_headers(url, signed_url or url))
    for attempt in range(1, max(1, attempts) + 1):
        last = attempt >= attempts
        try:
            response = await _post_once(url, form, headers, timeout)
        except WebhookError:
            if last:
                raise
            continue
        if response.status_code < 500 or last:
            return response
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _post_once(
    url: str, form: Mapping[str, str], headers: Mapping[str, str], timeout: float
) -> httpx.Response:
    """One POST; a missing answer becomes `ServerNotRunningError` or `WebhookError`."""
    try:
        async with httpx.AsyncClient(
            timeout=timeout, trust_env=False, verify=_tls_context()
        ) as client:
            return await client.post(url, data=dict(form), headers=dict(headers))
    except httpx.ConnectError:
        raise ServerNotRunningError(
            f"cannot connect to {url}: is the server running? Start it first "
            "(e.g. `python server.py`) or pass --server with its URL"
        ) from None
    except httpx.TimeoutException:
        raise WebhookError(f"{url} did not answer within {timeout:g} s") from None
    except httpx.HTTPError as error:
        raise WebhookError(f"request to {url} failed: {error}") from None


async def post_webhook(
    url: str,
    form: Mapping[str, str],
    *,
    auth_token: str | None = None,
    signed_url: str | None = None,
    timeout: float = 10.0,
    shared_key: SharedKey | None = None,
    attempts: int = 1,
) -> TwiML:
    """POST a voice webhook and parse the TwiML it answers with.

    Raises `ServerNotRunningError`, `WebhookHTTPError` (non-200), `WebhookError` or
    `TwiMLError` (not TwiML).
    """
    response = await send_signed_form(
        url,
        form,
        auth_token=auth_token,
        signed_url=signed_url,
        timeout=timeout,
        shared_key=shared_key,
        attempts=attempts,
    )
    if response.status_code != 200:
        raise WebhookHTTPError(url, response.status_code, response.text)
    return parse_twiml(response.text)


@dataclass(frozen=True)
class DialIn:
    """An answered inbound call: the form sent, the TwiML received, and where to stream."""

    webhook_url: str
    form: dict[str, str]
    twiml: TwiML
    stream_url: str
    parameters: dict[str, str]

    @property
    def call_sid(self) -> str:
        return self.form["CallSid"]

    @property
    def account_sid(self) -> str:
        return self.form["AccountSid"]

    @property
    def after_stream(self) -> tuple[Verb, ...]:
        """The TwiML Twilio runs once the stream closes (the verbs after `</Connect>`)."""
        return self.twiml.after_stream

    def caller(self, **kwargs: Any) -> MediaStreamCaller:
        """A `MediaStreamCaller` for this call's stream (kwargs go to its constructor).

        It runs the TwiML after `</Connect>` when the server closes the stream, as Twilio.
        """
        kwargs.setdefault("after_stream", self.after_stream)
        return MediaStreamCaller(
            self.stream_url,
            parameters=self.parameters,
            call_sid=self.call_sid,
            account_sid=self.account_sid,
            **kwargs,
        )


async def dial_in(
    url: str = DEFAULT_SERVER_URL,
    *,
    from_: str = DEFAULT_FROM,
    to: str = DEFAULT_TO,
    auth_token: str | None = None,
    account_sid: str | None = None,
    call_sid: str | None = None,
    query: Mapping[str, str] | None = None,
    signed_url: str | None = None,
    rewrite_stream_url: bool = True,
    timeout: float = 10.0,
    shared_key: SharedKey | None = None,
    attempts: int = 1,
) -> DialIn:
    """Ring the server: POST its voice webhook like Twilio and return where to stream.

    `query` pairs are appended to the webhook URL (how a number's webhook carries custom
    settings). `shared_key` signs as a Webhooks signing rule would; `attempts` > 1 retries
    like Twilio. Raises `NoStreamError` when the TwiML has no `<Connect><Stream>`, and
    `StreamConnectError` for a stream URL Twilio would refuse (error 31922: not wss://).
    """
    target = with_query(url, query)
    form = voice_webhook_form(
        call_sid=call_sid or new_call_sid(),
        account_sid=account_sid or new_account_sid(),
        from_=from_,
        to=to,
    )
    signed = with_query(signed_url, query) if signed_url else None
    twiml = await post_webhook(
        target,
        form,
        auth_token=auth_token,
        signed_url=signed,
        timeout=timeout,
        shared_key=shared_key,
        attempts=attempts,
    )
    stream = twiml.require_stream()
    if refusal := stream_url_refusal(stream.url):
        raise StreamConnectError(refusal)
    stream_url = local_stream_url(stream.url, target) if rewrite_stream_url else stream.url
    return DialIn(target, form, twiml, stream_url, dict(stream.parameters))
