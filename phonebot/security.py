"""Who may talk to this server: Twilio signatures, per-call stream tokens, the dial-out key.

Three doors, three checks:
- `POST /` and `POST /outbound` are Twilio's webhooks: the `X-Twilio-Signature` must
  validate against the auth token, computed over the URL as Twilio saw it.
- `WS /ws` is opened by whoever has the stream URL, which is not a secret. The TwiML we
  hand out carries a `token` Parameter (HMAC of the CallSid), and the stream is dropped
  before any paid service starts unless `start.callSid` matches it. The token is
  single-use (`phonebot.limits.CallAdmission`), and so is each signed webhook
  (`phonebot.limits.ReplayGuard`, checked after the signature).
- `POST /dialout` spends money; it needs `Authorization: Bearer $DIALOUT_API_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import NoReturn

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from twilio.request_validator import RequestValidator

from phonebot.config import Settings

TOKEN_PARAMETER = "token"


def call_token(call_sid: str, secret: bytes) -> str:
    """The stream token for one call: HMAC-SHA256 of its CallSid under the server secret."""
    return hmac.new(secret, call_sid.encode(), hashlib.sha256).hexdigest()


def verify_call_token(call_sid: str | None, token: str | None, secret: bytes) -> bool:
    """Constant-time check that a stream's token was minted by us for this CallSid."""
    if not call_sid or not token:
        return False
    return hmac.compare_digest(call_token(call_sid, secret), token)


def external_base_url(request: Request, public_url: str | None = None) -> str:
    """This server's scheme and host as the outside world (Twilio) reaches it.

    Behind ngrok or a reverse proxy the app sees `http://127.0.0.1:8000`, while Twilio
    uses `https://abc.ngrok.app`; the proxy tells us the outside scheme and host in
    `X-Forwarded-Proto` / `X-Forwarded-Host`. `PUBLIC_URL`, when set, wins outright.
    """
    if public_url:
        return public_url
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    host = (host or request.url.netloc).split(",")[0].strip()
    return f"{proto}://{host}"


def url_as_twilio_saw_it(request: Request, public_url: str | None = None) -> str:
    """The full URL Twilio signed: outside base, path and query string."""
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{external_base_url(request, public_url)}{request.url.path}{query}"


def twilio_signature_is_valid(
    auth_token: str, url: str, form: Mapping[str, str], signature: str | None
) -> bool:
    """Twilio's own validator (it also tries the URL with and without the port)."""
    if not signature:
        return False
    return RequestValidator(auth_token).validate(url, dict(form), signature)


async def require_twilio_signature(request: Request) -> None:
    """Dependency for Twilio webhooks: 403 unless signed, when an auth token is set.

    A request with no signature header is refused before its body is read: the cheapest
    possible answer to a flood of unsigned requests.
    """
    settings: Settings = request.app.state.settings
    if settings.twilio_auth_token is None:
        return
    signature = request.headers.get("x-twilio-signature")
    if not signature:
        refuse_webhook(request, "403 unsigned webhook")
    form = await request.form()
    url = url_as_twilio_saw_it(request, settings.public_url)
    fields = {key: str(value) for key, value in form.items()}
    if not twilio_signature_is_valid(
        settings.twilio_auth_token.get_secret_value(), url, fields, signature
    ):
        refuse_webhook(request, "403 badly signed webhook")


def refuse_webhook(request: Request, what: str) -> NoReturn:
    """403, noted in the app's flood-proof rejection log (phonebot.limits.RejectionLog)."""
    rejections = getattr(request.app.state, "rejections", None)
    if rejections is not None:
        rejections.note(f"{what} to {request.url.path}")
    raise HTTPException(status.HTTP_403_FORBIDDEN, "X-Twilio-Signature is missing or invalid")


_bearer = HTTPBearer(auto_error=False)


async def require_dialout_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """Dependency for `/dialout`: 503 when no key is configured, 401 on a wrong key."""
    settings: Settings = request.app.state.settings
    if settings.dialout_api_key is None or not settings.dialout_api_key.get_secret_value():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dial-out disabled")
    expected = settings.dialout_api_key.get_secret_value()
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Authorization: Bearer <DIALOUT_API_KEY> required",
            headers={"WWW-Authenticate": "Bearer"},
        )
