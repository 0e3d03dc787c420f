"""What the server refuses before a request or a call can cost anything.

Everything here is in-process, in memory, and bounded, because it runs in front of the
paid services and must stay cheap while being flooded:

- `BodySizeLimit` (ASGI middleware): a request body over `MAX_REQUEST_BODY_BYTES` gets 413
  before the form or JSON is parsed: at once when `Content-Length` says so, else as soon
  as the streamed (chunked) bytes pass the cap. Twilio's voice webhook forms are ~1 KB.
- `ReplayGuard`: a signed webhook may be used once. Keys are the CallSid (covered by the
  signature, so a captured request can't be altered to dodge it) and Twilio's
  `I-Twilio-Idempotency-Token` header (not signed, so only a second line of defence).
  Twilio's own retries: Twilio retries a webhook when it got no usable answer (could not
  connect, timed out, or, with connection overrides, a 5xx), and every try carries the
  same `I-Twilio-Idempotency-Token`. A request that never reached us is not remembered,
  and one that failed here with an exception is forgotten, so both retries are answered
  afresh. A retry of a request we *did* answer (its answer lost on the way) gets that
  same answer again (`answer_for_retry`: same TwiML, same stream token, no second call
  reservation) within WEBHOOK_RETRY_WINDOW_S; a replay with another or no idempotency
  token, or after the window, still gets 409.
- `RateLimiter`: token buckets per client IP (for `/dialout`), in an LRU table.
- `CallAdmission`: counts live calls plus *reservations* (a webhook that handed out a
  `<Connect><Stream>` holds a slot until its stream connects or `CALL_RESERVATION_TTL_S`
  passes), so a burst of webhooks can't overshoot MAX_CONCURRENT_CALLS before any stream
  connects; makes the per-call stream token single-use; and knows when we are draining.

No failure rate limit sits in front of the webhooks. A request without a signature is
refused before its body is read, costing about what `GET /health` does; a badly signed
or replayed one adds a form parse and an HMAC (~0.25 ms). A per-IP penalty box could
save that part, but behind ngrok or a proxy, where Twilio and an attacker share one
address, it would refuse Twilio too and turn a flood into a denial of service; a global
one would do that for any attacker. So flood resistance comes from every refusal being
cheap and starting nothing, and refusals are logged as summaries (`RejectionLog`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from fastapi import Request
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phonebot.config import Settings

if TYPE_CHECKING:
    from phonebot.session import CallSession

# Clients tracked by a RateLimiter; beyond this the least recently seen is forgotten.
MAX_TRACKED_CLIENTS = 10_000
IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"
IDLE_POLL_S = 0.1

Clock = Callable[[], float]
V = TypeVar("V")


# --- request bodies ----------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the cap; FastAPI answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, body_too_large_detail(limit))


def body_too_large_detail(limit: int) -> str:
    return f"request body is larger than {limit} bytes (MAX_REQUEST_BODY_BYTES)"


class BodySizeLimit:
    """ASGI middleware: 413 for an HTTP request body over `limit` bytes, before parsing.

    Pure ASGI rather than a FastAPI dependency, so it runs before any route reads the
    body and also covers bodies with no `Content-Length` (chunked), whose bytes are
    counted as they arrive. Websockets are left alone (uvicorn's `ws_max_size` bounds
    their messages).
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_length(scope) > self.limit:
            await self._refuse(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counting(receive), tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return counted

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": body_too_large_detail(self.limit)},
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


class TokenBucket:
    """Refills at `rate` per second up to `burst`; `admit(cost)` spends it or refuses.

    Used per client for `/dialout`, and per call in audio seconds (rate 1: real time)
    and key presses (`phonebot.stream_guard`). A legit peer averages
    at most the rate, so only one sending faster, beyond the burst, is ever refused.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic):
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def admit(self, cost: float) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if cost > self._tokens:
            return False
        self._tokens -= cost
        return True

    def wait_s(self, cost: float) -> float:
        """After a refused `admit(cost)`: seconds until `cost` would be admitted."""
        return max(0.0, cost - self._tokens) / self._rate


class RateLimiter:
    """One token bucket per key: `burst` requests at once, refilled at `per_minute`.

    The table is an LRU of at most `max_keys` buckets, so a scan from many addresses
    costs bounded memory; a forgotten key simply starts again with a full bucket.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        max_keys: int = MAX_TRACKED_CLIENTS,
        clock: Clock = time.monotonic,
    ):
        self.per_minute = per_minute
        self.burst = burst
        self._rate = per_minute / 60.0
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def retry_after(self, key: str) -> float:
        """Take a token for `key`: 0 when allowed, else seconds until one is available."""
        bucket = self._bucket(key)
        return 0.0 if bucket.admit(1) else bucket.wait_s(1)

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.pop(key, None) or TokenBucket(self._rate, self.burst, self._clock)
        self._buckets[key] = bucket
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; round up so a client retrying on time succeeds."""
    return str(max(1, math.ceil(seconds)))


async def limit_dialout_rate(request: Request) -> None:
    """Dependency for `/dialout`: 429 with Retry-After when the client's bucket is empty.

    It runs before the key check, so guessing the key is rate-limited too; a client
    behind the same untrusted proxy as others shares their bucket (see `client_ip`).
    """
    settings: Settings = request.app.state.settings
    limiter: RateLimiter = request.app.state.dialout_limiter
    client = client_ip(request, settings.trusted_proxy_hops)
    wait_s = limiter.retry_after(client)
    if not wait_s:
        return
    request.app.state.rejections.note(f"429 /dialout rate limit for {client}")
    retry = retry_after_header(wait_s)
    raise HTTPException(
        429,
        f"rate limit: {limiter.burst} dial-outs at once, then {limiter.per_minute:g} per "
        f"minute per client (DIALOUT_RATE_LIMIT_BURST, DIALOUT_RATE_LIMIT_PER_MINUTE); "
        f"retry in {retry} s",
        headers={"Retry-After": retry},
    )


# --- replays -----------------------------------------------------------------------


class TTLMap(Generic[V]):
    """Values remembered for `ttl_s`, at most `max_entries` of them (oldest dropped first)."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Clock = time.monotonic):
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        self._purge()
        return key in self._entries

    def get(self, key: str) -> V | None:
        self._purge()
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def put(self, key: str, value: V) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + self._ttl_s, value)
        self._purge()

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        self._purge()
        return len(self._entries)

    def _purge(self) -> None:
        """Drop expired keys (all at the front: insertion order is expiry order)."""
        now = self._clock()
        while self._entries and next(iter(self._entries.values()))[0] <= now:
            self._entries.popitem(last=False)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class TTLSet(TTLMap[bool]):
    """Keys remembered for `ttl_s`, at most `max_entries` of them (oldest dropped first)."""

    def add(self, key: str) -> None:
        self.put(key, True)


