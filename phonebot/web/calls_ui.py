"""The calls web page, `/calls/ui`: the call log and each call's conversation.

Server-rendered HTML (Jinja2, autoescaped: transcripts are what callers said, untrusted),
one stylesheet, no script at all, so a strict Content-Security-Policy holds. The latency
chart is an inline SVG drawn here. Same key as the API: a login form checks ADMIN_API_KEY
once and sets a session cookie (`ui_session`); the recording plays from the API's own
route, which accepts that cookie for reads.

Include `router` BEFORE the records API's router: `/calls/{call_sid}` would otherwise
answer `/calls/ui` (with a 401).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Form, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import NoMatchFound

from phonebot.records.chart import latency_chart
from phonebot.records.models import CallDetail, Direction
from phonebot.records.store import MAX_PAGE, BadCursor, CallFilter, CallStore
from phonebot.twilio.statuses import FINAL_STATUSES
from phonebot.web.calls_api import get_store
from phonebot.web.guards import locked_out_for, note_failed_key, retry_after_header, same_key
from phonebot.web.services import services_of
from phonebot.web.sessions import (
    COOKIE,
    clear_session_cookie,
    csrf_token,
    csrf_valid,
    end_session,
    request_session_valid,
    set_session_cookie,
    start_session,
)

TEMPLATES = Path(__file__).parent / "templates" / "calls"
PREFIX = "/calls/ui"
STATUSES = FINAL_STATUSES  # what the log's status filter offers
# No script may run, whatever a transcript contains; the stylesheet comes from this server
# only; no other site may frame the page (clickjacking). Media may also come from another
# host: a recording in S3 plays from the presigned URL the API's route redirects to.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; media-src 'self' https: http:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
_SAFE_NEXT = re.compile(r"^/calls/ui(/[A-Za-z0-9_-]+)?$")


def _clock(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def _offset(seconds: float | None) -> str:
    """A transcript entry's time from the call start: m:ss.s."""
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds, 1), 60)  # 59.96 s is 1:00.0, not 0:60.0
    return f"{int(minutes)}:{rest:04.1f}"


def _environment() -> jinja2.Environment:
    """Autoescape on for every template (not only *.html): transcripts are caller speech."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        clock=_clock,
        duration=_duration,
        offset=_offset,
        compact_json=lambda value: json.dumps(value, ensure_ascii=False, separators=(", ", ": ")),
    )
    return env


templates = Jinja2Templates(env=_environment())
router = APIRouter(prefix=PREFIX, include_in_schema=False)


def page_templates(folder: Path) -> Jinja2Templates:
    """Templates for another page next to the call log (campaigns, agents): `folder`'s
    first, then these, with this page's environment (filters, autoescape, layout)."""
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(folder), templates.env.loader])
    return Jinja2Templates(env=templates.env.overlay(loader=loader))


class LogQuery(BaseModel):
    """The page's filters: the query string of `GET /calls`, validated the same way."""

    model_config = ConfigDict(extra="ignore")

    direction: Direction | None = None
    persona: str | None = None
    campaign_id: str | None = None
    end_reason: str | None = None
    status: str | None = None
    number: str | None = None
    success: bool | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(50, ge=1, le=MAX_PAGE)
    cursor: str | None = None

    def where(self) -> CallFilter:
        return CallFilter(
            direction=self.direction,
            persona=self.persona,
            campaign_id=self.campaign_id,
            end_reason=self.end_reason,
            status=self.status,
            number=self.number,
            success=self.success,
            since=self.since,
            until=self.until,
        )


# --- rendering helpers ---------------------------------------------------------------------
def _page(request: Request, name: str, context: dict[str, Any], code: int = 200) -> Response:
    context = {"csrf": getattr(request.state, "csrf", None), "prefix": PREFIX, **context}
    response = templates.TemplateResponse(request, name, context, status_code=code)
    response.headers.update(SECURITY_HEADERS)
    return response


def _admin_key(request: Request) -> str | None:
    key = services_of(request).settings.admin_api_key
    return key.get_secret_value() if key is not None else None


def _off(request: Request) -> Response:
    return _page(request, "off.html", {}, status.HTTP_503_SERVICE_UNAVAILABLE)


def _to_login(request: Request) -> Response:
    """No session: to the login form, which comes back here afterwards."""
    target = request.url.path
    query = f"?{urlencode({'next': target})}" if _SAFE_NEXT.match(target) else ""
    return RedirectResponse(f"{PREFIX}/login{query}", status.HTTP_303_SEE_OTHER)


def _recording_url(request: Request, call: CallDetail) -> str | None:
    """The API's recording route for this call (None without a recording or the API)."""
    if not call.has_recording:
        return None
    try:
        path = request.app.url_path_for("get_recording", call_sid=call.call_sid)
    except NoMatchFound:
        return None
    return request.scope.get("root_path", "") + str(path)


