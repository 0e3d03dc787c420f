"""`POST /dialout`: place an outbound call (Bearer DIALOUT_API_KEY, rate-limited per client).

The dial-out itself (checks, Twilio's REST call) is `phonebot.twilio.dialout.place_call`;
this route adds what only the server knows: its rate limit and key, its call cap and
drain, the agents in use (a named agent must be one: 422 naming `agent`), the do-not-call
list, and the call's record from the moment Twilio accepts it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status

from phonebot.ops.metrics import DIALOUT, DRAINING, RATE_LIMITED
from phonebot.twilio.dialout import (
    DialoutRequest,
    DialoutResponse,
    check_agent_named,
    place_call,
)
from phonebot.twilio.signatures import external_base_url
from phonebot.web.auth import require_dialout_key
from phonebot.web.guards import limit_dialout_rate
from phonebot.web.services import Services, services_of

router = APIRouter()


async def dialout_rate(request: Request) -> None:
    """`limit_dialout_rate`, with its 429s counted in /metrics."""
    try:
        await limit_dialout_rate(request)
    except HTTPException as refused:
        if refused.status_code == status.HTTP_429_TOO_MANY_REQUESTS:
            services_of(request).metrics.call_refused(RATE_LIMITED, DIALOUT)
        raise


@router.post(
    "/dialout",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(dialout_rate), Depends(require_dialout_key)],
)
async def dialout(body: DialoutRequest, request: Request, services: Services) -> DialoutResponse:
    admission = services.admission
    if admission.draining:
        services.metrics.call_refused(DRAINING, DIALOUT)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the server is shutting down; no new calls"
        )
    if refusal := await admission.refusal():  # 503 if the shared state is down
        services.metrics.call_refused(refusal, DIALOUT)
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, refusal)
    field = "agent" if body.agent is not None else "parameters.agent"
    check_agent_named(body.call_parameters(), services.agents.current, field=field)
    if services.campaigns is not None:
        await services.campaigns.dnc.check(body.to)  # the do-not-call list: 403 naming it
    settings = services.settings
    base_url = external_base_url(request, settings.public_url)
    placed = await place_call(body, settings, base_url)  # guard: 403
    services.records.writer.dialout_placed(
        placed.call_sid,
        to=placed.to,
        from_number=body.from_ or settings.twilio_phone_number,
        parameters=body.call_parameters(),
    )
    return placed
