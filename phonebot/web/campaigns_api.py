"""The campaigns API: create (JSON or a CSV upload), list, read, pause/resume/cancel,
results.csv. Behind `Authorization: Bearer $ADMIN_API_KEY`, like the call records
(`phonebot.web.auth.require_admin_key`: 401 without the key, 503 while it is unset).

`POST /campaigns` takes the JSON body `CampaignIn`, or `multipart/form-data` with the
contacts as a CSV file in `contacts` and every other field as JSON in `campaign`:

    curl -H "Authorization: Bearer $ADMIN_API_KEY" -F contacts=@contacts.csv \\
         -F 'campaign={"name": "summer sale", "window": {"start": "09:00", "end": "20:00"}}' \\
         http://localhost:8000/campaigns

The upload is turned into the same JSON body before FastAPI reads it (`CsvOrJsonRoute`),
so both paths share one model, one validation and one schema in the OpenAPI docs. Nothing
of a body is read before the key is checked (`AuthFirstRoute`), and the CPU-heavy parts of
a big list (reading the CSV, checking every number) run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile

from phonebot.agents.selection import AgentSet
from phonebot.campaigns.contacts import MAX_ERRORS, ContactErrors, prepare, problem, read_csv
from phonebot.campaigns.models import (
    CampaignCreated,
    CampaignDetail,
    CampaignIn,
    CampaignList,
    CampaignStatusChange,
)
from phonebot.campaigns.service import Campaigns
from phonebot.campaigns.store import RESULT_COLUMNS, BadTransition, CampaignNotFound
from phonebot.csv_cells import SafeDictWriter
from phonebot.twilio.dialout import check_agent_named
from phonebot.twilio.twiml import ParameterError
from phonebot.web.auth import check_admin_key, require_admin_key
from phonebot.web.services import Services, get_campaigns

NOT_FOUND = {404: {"description": "No such campaign"}}
CSV_UPLOAD = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["contacts"],
            "properties": {
                "contacts": {"type": "string", "format": "binary",
                             "description": "CSV: to, customer_id?, timezone?, parameters…"},
                "campaign": {"type": "string",
                             "description": "JSON: every CampaignIn field except contacts"},
            },
        }
    }
}


class AuthFirstRoute(APIRoute):
    """A route that checks ADMIN_API_KEY before it reads the request's body.

    FastAPI reads and parses a body before it solves the route's dependencies, so with
    `Depends(require_admin_key)` alone a stranger's 3 MB upload was parsed before the 401.
    Here `check_admin_key` (the same answers and failed-key lockout) runs first, on the
    headers only; the dependency runs again once the body is read, which costs nothing.
    Routes without a body are left as they are: FastAPI reads nothing before their key.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def route(request: Request) -> Response:
            await check_admin_key(request)
            return await handler(await self.before_body(request))

        return route

    async def before_body(self, request: Request) -> Request:
        """The request whose body FastAPI reads (a subclass may rewrite it)."""
        return request


class CsvOrJsonRoute(AuthFirstRoute):
    """A route whose JSON body may also come as a CSV upload (see the module docstring)."""

    async def before_body(self, request: Request) -> Request:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await _as_json(request)
        return request


async def _as_json(request: Request) -> Request:
    """The multipart request as the equivalent JSON request; 422 naming the bad part.

    The form is taken apart as it streams in (cheap); decoding and reading the CSV, ~0.1 s
    of CPU for 10,000 rows, runs in a thread so that live calls keep the event loop."""
    form = await request.form()
    try:
        upload, options = form.get("contacts"), form.get("campaign") or "{}"
        if not isinstance(upload, UploadFile):
            raise _invalid(["body", "contacts"], "a CSV file is required")
        text = options if isinstance(options, str) else await options.read()
        raw = await asyncio.to_thread(campaign_json, text, await upload.read())
    finally:
        await form.close()
    headers = [(k, v) for k, v in request.scope["headers"]
               if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    scope = {**request.scope, "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


def campaign_json(options: str | bytes, contacts: bytes) -> bytes:
    """The JSON body of an upload's `campaign` part and `contacts` CSV (off the loop)."""
    try:
        body = json.loads(options)
        text = contacts.decode("utf-8-sig")
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(["body", "campaign"], f"not JSON / UTF-8: {error}") from None
    if not isinstance(body, dict):
        raise _invalid(["body", "campaign"], "must be a JSON object")
    try:
        body["contacts"] = read_csv(text)
    except ContactErrors as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, error.errors) from None
    except csv.Error as error:
        raise _invalid(["body", "contacts"], f"not CSV: {error}") from None
    return json.dumps(body).encode()


Service = Annotated[Campaigns, Depends(get_campaigns)]
router = APIRouter(
    prefix="/campaigns",
    tags=["campaigns"],
    dependencies=[Depends(require_admin_key)],
    route_class=CsvOrJsonRoute,
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=CampaignCreated,
    openapi_extra={"requestBody": {"content": CSV_UPLOAD}},
)
async def create_campaign(
    body: CampaignIn, campaigns: Service, services: Services
) -> CampaignCreated:
    """Create a campaign; it starts at start_at (now when not given). 422 names the field
    and row of every bad contact, and an `agent` that is not one of the agents in use;
    duplicate numbers are merged and listed."""
    if unknown := unknown_agents(body, services.agents.current):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, unknown)
    try:  # phonenumbers on 10,000 rows is seconds of CPU: not on the event loop
        prepared = await asyncio.to_thread(prepare, body, campaigns.settings)
    except ContactErrors as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, error.errors) from None
    campaign = await campaigns.store.create(body, prepared, campaigns.clock.now())
    return CampaignCreated(
        id=campaign.id, status=campaign.status, contacts=len(prepared.contacts),
        duplicates=prepared.duplicates,
    )


