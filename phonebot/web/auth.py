"""Who may use which route: every key check of the server, in one place.

- Twilio's webhooks (`POST /`, `/outbound`, `/amd`, `/status`): `require_twilio_signature`,
  over `phonebot.twilio.signatures`.
- `POST /dialout` spends money: `Authorization: Bearer $DIALOUT_API_KEY`.
- The records API, campaigns and the do-not-call list: `Bearer $ADMIN_API_KEY` (reads also
  take the calls page's session cookie); `/health` shows more with it.
- `GET /metrics`: `Bearer $METRICS_TOKEN` when it is set.

Every key goes through `phonebot.web.guards.key_matches`: compared in constant time, a
wrong one counted toward the client's lockout (AUTH_FAILURE_LIMIT, AUTH_LOCKOUT_S), and
refused with 429 while the lockout lasts, right or not. A request that sends no key is no
guess and costs nothing. (`WS /ws` carries a per-call stream token instead:
`phonebot.twilio.stream_token`.)
"""

from __future__ import annotations

from typing import Annotated, NoReturn

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from phonebot.twilio.signatures import WebhookRefused, check_twilio_signature
from phonebot.web.guards import key_matches
from phonebot.web.services import AppServices, Services, services_of
from phonebot.web.sessions import request_session_valid

READ_METHODS = frozenset({"GET", "HEAD"})
dialout_bearer = HTTPBearer(auto_error=False)
bearer = HTTPBearer(auto_error=False, description="ADMIN_API_KEY")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
DialoutCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(dialout_bearer)]


# --- Twilio's webhooks -------------------------------------------------------------------


async def require_twilio_signature(request: Request, services: Services) -> None:
    """Dependency for Twilio webhooks: 403 unless signed, when signatures are checked
    (`check_twilio_signature`). Every 403 is logged with its reason, never bare."""
    try:
        await check_twilio_signature(request, services.settings)
    except WebhookRefused as refused:
        refuse_webhook(request, services, refused.what)


def refuse_webhook(request: Request, services: AppServices, what: str) -> NoReturn:
    """403, noted in the app's flood-proof rejection log (phonebot.web.rejections).

    `what` says why and what to configure; it is the log line, and the answer's detail
    except under ENV=production, where the answer stays generic.
    """
    services.rejections.note(f"{what} to {request.url.path}")
    if services.settings.env == "production":
        # The reason (which URL was checked, which key is unset) is for the operator's log,
        # not for whoever sent the request.
        raise HTTPException(status.HTTP_403_FORBIDDEN, "X-Twilio-Signature is missing or invalid")
    raise HTTPException(
        status.HTTP_403_FORBIDDEN, f"X-Twilio-Signature is missing or invalid: {what[4:]}"
    )


# --- DIALOUT_API_KEY ---------------------------------------------------------------------


async def require_dialout_key(
    request: Request, services: Services, credentials: DialoutCredentials
) -> None:
    """Dependency for `/dialout`: 503 when no key is configured, 401 on a wrong key, 429
    while the client is locked out after AUTH_FAILURE_LIMIT wrong keys (right key or not:
    `phonebot.web.guards.refuse_locked_out`). A request without a key is no guess."""
    key = services.settings.dialout_api_key
    if key is None or not key.get_secret_value():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dial-out disabled")
    given = credentials.credentials if credentials else None
    if await key_matches(request, given, key.get_secret_value()):
        return
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "Authorization: Bearer <DIALOUT_API_KEY> required",
        headers={"WWW-Authenticate": "Bearer"},
    )


# --- ADMIN_API_KEY -----------------------------------------------------------------------


async def require_admin_key(request: Request, credentials: Credentials) -> None:
    """401 without the right bearer key, 503 when no key is configured, 429 while the
    client is locked out after AUTH_FAILURE_LIMIT wrong keys (`phonebot.web.guards`).

    Reads (GET, HEAD) also accept the session cookie of the calls page (`ui_session`), so
    its <audio> element can fetch the recording; DELETE always needs the bearer key. A
    request that sends no key is not a guess and costs nothing; one that sends a key is
    refused while its client is locked out, even when the key is right.
    """
    key = services_of(request).settings.admin_api_key
    if key is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the records API is off: set ADMIN_API_KEY"
        )
    given = credentials.credentials if credentials else None
    if await key_matches(request, given, key.get_secret_value()):
        return
    if request.method not in READ_METHODS or not await request_session_valid(
        request, key.get_secret_value()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong Authorization: Bearer key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def check_admin_key(request: Request) -> None:
    """`require_admin_key` for code that runs before FastAPI's dependencies (a route class
    that must authenticate before it reads the body): the same answers, awaited."""
    await require_admin_key(request, await bearer(request))


async def carries_admin_key(request: Request, services: AppServices) -> bool:
    """Whether the request has `Authorization: Bearer $ADMIN_API_KEY`, for what only the
    operator may see; never a gate that answers 401 or 429. A wrong key still counts
    toward the client's lockout (`key_matches`), so /health is no way around it."""
    key = services.settings.admin_api_key
    if key is None:
        return False
    try:
        return await key_matches(
            request, request.headers.get("authorization"), f"Bearer {key.get_secret_value()}"
        )
    except StarletteHTTPException:  # locked out (429): the stranger's answer
        return False


# --- METRICS_TOKEN -----------------------------------------------------------------------


async def require_metrics_token(request: Request, services: Services) -> None:
    """With METRICS_TOKEN set, a scrape must carry it as a bearer token; unset, it is open.

    /metrics holds counts only (no call content, no CallSid), so open on a private network
    is the common setup; the token is for a port the internet can reach. A wrong token
    counts toward the client's lockout, like every key (`guards.note_failed_key`).
    """
    token = services.settings.metrics_token
    if token is None:
        return
    expected = f"Bearer {token.get_secret_value()}"
    if await key_matches(request, request.headers.get("authorization"), expected):
        return
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "GET /metrics needs Authorization: Bearer <METRICS_TOKEN>",
        headers={"WWW-Authenticate": "Bearer"},
    )