@dataclass(frozen=True)
class WebhookAnswer:
    """What we answered one signed webhook with, to answer Twilio's retry of it alike."""

    path: str
    call_sid: str
    body: str


class ReplayGuard:
    """Each signed webhook is answered once (see the module docstring for Twilio retries).

    `retry_window_s` (WEBHOOK_RETRY_WINDOW_S, at most `ttl_s`) is how long an answer is
    kept for Twilio's retry of the same request.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Clock = time.monotonic,
        retry_window_s: float | None = None,
    ):
        self._seen = TTLSet(ttl_s, max_entries, clock)
        window = ttl_s if retry_window_s is None else min(retry_window_s, ttl_s)
        self._answers: TTLMap[WebhookAnswer] = TTLMap(window, max_entries, clock)

    @staticmethod
    def idempotency_token(request: Request) -> str | None:
        token = request.headers.get(IDEMPOTENCY_HEADER)
        return token[:128] if token else None

    def answer_for_retry(self, request: Request, call_sid: str) -> str | None:
        """The TwiML we gave this request, when it is Twilio retrying one we answered.

        A retry is the same `I-Twilio-Idempotency-Token`, on the same path, for the same
        CallSid (both covered by the signature), within the retry window.
        """
        token = self.idempotency_token(request)
        answer = self._answers.get(token) if token else None
        if answer is None or (answer.path, answer.call_sid) != (request.url.path, call_sid):
            return None
        return answer.body

    def remember_answer(self, request: Request, call_sid: str, body: str) -> None:
        """Keep the answer to a request carrying an idempotency token for its retries."""
        if token := self.idempotency_token(request):
            self._answers.put(token, WebhookAnswer(request.url.path, call_sid, body))

    @classmethod
    def keys(cls, request: Request, call_sid: str | None) -> list[str]:
        keys = [f"CallSid:{call_sid}"] if call_sid else []
        token = cls.idempotency_token(request)
        return keys + ([f"Idempotency:{token}"] if token else [])

    def claim(self, keys: Iterable[str]) -> str | None:
        """Remember `keys` and return None, or return the first key already seen.

        Checks all before adding any, with no await in between, so two concurrent copies
        of one request can't both pass.
        """
        keys = list(keys)
        for key in keys:
            if key in self._seen:
                return key
        for key in keys:
            self._seen.add(key)
        return None

    def forget(self, keys: Iterable[str]) -> None:
        """Let a request that failed on our side be retried."""
        for key in keys:
            self._seen.discard(key)
            if key.startswith("Idempotency:"):
                self._answers.discard(key.split(":", 1)[1])

    def __len__(self) -> int:
        return len(self._seen)


class RejectionLog:
    """Logs refused requests without letting a flood flood the log.

    The first refusal of a window is logged at once; the rest are counted and summed up
    in one line when the next refusal comes after the window.
    """

    def __init__(self, window_s: float = 10.0, clock: Clock = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._window_start = -math.inf
        self._counts: dict[str, int] = {}

    def note(self, what: str) -> None:
        now = self._clock()
        if now - self._window_start < self._window_s:
            self._counts[what] = self._counts.get(what, 0) + 1
            return
        if self._counts:
            summary = ", ".join(f"{count} × {kind}" for kind, count in self._counts.items())
            logger.warning(f"Refused in the last {self._window_s:g} s: {summary}")
        self._counts = {}
        self._window_start = now
        logger.warning(f"Refused: {what}")


# --- call admission ----------------------------------------------------------------


class CallAdmission:
    """How many calls this process has and has promised, and whether it takes more.

    A call holds a slot from the moment its webhook is answered with `<Connect><Stream>`
    (a reservation, for `CALL_RESERVATION_TTL_S`) until its stream ends. The stream
    token is single-use: the first verified stream for a CallSid consumes it, so a
    replayed `start` message can't start a second pipeline. Spent tokens are remembered
    for REPLAY_CACHE_TTL_S + MAX_CALL_DURATION_S (at most REPLAY_CACHE_SIZE of them, and
    only verified ones can be added); the token has no expiry of its own, so a token
    captured and replayed after that window would work again.
    """

    def __init__(self, settings: Settings, clock: Clock = time.monotonic):
        self._max_calls = settings.max_concurrent_calls
        self._reservation_ttl_s = settings.call_reservation_ttl_s
        self._clock = clock
        self._reservations: OrderedDict[str, float] = OrderedDict()
        # A token stays spent for longer than any call could last.
        self._streamed = TTLSet(
            settings.replay_cache_ttl_s + settings.max_call_duration_s,
            settings.replay_cache_size,
            clock,
        )
        self._live: set[str] = set()
        self.draining = False

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def reserved(self) -> int:
        self._purge()
        return len(self._reservations)

    def in_use(self) -> int:
        return self.live + self.reserved

    def refusal(self) -> str | None:
        """Why no new call can start now, or None."""
        if self.draining:
            return "the server is shutting down"
        if self.in_use() >= self._max_calls:
            return f"at capacity: {self._max_calls} concurrent calls (MAX_CONCURRENT_CALLS)"
        return None

    def reserve(self, call_sid: str) -> str | None:
        """Hold a slot for a call whose webhook we are answering; the refusal, or None."""
        refusal = self.refusal()
        if refusal is None:
            self._reservations[call_sid] = self._clock() + self._reservation_ttl_s
        return refusal

    def admit_stream(self, call_sid: str) -> str | None:
        """Let a verified stream run its call (consuming its reservation), or say why not.

        While draining, only calls we already answered (reserved) get in.
        """
        if call_sid in self._streamed or call_sid in self._live:
            return f"stream token already used for CallSid={call_sid}"
        reserved = self._reservations.pop(call_sid, None) is not None
        if not reserved and (refusal := self.refusal()):
            return refusal
        self._streamed.add(call_sid)
        self._live.add(call_sid)
        return None

    def stream_ended(self, call_sid: str) -> None:
        self._live.discard(call_sid)

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no call is live or reserved (True), or `timeout_s` passes (False).

        Polls: reservations expire silently, and this runs once per process lifetime.
        """
        deadline = self._clock() + timeout_s
        while self.in_use() and self._clock() < deadline:
            await asyncio.sleep(IDLE_POLL_S)
        return self.in_use() == 0

    def _purge(self) -> None:
        now = self._clock()
        while self._reservations and next(iter(self._reservations.values())) <= now:
            call_sid, _ = self._reservations.popitem(last=False)
            logger.info(f"Call {call_sid}: no stream within {self._reservation_ttl_s:g} s")


class StreamGate:
    """The `admit` hook for one `/ws` connection: admits its call, releases it at the end."""

    def __init__(self, admission: CallAdmission):
        self._admission = admission
        self._call_sid: str | None = None

    def __call__(self, call: CallSession) -> str | None:
        refusal = self._admission.admit_stream(call.call_sid)
        if refusal is None:
            self._call_sid = call.call_sid
        return refusal

    def release(self) -> None:
        if self._call_sid is not None:
            self._admission.stream_ended(self._call_sid)
            self._call_sid = None
