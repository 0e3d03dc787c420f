"""How an app wires campaigns: their routers and their error answers.

    app = FastAPI(exception_handlers={..., **EXCEPTION_HANDLERS})   # phonebot.web.app
    for router in ROUTERS: app.include_router(router)

The app's `Campaigns` is one of its services (`phonebot.web.services.AppServices`).
Kept apart from `service` so that the routers, which depend on the service, are included
from here without `service` importing them back.
"""

from __future__ import annotations

from fastapi import Request, status
from fastapi.responses import JSONResponse

from phonebot.dnc.check import DoNotCallUnavailable
from phonebot.twilio.dial_guard import DialRefused
from phonebot.web.campaigns_api import router as api_router
from phonebot.web.campaigns_ui import router as ui_router
from phonebot.web.dnc_api import router as dnc_router

# Include BEFORE the records UI router: `/calls/ui/{call_sid}` would take
# `/calls/ui/campaigns`.
ROUTERS = (ui_router, api_router, dnc_router)


async def dial_refused(request: Request, error: DialRefused) -> JSONResponse:
    return JSONResponse({"detail": error.detail, "rule": error.rule},
                        status_code=status.HTTP_403_FORBIDDEN)


async def dnc_unavailable(request: Request, error: DoNotCallUnavailable) -> JSONResponse:
    return JSONResponse({"detail": str(error)},
                        status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


EXCEPTION_HANDLERS = {DialRefused: dial_refused, DoNotCallUnavailable: dnc_unavailable}
