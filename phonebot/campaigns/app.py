"""How the server wires campaigns: their routers, error answers and `app.state.campaigns`.

    campaigns = install_campaigns(app, settings, records)   # in create_app

Kept apart from `service` so that the routers, which depend on the service, are included
from here without `service` importing them back.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from phonebot.campaigns.api import router as api_router
from phonebot.campaigns.dial_guard import DialRefused
from phonebot.campaigns.dnc import router as dnc_router
from phonebot.campaigns.service import Campaigns, DoNotCallUnavailable
from phonebot.campaigns.ui import router as ui_router
from phonebot.config import Settings


def install_campaigns(app: FastAPI, settings: Settings, records: Any, **options: Any) -> Campaigns:
    """Routers (API, do-not-call, pages) and error answers; `app.state.campaigns`.

    Include BEFORE the records UI router: `/calls/ui/{call_sid}` would take
    `/calls/ui/campaigns`."""
    campaigns = Campaigns(settings, records, **options)
    app.state.campaigns = campaigns
    app.include_router(ui_router)
    app.include_router(api_router)
    app.include_router(dnc_router)

    @app.exception_handler(DialRefused)
    async def dial_refused(request: Request, error: DialRefused) -> JSONResponse:
        return JSONResponse({"detail": error.detail, "rule": error.rule},
                            status_code=status.HTTP_403_FORBIDDEN)

    @app.exception_handler(DoNotCallUnavailable)
    async def dnc_unavailable(request: Request, error: DoNotCallUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(error)},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    return campaigns
