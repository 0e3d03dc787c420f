"""The phone bot's app: its services, its routers, its guards and error answers.

    POST /          Twilio voice webhook ("A call comes in") → TwiML <Connect><Stream>
    POST /outbound  the TwiML for calls placed by /dialout (Twilio fetches it on answer)
    WS   /ws        Twilio Media Streams → the bot's pipeline            (web/media.py)
    POST /dialout   place an outbound call (Bearer DIALOUT_API_KEY)      (web/dialout.py)
    POST /amd       Twilio's answering-machine verdict for a dial-out call (signed)
    POST /status    Twilio's status callbacks for a dial-out call (signed) (web/callbacks.py)
    GET  /calls     the call records (Bearer ADMIN_API_KEY; phonebot.web.calls_api)
    GET  /calls/ui  the calls web page (login with ADMIN_API_KEY; phonebot.web.calls_ui)
    GET  /agents    the agents in use (Bearer ADMIN_API_KEY; phonebot.web.agents_api), and
                    their page /calls/ui/agents (phonebot.web.agents_ui)
    POST /agents/reload  read AGENTS_DIR again (Bearer ADMIN_API_KEY; SIGHUP does it too)
    /campaigns, /dnc  outbound campaigns and the do-not-call list (Bearer ADMIN_API_KEY;
                    phonebot.campaigns, whose scheduler runs in the lifespan)
    GET  /health    providers in use, version, calls, records, shared state, draining
                    (503 while shutting down or while the shared state is unreachable)
    GET  /metrics   Prometheus series (METRICS_TOKEN when set)           (web/metrics.py)

In front of every route sit the HTTP guards of `phonebot.web.guards` (body size, client
IP, /dialout rate) and the keys of `phonebot.web.auth`; the app's services (shared state,
records, campaigns, metrics, ...) are one typed object (`phonebot.web.services`). When
Redis is unreachable new calls hear the busy message, /dialout answers 503, live calls go
on, and it all recovers by itself.
"""

from __future__ import annotations

from fastapi import FastAPI

from phonebot import __version__
from phonebot.campaigns.service import Campaigns
from phonebot.config import Settings
from phonebot.records import Records
from phonebot.state import SharedState
from phonebot.web import callbacks, dialout, health, media, metrics, webhooks
from phonebot.web.agents_api import router as agents_router
from phonebot.web.agents_ui import router as agents_ui_router
from phonebot.web.calls_api import router as records_router
from phonebot.web.calls_ui import router as records_ui_router
from phonebot.web.campaigns import EXCEPTION_HANDLERS as CAMPAIGN_ERRORS
from phonebot.web.campaigns import ROUTERS as CAMPAIGN_ROUTERS
from phonebot.web.errors import ERROR_HANDLERS
from phonebot.web.guards import BodyCap, BodySizeLimit
from phonebot.web.lifespan import lifespan
from phonebot.web.safety import require_safe_configuration
from phonebot.web.services import AppServices

# In this order: the campaigns' and agents' pages before the records' pages, whose
# /calls/ui/{call_sid} would take /calls/ui/campaigns and /calls/ui/agents; the records'
# pages before the records API, whose /calls/{call_sid} would take /calls/ui.
ROUTERS = (
    metrics.router,
    *CAMPAIGN_ROUTERS,
    agents_ui_router,
    agents_router,
    records_ui_router,
    records_router,
    webhooks.router,
    callbacks.router,
    media.router,
    dialout.router,
    health.router,
)


def create_app(settings: Settings, shared: SharedState | None = None) -> FastAPI:
    """The app; `shared` replaces the state backend the settings pick (tests).

    Raises `UnsafeConfiguration` for settings it must not run with, and
    `UnsupportedDatabase` for a DATABASE_URL it can't use.
    """
    require_safe_configuration(settings)
    records = Records(settings)  # started in the lifespan
    app = FastAPI(
        title="Phone bot",
        version=__version__,
        lifespan=lifespan,
        exception_handlers={**ERROR_HANDLERS, **CAMPAIGN_ERRORS},
        **api_docs(settings),
    )
    app.state.services = AppServices.build(
        settings, records=records, shared=shared, campaigns=Campaigns(settings, records)
    )
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_request_body_bytes,
        per_path={
            "/campaigns": BodyCap(settings.max_campaign_body_bytes, "MAX_CAMPAIGN_BODY_BYTES")
        },
    )
    for router in ROUTERS:
        app.include_router(router)
    return app


def api_docs(settings: Settings) -> dict[str, str | None]:
    """FastAPI's /docs, /redoc and /openapi.json: off under ENV=production, where they would
    hand a stranger the map of every route and field."""
    if settings.env == "production":
        return {"docs_url": None, "redoc_url": None, "openapi_url": None}
    return {}
