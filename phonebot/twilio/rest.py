"""Talking to Twilio's REST API with the official `twilio` client, and riding out its failures.

One constructor for the client, so the `TWILIO_API_BASE_URL` override (a Twilio-compatible
endpoint on loopback, such as the project's emulator) applies to every REST call, and one
error type that the HTTP layer turns into a 502 carrying Twilio's code and message.

Twilio has bad minutes: 5xx answers, 429s, requests that hang. One retry policy decides
what happens then, by whether the operation is safe to repeat:

- hang-up (`Status=completed`) and transfer (new TwiML replaces the old, so a repeat puts
  the caller in the same place) are retried on 429, 5xx, timeouts and network errors, with
  exponential backoff and jitter, a bounded number of times. A hang-up answered with 404
  means the call is already over: that is success.
- `calls.create` is not: if the request may have reached Twilio, a second one could ring a
  person twice. It is retried only when no connection was ever made (refused, DNS, connect
  timeout); otherwise it fails at once, saying whether the call may exist.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from loguru import logger
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from phonebot.config import DEFAULT_TWILIO_API_BASE_URL, Settings, mask

T = TypeVar("T")

# Answers that say "not now" rather than "no": worth another try when repeating is safe.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Answers after which Twilio may have done the work anyway (it failed while, or after, acting).
UNCERTAIN_STATUSES = frozenset({500, 502, 504})
# 20404: no such call (any more); 21220: the call is not in progress. Either way it is over.
CALL_ALREADY_ENDED_CODES = frozenset({20404, 21220})
# A connect that takes longer than this (capped at half the request timeout) is given up
# as a connect timeout: the one kind of timeout that proves the request never left.
CONNECT_TIMEOUT_CAP_S = 3.0
TWILIO_ERRORS = (
    TwilioRestException,
    TwilioServiceException,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)


class TwilioUnavailable(RuntimeError):
    """Twilio refused or failed a REST call; carries what Twilio said, never a traceback.

    `uncertain` is True when the request may have reached Twilio and taken effect (no
    answer in time, connection lost mid-request, a 500/502/504), so repeating it blindly
    could act twice. `detail` is the one-line account for people (logs, HTTP 502, CLI).
    """

    def __init__(
        self,
        message: str,
        code: int | None = None,
        status: int | None = None,
        *,
        uncertain: bool = False,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.uncertain = uncertain
        self.detail = detail or message


@dataclass(frozen=True)
class RetryPolicy:
    """How long one REST request may take, and how often a failed one is tried again."""

    attempts: int = 3
    timeout_s: float = 10.0
    base_delay_s: float = 0.25
    max_delay_s: float = 2.0
    # ± this fraction of each wait, so calls that failed together don't retry in step.
    jitter: float = 0.5
    # A 429/503 `Retry-After` up to this is honoured; a longer one ends the retries.
    max_retry_after_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(attempts=settings.twilio_rest_attempts, timeout_s=settings.twilio_rest_timeout_s)

    @property
    def worst_case_s(self) -> float:
        """Longest one operation can take: every attempt times out, every wait is longest.

        What anything waiting on a hang-up (e.g. a draining shutdown) should allow for.
        """
        longest_wait = max(self.max_delay_s * (1 + self.jitter), self.max_retry_after_s)
        return self.attempts * self.timeout_s + (self.attempts - 1) * longest_wait

    @property
    def connect_timeout_s(self) -> float:
        return min(CONNECT_TIMEOUT_CAP_S, self.timeout_s / 2)

    def backoff(self, attempt: int) -> float:
        """Wait after failed attempt number `attempt` (1-based): doubling, capped, jittered."""
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return delay * (1 + random.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True)
class TwilioAccount:
    """Whose REST API to call, and where (`TWILIO_API_BASE_URL`; None = Twilio's)."""

    account_sid: str
    auth_token: str = field(repr=False)
    base_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioAccount:
        credentials = settings.twilio_credentials
        if credentials is None:
            raise TwilioUnavailable("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set")
        return cls(*credentials, base_url=settings.twilio_api_base_url)


@dataclass(frozen=True)
class CreatedCall:
    sid: str
    status: str
    to: str


@dataclass(frozen=True)
class _Failure:
    """One failed attempt, classified for the retry decision and the final error."""

    what: str  # for people: "Twilio is unavailable (HTTP 503)", "Twilio did not answer …"
    message: str
    retryable: bool  # transient: another try may succeed
    never_sent: bool  # the request certainly did not reach Twilio
    status: int | None = None
    code: int | None = None
    retry_after: float | None = None

    @property
    def uncertain(self) -> bool:
        if self.never_sent:
            return False
        return self.status is None or self.status in UNCERTAIN_STATUSES

    def error(self, attempts: int) -> TwilioUnavailable:
        what = self.what if attempts == 1 else f"{self.what}, after {attempts} attempts"
        return TwilioUnavailable(
            self.message, self.code, self.status, uncertain=self.uncertain, detail=what
        )


class _TimedHttpClient(AsyncTwilioHttpClient):
    """Twilio's aiohttp client, with timeouts that apply and the last answer's headers.

    The stock client hands aiohttp `timeout=None` unless each call passes one, which
    aiohttp reads as "no timeout at all": a stalled Twilio would hold a dial-out forever.
    The separate connect timeout turns a connect that stalls into a `ConnectionTimeoutError`,
    which (unlike a read timeout) proves the request never left. The headers are kept for
    `Retry-After`, which `TwilioRestException` drops.
    """

    def __init__(self, policy: RetryPolicy):
        super().__init__(pool_connections=False, timeout=policy.timeout_s)
        timeout = aiohttp.ClientTimeout(total=policy.timeout_s, connect=policy.connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout)
        self.last_headers: dict[str, str] = {}

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """One request with the session's timeouts (the per-call `timeout` is not used)."""
        self.last_headers = {}
        async with self.session.request(
            method.upper(),
            url,
            params=params,
            data=data,
            headers=headers,
            auth=aiohttp.BasicAuth(*auth) if auth else None,
            allow_redirects=allow_redirects,
        ) as response:
            text = await response.text()
            self.last_headers = dict(response.headers)
        return Response(response.status, text, response.headers)


@asynccontextmanager
async def _client(
    account: TwilioAccount, policy: RetryPolicy
) -> AsyncIterator[tuple[Client, _TimedHttpClient]]:
    """An async Twilio client aimed at the account's base URL; closes its HTTP session."""
    http_client = _TimedHttpClient(policy)
    client = Client(account.account_sid, account.auth_token, http_client=http_client)
    client.api.base_url = (account.base_url or DEFAULT_TWILIO_API_BASE_URL).rstrip("/")
    try:
        yield client, http_client
    finally:
        await http_client.close()


def _retry_after(headers: dict[str, str]) -> float | None:
    """`Retry-After` in seconds; None when absent or an HTTP date (not worth parsing)."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def _classify(error: Exception, http: _TimedHttpClient, policy: RetryPolicy) -> _Failure:
    """What went wrong, for the retry decision: Twilio's answer, or which network failure."""
    if isinstance(error, TwilioRestException | TwilioServiceException):
        status = int(error.status)
        message = error.msg if isinstance(error, TwilioRestException) else error.title
        code = error.code
        suffix = f", error {code}" if code and code != status else ""
        return _Failure(
            f"{_verdict(status)} (HTTP {status}{suffix})",
            message,
            retryable=status in RETRYABLE_STATUSES,
            never_sent=False,
            status=status,
            code=code,
            retry_after=_retry_after(http.last_headers) if status in (429, 503) else None,
        )
    if isinstance(error, aiohttp.ClientSSLError):  # a certificate problem won't pass by
        return _Failure(f"TLS with Twilio failed: {error}", str(error), False, True)
    if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        what = f"Twilio's REST API could not be reached: {error}"
        return _Failure(what, str(error), retryable=True, never_sent=True)
    if isinstance(error, TimeoutError):
        what = f"Twilio did not answer within {policy.timeout_s:g} s"
        return _Failure(what, what, retryable=True, never_sent=False)
    what = f"the connection to Twilio broke before its answer ({type(error).__name__})"
    return _Failure(what, f"{what}: {error}", retryable=True, never_sent=False)


def _verdict(status: int) -> str:
    """Twilio's HTTP status in words."""
    if status == 429:
        return "Twilio is rate-limiting requests"
    if status == 503:
        return "Twilio is unavailable"
    if status >= 500:
        return "Twilio failed"
    return "Twilio refused the request"


def _next_delay(
    failure: _Failure, attempt: int, policy: RetryPolicy, *, idempotent: bool
) -> float | None:
    """Seconds to wait before trying again, or None to give up now."""
    if attempt >= policy.attempts or not failure.retryable:
        return None
    if not (idempotent or failure.never_sent):
        return None  # it may have reached Twilio: repeating could act twice
    delay = policy.backoff(attempt)
    if failure.retry_after is not None:
        if failure.retry_after > policy.max_retry_after_s:
            return None  # Twilio asks for longer than we are prepared to wait
        delay = max(delay, failure.retry_after)
    return delay


async def _call_twilio(
    account: TwilioAccount,
    policy: RetryPolicy,
    operation: str,
    subject: str,
    request: Callable[[Client], Awaitable[T]],
    *,
    idempotent: bool,
) -> T:
    """Run `request`, retrying as `policy` and `idempotent` allow; each retry is logged.

    `subject` names what is acted on, masked ("of call …3f2a"); raises `TwilioUnavailable`.
    """
    async with _client(account, policy) as (client, http):
        attempt = 1
        while True:
            try:
                return await request(client)
            except TWILIO_ERRORS as error:
                failure = _classify(error, http, policy)
            delay = _next_delay(failure, attempt, policy, idempotent=idempotent)
            if delay is None:
                raise failure.error(attempt) from None
            logger.warning(
                f"Twilio {operation} {subject}: attempt {attempt}/{policy.attempts} failed "
                f"({failure.what}); retrying in {delay:.2f} s"
            )
            await asyncio.sleep(delay)
            attempt += 1


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


async def create_call(
    settings: Settings,
    *,
    to: str,
    from_: str,
    twiml_url: str,
    amd_callback_url: str | None = None,
    status_callback_url: str | None = None,
    ring_timeout_s: int | None = None,
    policy: RetryPolicy | None = None,
) -> CreatedCall:
    """`calls.create` with a TwiML URL; Twilio fetches it (signed) once the call connects.

    With `amd_callback_url`, Twilio also runs answering-machine detection in the
    background (the call is not held up) and POSTs its verdict there, signed. With
    `status_callback_url`, Twilio POSTs (signed) the call's progress there: initiated,
    ringing, answered, and completed with the final CallStatus (busy, no-answer, … for a
    call that never connected; https://www.twilio.com/docs/voice/api/call-resource).
    `ring_timeout_s` is how long it rings before Twilio gives up with no-answer (its
    `Timeout`, 60 s when not given). Not
    idempotent: retried only when Twilio was never reached; the error's `detail` says
    whether the call may have been placed.
    """
    arguments: dict[str, Any] = {"to": to, "from_": from_, "url": twiml_url, "method": "POST"}
    arguments.update(amd_arguments(amd_callback_url))
    if ring_timeout_s is not None:
        arguments["timeout"] = ring_timeout_s
    if status_callback_url is not None:
        arguments.update(
            status_callback=status_callback_url,
            status_callback_event=["initiated", "ringing", "answered", "completed"],
            status_callback_method="POST",
        )

    async def create(client: Client) -> Any:
        return await client.calls.create_async(**arguments)

    try:
        call = await _call_twilio(
            TwilioAccount.from_settings(settings),
            policy or RetryPolicy.from_settings(settings),
            "dial-out",
            f"to {mask(to)}",
            create,
            idempotent=False,
        )
    except TwilioUnavailable as error:
        error.detail = f"{error.detail}; {_placed(error)}"
        raise
    return CreatedCall(sid=call.sid or "", status=call.status or "queued", to=call.to or to)


def _placed(error: TwilioUnavailable) -> str:
    if error.uncertain:
        return "the call may have been placed: check the Twilio console before retrying"
    return "the call was not placed"


async def update_call_twiml(
    settings: Settings, call_sid: str, twiml: str, *, policy: RetryPolicy | None = None
) -> None:
    """Replace a live call's TwiML (`calls(sid).update(twiml=…)`), e.g. for a transfer.

    Repeating it leaves the call on the same TwiML, so transient failures are retried.
    """

    async def update(client: Client) -> Any:
        return await client.calls(call_sid).update_async(twiml=twiml)

    await _call_twilio(
        TwilioAccount.from_settings(settings),
        policy or RetryPolicy.from_settings(settings),
        "transfer",
        f"of call {mask(call_sid)}",
        update,
        idempotent=True,
    )


async def hang_up_call(
    account: TwilioAccount, call_sid: str, *, policy: RetryPolicy | None = None
) -> bool:
    """Complete a call (`Status=completed`); True once it is over, False if Twilio failed.

    Never raises for a REST failure: it runs as the pipeline ends, and the caller is best
    served by the pipeline finishing. A 404 ("no such call") means it already ended.
    """
    subject = f"of call {mask(call_sid)}"

    async def complete(client: Client) -> Any:
        return await client.calls(call_sid).update_async(status="completed")

    try:
        await _call_twilio(
            account, policy or RetryPolicy(), "hang-up", subject, complete, idempotent=True
        )
    except TwilioUnavailable as error:
        if error.status == 404 or error.code in CALL_ALREADY_ENDED_CODES:
            logger.info(f"Twilio hang-up {subject}: the call had already ended")
            return True
        logger.error(
            f"Twilio hang-up {subject} failed: {error.detail}: {error.message}. "
            "Twilio ends the call when its TwiML runs out"
        )
        return False
    logger.info(f"Twilio hang-up {subject}: call completed")
    return True
