"""The agents page, `/calls/ui/agents`: the agents in use, as `GET /agents` lists them.

Same login, session cookie, template base and security headers as the calls page
(`phonebot.web.calls_ui`), under its prefix so the session cookie (path /calls) reaches it.
Read-only: a reload is `POST /agents/reload` or SIGHUP (`phonebot.web.agents_api`).
Include `router` BEFORE the records UI router, whose `/calls/ui/{call_sid}` would take
`/calls/ui/agents`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from phonebot.agents.registry import describe
from phonebot.web import calls_ui as records_ui
from phonebot.web.services import services_of

PAGES = Path(__file__).parent / "templates" / "agents"
PREFIX = f"{records_ui.PREFIX}/agents"
templates = records_ui.page_templates(PAGES)
router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _page(request: Request, name: str, context: dict[str, Any]) -> Response:
    context = {"csrf": getattr(request.state, "csrf", None), "prefix": records_ui.PREFIX,
               **context}  # fmt: skip
    response = templates.TemplateResponse(request, name, context)
    response.headers.update(records_ui.SECURITY_HEADERS)
    return response


@router.get("", response_class=HTMLResponse)
async def agents_page(request: Request) -> Response:
    """Every agent in use: what picks it, its tools, knowledge, outcome fields, analysis."""
    if (guard := await records_ui.page_guard(request)) is not None:
        return guard
    listing = describe(services_of(request).agents.current)
    return _page(request, "agents.html", {"listing": listing})
