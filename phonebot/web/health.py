"""`GET /health`: whether this process takes calls, for a load balancer and an operator.

503 while draining or while the shared state is unreachable (new calls would hear the busy
message). Under ENV=production a stranger gets only the status; the providers, version,
calls, records and shared state need the admin key.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, status
from fastapi.responses import Response
from pydantic import BaseModel

from phonebot import __version__
from phonebot.ai.providers import chosen_providers
from phonebot.records.models import RecordsHealth
from phonebot.state import CallAdmission, LeaseCounts, SharedState, StateUnavailable
from phonebot.web.auth import carries_admin_key
from phonebot.web.services import Services

router = APIRouter()


class StateHealth(BaseModel):
    backend: str  # "memory" or "redis"
    ok: bool
    error: str | None = None
    round_trips: int  # state operations this process sent (Redis commands/pipelines/scripts)


class HealthStatus(BaseModel):
    """What /health tells anyone under ENV=production: no version, pid, providers or
    Redis address for a stranger to map the deployment with."""

    status: str  # ok, draining, or degraded (shared state unreachable: no new calls)


class HealthResponse(HealthStatus):
    version: str
    offline: bool
    providers: dict[str, str]
    active_streams: int  # open /ws connections of this process, verified or not
    active_calls: int  # admitted streams running a call in this process
    reserved_calls: int  # webhooks answered whose stream has not connected yet (cluster)
    cluster_calls: int  # live calls of all processes sharing the state
    draining: bool
    pid: int  # this process: which worker answered (WORKERS > 1)
    records: RecordsHealth
    state: StateHealth


@router.get("/health")
async def health(
    request: Request, response: Response, services: Services
) -> HealthResponse | HealthStatus:
    """503 while draining or while the shared state is unreachable (new calls would
    hear the busy message), so a load balancer stops sending calls here. It asks the
    state each time, so it turns 200 again by itself once Redis is back. Under
    ENV=production only the status, unless the admin key comes with the request."""
    settings = services.settings
    providers = chosen_providers(settings)
    admission = services.admission
    state, counts = await state_health(services.shared, admission)
    if admission.draining or not state.ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    overall = "draining" if admission.draining else "ok" if state.ok else "degraded"
    if settings.env == "production" and not await carries_admin_key(request, services):
        return HealthStatus(status=overall)
    return HealthResponse(
        status=overall,
        version=__version__,
        offline=providers.offline,
        providers={"stt": providers.stt, "llm": providers.llm, "tts": providers.tts},
        active_streams=services.active_streams,
        active_calls=admission.process_live,
        reserved_calls=counts.reserved if counts else admission.process_reserved,
        cluster_calls=counts.live if counts else admission.process_live,
        draining=admission.draining,
        pid=os.getpid(),
        records=RecordsHealth(**services.records.health()),
        state=state,
    )


async def state_health(
    shared: SharedState, admission: CallAdmission
) -> tuple[StateHealth, LeaseCounts | None]:
    """Whether the shared state answers (PING, not counted), and its call counts."""
    try:
        await shared.ping()
        counts = await admission.counts(counted=False)
    except StateUnavailable as error:
        health = StateHealth(
            backend=shared.backend, ok=False, error=str(error), round_trips=shared.round_trips
        )
        return health, None
    return StateHealth(backend=shared.backend, ok=True, round_trips=shared.round_trips), counts