def _next_link(query: LogQuery, next_cursor: str | None) -> str | None:
    if next_cursor is None:
        return None
    params = query.model_dump(mode="json", exclude_none=True, exclude={"cursor"})
    if params.get("limit") == 50:
        del params["limit"]
    if "success" in params:  # as the form sends it ("true"), so the next page keeps it
        params["success"] = str(params["success"]).lower()
    return f"{PREFIX}?{urlencode({**params, 'cursor': next_cursor})}"


def _query_errors(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        for problem in error.errors()
    )


# --- routes ----------------------------------------------------------------------------------
@router.get("/style.css")
async def stylesheet() -> Response:
    """The page's only stylesheet; public, so the login form is styled too."""
    css = (TEMPLATES / "style.css").read_text()
    return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = PREFIX) -> Response:
    if _admin_key(request) is None:
        return _off(request)
    return _page(request, "login.html", {"error": None, "next": _safe_next(next)})


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = PREFIX
) -> Response:
    """Right key: a session cookie and back to the page. Wrong key: the form again. The
    same lockout as the API's keys (AUTH_FAILURE_LIMIT wrong keys from one client, API and
    form together), and while it lasts the right key is refused too."""
    admin_key = _admin_key(request)
    if admin_key is None:
        return _off(request)
    context = {"next": _safe_next(next)}
    client, wait_s = await locked_out_for(request)
    if wait_s:
        retry = retry_after_header(wait_s)
        response = _page(
            request,
            "login.html",
            {**context, "error": f"Too many attempts: try again in {retry} s."},
            status.HTTP_429_TOO_MANY_REQUESTS,
        )
        response.headers["Retry-After"] = retry
        return response
    if not same_key(key, admin_key):
        await note_failed_key(request, client)
        return _page(
            request,
            "login.html",
            {**context, "error": "That is not the ADMIN_API_KEY."},
            status.HTTP_401_UNAUTHORIZED,
        )
    response = RedirectResponse(context["next"], status.HTTP_303_SEE_OTHER)
    set_session_cookie(response, request, await start_session(request, admin_key))
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    """Ends the session on the server (every process), then deletes the browser's cookie:
    a copy of the cookie is dead too. POST with the page's token: another site can neither
    send our cookie (SameSite=Strict) nor know the token."""
    admin_key = _admin_key(request)
    if admin_key is None:
        return _off(request)
    if not csrf_valid(admin_key, request.cookies.get(COOKIE), csrf):
        return _page(request, "error.html", {"message": "Bad or missing form token."}, 403)
    await end_session(request, admin_key)
    response = RedirectResponse(f"{PREFIX}/login", status.HTTP_303_SEE_OTHER)
    clear_session_cookie(response, request)
    return response


@router.get("", response_class=HTMLResponse)
async def call_log(request: Request, store: Annotated[CallStore, Depends(get_store)]) -> Response:
    """The call log, newest first, filtered like `GET /calls` (same query string)."""
    if (guard := await page_guard(request)) is not None:
        return guard
    raw = {k: v for k, v in request.query_params.items() if v.strip()}
    context: dict[str, Any] = {"filters": raw, "statuses": STATUSES, "calls": [], "next": None}
    try:
        query = LogQuery.model_validate(raw)
        if query.since and query.until and query.since >= query.until:
            raise ValueError("until: must be after since")
        page = await store.list(query.where(), query.limit, query.cursor)
    except ValidationError as error:
        return _page(request, "log.html", {**context, "error": _query_errors(error)}, 422)
    except BadCursor as error:
        return _page(request, "log.html", {**context, "error": f"cursor: {error}"}, 422)
    except ValueError as error:
        return _page(request, "log.html", {**context, "error": str(error)}, 422)
    context.update(calls=page.calls, next=_next_link(query, page.next_cursor), error=None)
    return _page(request, "log.html", context)


@router.get("/{call_sid}", response_class=HTMLResponse)
async def call_page(
    call_sid: str, request: Request, store: Annotated[CallStore, Depends(get_store)]
) -> Response:
    """One call: its record, recording, latency chart and the conversation."""
    if (guard := await page_guard(request)) is not None:
        return guard
    call = await store.get(call_sid)
    if call is None:
        return _page(request, "error.html", {"message": f"No record of call {call_sid}."}, 404)
    context = {
        "call": call,
        "recording_url": _recording_url(request, call),
        "chart": latency_chart(call.transcript, call.reply_latency_p50_s,
                               call.reply_latency_p95_s),
    }
    return _page(request, "call.html", context)


async def page_guard(request: Request) -> Response | None:
    """503 page when the key is unset, the login form without a live session, else None:
    the check in front of every page behind the login (the campaigns' pages too)."""
    admin_key = _admin_key(request)
    if admin_key is None:
        return _off(request)
    if not await request_session_valid(request, admin_key):
        return _to_login(request)
    request.state.csrf = csrf_token(admin_key, request.cookies[COOKIE])
    return None


def _safe_next(target: str) -> str:
    """Only back to a page of this UI: never an open redirect to another site."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.query or not _SAFE_NEXT.match(parts.path):
        return PREFIX
    return parts.path
