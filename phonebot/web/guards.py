"""HTTP guards: what the server refuses before a request can cost anything.

Cheap, in-process checks in front of the routes (call admission and replays, which must
hold across processes, are in `phonebot.state`):

- `BodySizeLimit` (ASGI middleware): a request body over `MAX_REQUEST_BODY_BYTES` gets 413
  before the form or JSON is parsed: at once when `Content-Length` says so, else as soon
  as the streamed (chunked) bytes pass the cap. Twilio's voice webhook forms are ~1 KB.
- `client_ip`: who is asking, believing `X-Forwarded-For` only for TRUSTED_PROXY_HOPS.
- `limit_dialout_rate`: the `/dialout` dependency over the app's shared token buckets
  (`phonebot.state.ratelimit`, so the limit holds across processes).
- `refuse_locked_out` / `note_failed_key`: every key check (ADMIN_API_KEY, DIALOUT_API_KEY,
  METRICS_TOKEN, the calls page's login) asks first whether the client is locked out after
  AUTH_FAILURE_LIMIT failures, and reports its failures (the app's `auth_lockout`).

Refusals are noted in the app's `RejectionLog` (`phonebot.web.rejections`), as summaries so
a flood can't flood the log; what each guard reads comes from the app's services
(`phonebot.web.services`).

No failure rate limit sits in front of the webhooks (keys are another matter: a guess
costs the guesser, never Twilio, which sends no key). A request without a signature is
refused before its body is read, costing about what `GET /health` does; a badly signed
or replayed one adds a form parse and an HMAC (~0.25 ms). A per-IP penalty box could
save that part, but behind ngrok or a proxy, where Twilio and an attacker share one
address, it would refuse Twilio too and turn a flood into a denial of service; a global
one would do that for any attacker. So flood resistance comes from every refusal being
cheap and starting nothing, and refusals are logged as summaries (`RejectionLog`).
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phonebot.state import StateUnavailable
from phonebot.state.token_bucket import RateLimiter, TokenBucket
from phonebot.web.services import services_of

__all__ = [
    "BodySizeLimit",
    "RateLimiter",
    "TokenBucket",
    "client_ip",
    "limit_dialout_rate",
    "locked_out_for",
    "note_failed_key",
    "refuse_locked_out",
    "retry_after_header",
]


# --- request bodies ----------------------------------------------------------------


@dataclass(frozen=True)
class BodyCap:
    """A body-size cap and the setting that sets it (named in the 413)."""

    limit: int
    setting: str = "MAX_REQUEST_BODY_BYTES"


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the cap; FastAPI answers 413."""

    def __init__(self, cap: BodyCap):
        super().__init__(413, body_too_large_detail(cap))


def body_too_large_detail(cap: BodyCap) -> str:
    return f"request body is larger than {cap.limit} bytes ({cap.setting})"


