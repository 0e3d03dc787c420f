"""The campaigns pages, next to the call log: `/calls/ui/campaigns` and one campaign's page.

Same login, session cookie, CSRF token, template base and security headers as the calls
page (`phonebot.web.calls_ui`): the templates extend its `base.html`, whose header links here.
A campaign's page can pause, resume or cancel it (a POST form with the page's token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse

from phonebot.campaigns.service import Campaigns
from phonebot.campaigns.store import BadTransition, CampaignNotFound
from phonebot.web import calls_ui as records_ui
from phonebot.web.campaigns_api import campaign_results as api_results
from phonebot.web.services import get_campaigns, services_of
from phonebot.web.sessions import COOKIE, csrf_valid

PAGES = Path(__file__).parent / "templates" / "campaigns"
PREFIX = f"{records_ui.PREFIX}/campaigns"
templates = records_ui.page_templates(PAGES)
router = APIRouter(prefix=PREFIX, include_in_schema=False)
Service = Annotated[Campaigns, Depends(get_campaigns)]


def _page(request: Request, name: str, context: dict[str, Any], code: int = 200) -> Response:
    context = {"csrf": getattr(request.state, "csrf", None), "prefix": records_ui.PREFIX,
               "campaigns_prefix": PREFIX, **context}
    response = templates.TemplateResponse(request, name, context, status_code=code)
    response.headers.update(records_ui.SECURITY_HEADERS)
    return response


def progress(counts: dict[str, int], total: int) -> int:
    """Percent of contacts in a final state."""
    open_ = counts.get("pending", 0) + counts.get("calling", 0)
    return round(100 * (total - open_) / total) if total else 100


@router.get("", response_class=HTMLResponse)
async def campaigns_page(request: Request, campaigns: Service) -> Response:
    if (guard := await records_ui.page_guard(request)) is not None:
        return guard
    listed = await campaigns.store.list()
    rows = [(c, progress(c.counts, c.total)) for c in listed]
    return _page(request, "campaigns.html", {"rows": rows})


@router.get("/{campaign_id}", response_class=HTMLResponse)
async def campaign_page(campaign_id: str, request: Request, campaigns: Service) -> Response:
    if (guard := await records_ui.page_guard(request)) is not None:
        return guard
    try:
        campaign = await campaigns.store.get(campaign_id)
    except CampaignNotFound:
        return _page(request, "error.html", {"message": f"No campaign {campaign_id}."}, 404)
    done = progress(campaign.counts, campaign.total)
    return _page(request, "campaign.html", {"campaign": campaign, "done": done})


@router.get("/{campaign_id}/results.csv")
async def campaign_results(campaign_id: str, request: Request, campaigns: Service) -> Response:
    """The API's results.csv for the page's session (the API's cookie path is /calls)."""
    if (guard := await records_ui.page_guard(request)) is not None:
        return guard
    try:
        return await api_results(campaign_id, campaigns)
    except HTTPException:
        return _page(request, "error.html", {"message": f"No campaign {campaign_id}."}, 404)


@router.post("/{campaign_id}/{action}")
async def campaign_action(
    campaign_id: str, action: str, request: Request, campaigns: Service
) -> Response:
    """pause / resume / cancel from the page (POST with the page's CSRF token). The form
    is read after the session is checked: a stranger's body is never parsed."""
    if (guard := await records_ui.page_guard(request)) is not None:
        return guard
    csrf = await _form_field(request, "csrf")
    key = services_of(request).settings.admin_api_key.get_secret_value()
    if action not in ("pause", "resume", "cancel") or not csrf_valid(
        key, request.cookies.get(COOKIE), csrf
    ):
        return _page(request, "error.html", {"message": "Bad action or form token."}, 403)
    try:
        await campaigns.store.act(campaign_id, action, campaigns.clock.now())
    except CampaignNotFound:
        return _page(request, "error.html", {"message": f"No campaign {campaign_id}."}, 404)
    except BadTransition as error:
        return _page(request, "error.html", {"message": str(error)}, 409)
    return RedirectResponse(f"{PREFIX}/{campaign_id}", status.HTTP_303_SEE_OTHER)


async def _form_field(request: Request, name: str) -> str:
    """One text field of the request's form ("" when missing or a file)."""
    form = await request.form()
    try:
        value = form.get(name)
    finally:
        await form.close()
    return value if isinstance(value, str) else ""
