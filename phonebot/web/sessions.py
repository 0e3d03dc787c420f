"""The session cookie of the calls web page (`/calls/ui`), shared with the records API.

After the login form has checked ADMIN_API_KEY, the browser holds a cookie that proves it
knew the key without containing it: `<expiry>.<session id>.<HMAC-SHA256(session key,
expiry.id)>`, where the session key is itself an HMAC of ADMIN_API_KEY and the id is
random. The signature alone can't be taken back, so the id is also kept in the shared
state (`phonebot.state.sessions`: memory, or Redis with REDIS_URL, so every worker agrees)
for the session's lifetime: a cookie counts only while its id is there. Logging out
deletes the id, so a copy of the old cookie is dead too; changing ADMIN_API_KEY ends every
session at once, and a session ends by itself after SESSION_TTL_S.

The records API (`api.py`) accepts this cookie for reading (GET), so the page's <audio>
element can fetch `/calls/{sid}/recording`; erasing still needs the bearer key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import Request
from fastapi.responses import Response

from phonebot.state.sessions import close_session, open_session, session_is_open
from phonebot.twilio.signatures import external_base_url
from phonebot.web.services import services_of

COOKIE = "phonebot_calls_session"
# The cookie goes to the page and to the API's recording route, nowhere else.
COOKIE_PATH = "/calls"
SESSION_TTL_S = 12 * 3600
_SESSION_CONTEXT = b"phonebot calls-ui session v2"  # v2: <expiry>.<id>.<signature>


def _session_key(admin_key: str) -> bytes:
    """A key derived from ADMIN_API_KEY, so the cookie's HMAC never uses the key itself."""
    return hmac.new(admin_key.encode(), _SESSION_CONTEXT, hashlib.sha256).digest()


def _sign(admin_key: str, purpose: str, value: str) -> str:
    return hmac.new(
        _session_key(admin_key), f"{purpose}:{value}".encode(), hashlib.sha256
    ).hexdigest()


def new_session(admin_key: str, now: float | None = None) -> str:
    """A fresh signed session value with a random id, valid for SESSION_TTL_S (not yet
    known to the server: `start_session` makes it count)."""
    expires = int(time.time() if now is None else now) + SESSION_TTL_S
    payload = f"{expires}.{secrets.token_hex(16)}"
    return f"{payload}.{_sign(admin_key, 'session', payload)}"


def session_id(admin_key: str, value: str | None, now: float | None = None) -> str | None:
    """The id of an unexpired session signed with this ADMIN_API_KEY, else None.

    Anything a browser may send is just "no session", never an error: a cookie is text
    the client chose, so non-ASCII is refused before `int()` (which reads other scripts'
    digits) and the signatures are compared as bytes (`compare_digest` raises on non-ASCII
    str), in constant time.
    """
    if not value or not value.isascii() or value.count(".") != 2:
        return None
    expires, sid, signature = value.split(".")
    if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
        return None
    expected = _sign(admin_key, "session", f"{expires}.{sid}")
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return sid


async def start_session(request: Request, admin_key: str) -> str:
    """A new session, known to every process until it expires or logs out."""
    value = new_session(admin_key)
    await open_session(services_of(request).shared, value.split(".")[1], SESSION_TTL_S)
    return value


async def request_session_valid(request: Request, admin_key: str) -> bool:
    """Whether the request's cookie is a session signed with this key that has not ended."""
    sid = session_id(admin_key, request.cookies.get(COOKIE))
    if sid is None:
        return False
    return await session_is_open(services_of(request).shared, sid)


async def end_session(request: Request, admin_key: str) -> None:
    """Logout: the request's session stops counting on every process."""
    sid = session_id(admin_key, request.cookies.get(COOKIE))
    if sid is not None:
        await close_session(services_of(request).shared, sid)


def csrf_token(admin_key: str, session: str) -> str:
    """The logout form's token: bound to the session, so another site cannot forge it."""
    return _sign(admin_key, "csrf", session)


def csrf_valid(admin_key: str, session: str | None, token: str) -> bool:
    """Constant time, on bytes: a non-ASCII token or cookie is just "invalid"."""
    if not session or not session.isascii():
        return False
    expected = csrf_token(admin_key, session).encode()
    return hmac.compare_digest(token.encode("utf-8", "replace"), expected)


def set_session_cookie(response: Response, request: Request, session: str) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure when
    the browser reached us over https or PUBLIC_URL is https (`is_https`)."""
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
    """Whether the cookie must be Secure: the browser's side of this request is https (the
    request itself, or the X-Forwarded-Proto of the proxy in front), or PUBLIC_URL is https.
    With an https PUBLIC_URL the page is meant to be reached over https only, and a cookie
    without Secure would also go out over any plain-http request (a proxy that lost the
    header, a downgrade). Chromium and Firefox keep Secure cookies on http://localhost, so
    a local visit still works there."""
    public_url = services_of(request).settings.public_url or ""
    return public_url.startswith("https:") or external_base_url(request).startswith("https:")