class BodySizeLimit:
    """ASGI middleware: 413 for an HTTP request body over `limit` bytes, before parsing.

    Pure ASGI rather than a FastAPI dependency, so it runs before any route reads the
    body and also covers bodies with no `Content-Length` (chunked), whose bytes are
    counted as they arrive. Websockets are left alone (uvicorn's `ws_max_size` bounds
    their messages). `per_path` gives a route its own cap: a campaign's contact list
    (`POST /campaigns`, up to MAX_CAMPAIGN_CONTACTS rows) is far bigger than a webhook.
    """

    def __init__(
        self, app: ASGIApp, limit: int, per_path: Mapping[str, BodyCap] | None = None
    ):
        self.app = app
        self.default = BodyCap(limit)
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.per_path.get(scope.get("path", ""), self.default)
        if declared_length(scope) > cap.limit:
            await self._refuse(cap, scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counting(receive, cap), tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(cap, scope, receive, send)

    @staticmethod
    def _counting(receive: Receive, cap: BodyCap) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap.limit:
                    raise BodyTooLarge(cap)
            return message

        return counted

    @staticmethod
    async def _refuse(cap: BodyCap, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": body_too_large_detail(cap)},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def declared_length(scope: Scope) -> int:
    """The request's Content-Length, 0 when absent; an unparsable one counts as huge."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 2**62
    return 0


# --- who is asking -----------------------------------------------------------------


def client_ip(request: Request, trusted_proxy_hops: int) -> str:
    """The client's address, for per-client limits.

    `X-Forwarded-For` is only believed when TRUSTED_PROXY_HOPS says proxies we run sit in
    front (ngrok: 1). Each proxy appends the address it saw, so the trustworthy entry is
    the hops-th from the right; anything left of it was written by the client itself.
    """
    peer = request.client.host if request.client else "unknown"
    if trusted_proxy_hops <= 0:
        return peer
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if len(hops) < trusted_proxy_hops:
        return hops[0] if hops else peer
    return hops[-trusted_proxy_hops]


# --- rate limits -------------------------------------------------------------------


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; round up so a client retrying on time succeeds."""
    return str(max(1, math.ceil(seconds)))


async def limit_dialout_rate(request: Request) -> None:
    """Dependency for `/dialout`: 429 with Retry-After when the client's bucket is empty.

    It runs before the key check, so guessing the key is rate-limited too; a client
    behind the same untrusted proxy as others shares their bucket (see `client_ip`). The
    buckets are shared by every process (Redis); when they can't be reached the request
    gets 503 (`StateUnavailable`, answered by `phonebot.web.errors`), never an unlimited
    dial-out.
    """
    services = services_of(request)
    limiter = services.dialout_limiter
    client = client_ip(request, services.settings.trusted_proxy_hops)
    wait_s = await limiter.retry_after(client)
    if not wait_s:
        return
    services.rejections.note(f"429 /dialout rate limit for {client}")
    retry = retry_after_header(wait_s)
    raise HTTPException(
        429,
        f"rate limit: {limiter.burst} dial-outs at once, then {limiter.per_minute:g} per "
        f"minute per client (DIALOUT_RATE_LIMIT_BURST, DIALOUT_RATE_LIMIT_PER_MINUTE); "
        f"retry in {retry} s",
        headers={"Retry-After": retry},
    )


# --- failed key checks -------------------------------------------------------------


async def locked_out_for(request: Request) -> tuple[str, float]:
    """(client, seconds it stays locked out, 0 when it isn't), before any key is compared.

    With the shared state unreachable the lockout is skipped, not the key: it is a brake
    on guessing, and `/metrics` (and the records API, which needs no Redis) must still
    answer a right key during a Redis outage (counted by the state's `on_error`).
    """
    services = services_of(request)
    client = client_ip(request, services.settings.trusted_proxy_hops)
    try:
        return client, await services.auth_lockout.locked_for(client)
    except StateUnavailable as error:
        logger.debug(f"Lockout of {client} not checked: {error}")
        return client, 0.0


async def refuse_locked_out(request: Request) -> str:
    """429 with Retry-After while the client is locked out, whatever key it sends (else the
    one answer that isn't a 429 would tell a guesser it was right); returns the client."""
    client, wait_s = await locked_out_for(request)
    if wait_s:
        raise HTTPException(
            429, locked_out_detail(wait_s), headers={"Retry-After": retry_after_header(wait_s)}
        )
    return client


def locked_out_detail(wait_s: float) -> str:
    return (
        "too many failed key checks from this client (AUTH_FAILURE_LIMIT, AUTH_LOCKOUT_S): "
        f"retry in {retry_after_header(wait_s)} s"
    )


def same_key(given: str, expected: str) -> bool:
    """Constant time, on bytes: a non-ASCII key is a mismatch, where `hmac.compare_digest`
    on `str` would raise (and a crafted key would be a 500)."""
    return hmac.compare_digest(given.encode(), expected.encode())


async def key_matches(request: Request, given: str | None, expected: str) -> bool:
    """Whether the key a request sent is `expected`, through the failed-key lockout.

    No key (`None`) is no guess: False, not counted. A locked-out client gets 429 whatever
    it sends (`refuse_locked_out`); a wrong key is counted (`note_failed_key`).
    """
    if given is None:
        return False
    client = await refuse_locked_out(request)
    if same_key(given, expected):
        return True
    await note_failed_key(request, client)
    return False


async def note_failed_key(request: Request, client: str) -> None:
    """Count a wrong key from `client`; the failure that locks it out is logged (once per
    lockout, through the app's flood-proof RejectionLog)."""
    services = services_of(request)
    lockout = services.auth_lockout
    try:
        if not await lockout.failed(client):
            return
    except StateUnavailable as error:  # as in `locked_out_for`: the key was still refused
        logger.debug(f"Failed key check of {client} not counted: {error}")
        return
    what = f"429 {client} locked out for {lockout.lockout_s:g} s after failed key checks"
    services.rejections.note(f"{what} (last: {request.url.path})")

