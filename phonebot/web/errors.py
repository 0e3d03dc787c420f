"""The server's answers to the errors its routes raise, registered by `create_app`.

- `ParameterError` (a field Twilio or a caller sent that we can't take): 422 naming it.
- `StateUnavailable` (the shared state, Redis, is unreachable): 503 naming the cause; fail
  closed, so no dial-out or AMD verdict is taken without it.
- `TwilioUnavailable` (Twilio's REST API failed): 502, saying whether the call may have
  been placed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, status
from fastapi.responses import JSONResponse, Response
from loguru import logger

from phonebot.ops.metrics import DIALOUT, STATE_UNAVAILABLE
from phonebot.state import StateUnavailable
from phonebot.twilio.rest import TwilioUnavailable
from phonebot.twilio.twiml import ParameterError
from phonebot.web.services import services_of


async def parameter_error(request: Request, error: ParameterError) -> JSONResponse:
    return JSONResponse(
        {"detail": str(error), "field": error.field},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def state_error(request: Request, error: StateUnavailable) -> JSONResponse:
    """Fail closed, naming the cause: no dial-out or verdict is taken without it."""
    services = services_of(request)
    logger.warning(f"{request.url.path}: shared state unavailable ({error})")
    if request.url.path == "/dialout":
        services.metrics.call_refused(STATE_UNAVAILABLE, DIALOUT)
    detail = (
        f"shared state unavailable ({services.shared.backend}: {error}); "
        "no new calls until it is back"
    )
    return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


async def twilio_error(request: Request, error: TwilioUnavailable) -> JSONResponse:
    logger.warning(f"Twilio REST error {error.code}: {error.detail}: {error.message}")
    body = {
        "detail": error.detail,  # says whether the call may have been placed
        "code": error.code,
        "message": error.message,
        "call_may_have_been_placed": error.uncertain,
    }
    return JSONResponse(body, status_code=status.HTTP_502_BAD_GATEWAY)


ErrorHandler = Callable[..., Awaitable[Response]]  # (request, its exception type)
ERROR_HANDLERS: dict[type[Exception], ErrorHandler] = {
    ParameterError: parameter_error,
    StateUnavailable: state_error,
    TwilioUnavailable: twilio_error,
}
