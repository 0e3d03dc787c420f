"""The app's services: everything one app owns, as one typed object built once.

    services = AppServices.build(settings, records=records)   # phonebot.web.app.create_app
    app.state.services = services                              # the only attribute on app.state
    async def route(services: Services) -> ...: ...            # a route or a dependency
    services_of(request)                                       # code that only has a Request

Nothing here is a module global, so a test builds as many apps as it likes; an app it
assembles from routers alone gets its services from the same `AppServices.build`.
`Campaigns` is imported for its type only: campaigns sit below web/ and know nothing of
it, and `services` does not need the campaign routers that the app includes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, status
from starlette.requests import HTTPConnection

from phonebot.agents.registry import AgentRegistry
from phonebot.ai.http_pool import HttpPool
from phonebot.call.analysis import AnalysisJobs
from phonebot.config import Settings
from phonebot.ops.metrics import Metrics
from phonebot.records.service import Records
from phonebot.state import (
    AmdVerdicts,
    AuthLockout,
    CallAdmission,
    ReplayGuard,
    SharedRateLimiter,
    SharedState,
    TransferVerdicts,
    build_app_state,
)
from phonebot.state.memory import Clock
from phonebot.web.rejections import RejectionLog
from phonebot.web.shutdown import ActiveCalls

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from phonebot.campaigns.service import Campaigns


@dataclass
class AppServices:
    """What the routes, the lifespan and the calls of one app share.

    The state objects (replays, admission, the /dialout limit, AMD verdicts, the key
    lockout) sit on `shared`: in memory, or in Redis with REDIS_URL (`phonebot.state`).
    `campaigns` is None only in an app assembled without campaigns (a test's).
    """

    settings: Settings
    shared: SharedState
    admission: CallAdmission
    replays: ReplayGuard
    dialout_limiter: SharedRateLimiter
    amd_verdicts: AmdVerdicts
    transfer_verdicts: TransferVerdicts  # how warm transfers went (phonebot.call.warm_transfer)
    auth_lockout: AuthLockout  # failed key checks per client (phonebot.web.guards)
    records: Records  # started in the lifespan
    agents: AgentRegistry  # AGENTS_DIR, reloaded on SIGHUP and POST /agents/reload
    campaigns: Campaigns | None = None
    calls: ActiveCalls = field(default_factory=ActiveCalls)  # this process's calls, to drain
    # Post-call analyses running after their calls (phonebot.call.analysis), drained last.
    analyses: AnalysisJobs = field(default_factory=AnalysisJobs)
    rejections: RejectionLog = field(default_factory=RejectionLog)
    metrics: Metrics = field(default_factory=Metrics)  # GET /metrics; passed to each call
    # One HTTP connection pool for every call's AI services and analyses (closed last).
    http: HttpPool = field(default_factory=HttpPool.build)
    active_streams: int = 0  # open /ws connections of this process, verified or not

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        records: Records | None = None,
        shared: SharedState | None = None,
        campaigns: Campaigns | None = None,
        clock: Clock = time.monotonic,
        **given: Any,
    ) -> AppServices:
        """The services for `settings`: `shared` replaces the backend they pick, `records`
        the `Records(settings)` made here; `given` replaces any other field (a test's fake).
        Raises AgentFileError when the agent files can't be used."""
        state = build_app_state(settings, shared, clock)
        services = cls(
            settings=settings,
            shared=state.shared,
            admission=state.admission,
            replays=state.replays,
            dialout_limiter=state.dialout_limiter,
            amd_verdicts=state.amd_verdicts,
            transfer_verdicts=state.transfer_verdicts,
            auth_lockout=state.auth_lockout,
            records=records if records is not None else Records(settings),
            agents=given.pop("agents", None) or AgentRegistry(settings),
            campaigns=campaigns,
        )
        services = replace(services, **given)
        services.shared.on_error = services.metrics.state_error  # every Redis error, once
        return services


def app_services(app: Starlette) -> AppServices:
    """The services of `app` (the lifespan, the server's drain, tests)."""
    return app.state.services


def services_of(connection: HTTPConnection) -> AppServices:
    """The services of the app a request or websocket came to."""
    return app_services(connection.app)


# The dependency takes a request and a websocket alike.
Services = Annotated[AppServices, Depends(services_of)]


def get_campaigns(request: HTTPConnection) -> Campaigns:
    """The app's campaigns, or 503 when the server keeps no records (CALL_RECORDS=false)."""
    campaigns = services_of(request).campaigns
    if campaigns is None or not campaigns.enabled:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "campaigns need the call records database: CALL_RECORDS=false",
        )
    return campaigns
