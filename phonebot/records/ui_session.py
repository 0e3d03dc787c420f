"""The session cookie of the calls web page (`/calls/ui`), shared with the records API.

After the login form has checked ADMIN_API_KEY, the browser holds a cookie that proves it
knew the key without containing it: `<expiry>.<HMAC-SHA256(session key, expiry)>`, where the
session key is itself an HMAC of ADMIN_API_KEY. Nothing is stored on the server, so sessions
work across restarts and workers; changing ADMIN_API_KEY ends every session at once, and a
session ends by itself after SESSION_TTL_S. Logging out deletes the browser's cookie.

The records API (`api.py`) accepts this cookie for reading (GET), so the page's <audio>
element can fetch `/calls/{sid}/recording`; erasing still needs the bearer key.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi import Request
from fastapi.responses import Response

from phonebot.security import external_base_url

COOKIE = "phonebot_calls_session"
# The cookie goes to the page and to the API's recording route, nowhere else.
COOKIE_PATH = "/calls"
SESSION_TTL_S = 12 * 3600
_SESSION_CONTEXT = b"phonebot calls-ui session v1"


def _session_key(admin_key: str) -> bytes:
    """A key derived from ADMIN_API_KEY, so the cookie's HMAC never uses the key itself."""
    return hmac.new(admin_key.encode(), _SESSION_CONTEXT, hashlib.sha256).digest()


def _sign(admin_key: str, purpose: str, value: str) -> str:
    return hmac.new(
        _session_key(admin_key), f"{purpose}:{value}".encode(), hashlib.sha256
    ).hexdigest()


def new_session(admin_key: str, now: float | None = None) -> str:
    """A fresh session value, valid for SESSION_TTL_S."""
    expires = int(time.time() if now is None else now) + SESSION_TTL_S
    return f"{expires}.{_sign(admin_key, 'session', str(expires))}"


def session_valid(admin_key: str, value: str | None, now: float | None = None) -> bool:
    """True for an unexpired session made with this ADMIN_API_KEY (constant-time compare)."""
    if not value or value.count(".") != 1:
        return False
    expires, signature = value.split(".")
    if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
        return False
    return hmac.compare_digest(signature, _sign(admin_key, "session", expires))


def request_session_valid(request: Request, admin_key: str) -> bool:
    return session_valid(admin_key, request.cookies.get(COOKIE))


def csrf_token(admin_key: str, session: str) -> str:
    """The logout form's token: bound to the session, so another site cannot forge it."""
    return _sign(admin_key, "csrf", session)


def csrf_valid(admin_key: str, session: str | None, token: str) -> bool:
    if not session:
        return False
    return hmac.compare_digest(token.encode(), csrf_token(admin_key, session).encode())


def set_session_cookie(response: Response, request: Request, session: str) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure when
    the browser reached us over https (directly or through a proxy that says so)."""
    response.set_cookie(
        COOKIE,
        session,
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=is_https(request)
    )


def is_https(request: Request) -> bool:
    """Whether the browser's side of this request is https: the request itself, or the
    X-Forwarded-Proto of the proxy in front (ngrok). Not PUBLIC_URL: the same server may be
    opened over http on localhost, where a Secure cookie would never come back."""
    return external_base_url(request).startswith("https:")