def unknown_agents(body: CampaignIn, agents: AgentSet) -> list[dict[str, Any]]:
    """The campaign's named agent (`agent`, or `parameters.agent`) and every contact's
    (an `agent` column) that is not in use, FastAPI-shaped: a call would otherwise fall
    back to the agent its parameters pick, and nobody would be told."""
    campaign_loc = ["body", "agent"] if body.agent is not None else ["body", "parameters", "agent"]
    named = [(campaign_loc, body.parameters, None)] + [
        (["body", "contacts", index, "parameters", "agent"], contact.parameters, index + 1)
        for index, contact in enumerate(body.contacts)
    ]
    errors = []
    for loc, parameters, row in named:
        try:
            check_agent_named(parameters, agents)
        except ParameterError as error:
            message = f"row {row}: {error.message}" if row else error.message
            errors.append(problem(loc, message, row))
    return errors[:MAX_ERRORS]


@router.get("", response_model=CampaignList)
async def list_campaigns(campaigns: Service) -> CampaignList:
    """Campaigns, newest first, with their contacts counted by state."""
    return CampaignList(campaigns=await campaigns.store.list())


@router.get("/{campaign_id}", response_model=CampaignDetail, responses=NOT_FOUND)
async def get_campaign(campaign_id: str, campaigns: Service) -> CampaignDetail:
    """The campaign, its counts by contact state, and every contact with its calls."""
    try:
        return await campaigns.store.get(campaign_id)
    except CampaignNotFound:
        raise _not_found(campaign_id) from None


@router.get(
    "/{campaign_id}/results.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}, **NOT_FOUND},
)
async def campaign_results(campaign_id: str, campaigns: Service) -> Response:
    """One row per contact: state, attempts, outcome, outcome fields, CallSids."""
    try:
        rows = await campaigns.store.results(campaign_id)
    except CampaignNotFound:
        raise _not_found(campaign_id) from None
    out = io.StringIO()
    writer = SafeDictWriter(out, RESULT_COLUMNS)  # no cell a spreadsheet would run
    writer.writeheader()
    writer.writerows(rows)
    disposition = f'attachment; filename="{campaign_id}-results.csv"'
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": disposition})


def _action(action: str):
    async def act(campaign_id: str, campaigns: Service) -> CampaignStatusChange:
        try:
            new = await campaigns.store.act(campaign_id, action, campaigns.clock.now())
        except CampaignNotFound:
            raise _not_found(campaign_id) from None
        except BadTransition as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        return CampaignStatusChange(id=campaign_id, status=new)

    act.__name__ = f"{action}_campaign"
    act.__doc__ = {
        "pause": "Stop dialing new attempts; calls in progress go on.",
        "resume": "Dial again (a paused campaign).",
        "cancel": "Stop for good: waiting contacts are canceled; calls in progress go on.",
    }[action]
    return act


for _name in ("pause", "resume", "cancel"):
    router.add_api_route(
        f"/{{campaign_id}}/{_name}", _action(_name), methods=["POST"],
        responses={**NOT_FOUND, 409: {"description": "Not possible from this status"}},
    )


def _not_found(campaign_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no campaign {campaign_id}")


def _invalid(loc: list[Any], message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": loc, "msg": message, "type": "value_error"}]
    )
