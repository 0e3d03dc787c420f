"""The phone bot's HTTP and websocket server.

    POST /          Twilio voice webhook ("A call comes in") → TwiML <Connect><Stream>
    POST /outbound  the TwiML for calls placed by /dialout (Twilio fetches it on answer)
    WS   /ws        Twilio Media Streams → bot.py's pipeline
    POST /dialout   place an outbound call (Bearer DIALOUT_API_KEY)
    POST /amd       Twilio's answering-machine verdict for a dial-out call (signed)
    GET  /health    providers in use and version

Run it with `python server.py` (uvicorn on PORT, default 8000).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, status
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel

from bot import serve_call
from dialout import DialoutRequest, DialoutResponse, place_call
from phonebot import __version__
from phonebot.config import Settings, get_settings
from phonebot.logs import configure_logging
from phonebot.providers import chosen_providers
from phonebot.security import (
    TOKEN_PARAMETER,
    call_token,
    external_base_url,
    require_dialout_key,
    require_twilio_signature,
)
from phonebot.twilio_api import TwilioUnavailable
from phonebot.twiml import (
    ParameterError,
    busy_twiml,
    connect_stream_twiml,
    stream_target,
    validate_custom_parameters,
)
from phonebot.voicemail import (
    AMD_CALLBACK_PATH,
    AMD_PARAMETER,
    AMD_REQUESTED,
    AMD_VERDICTS,
    ANSWERED_BY,
)

CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")


class HealthResponse(BaseModel):
    status: str
    version: str
    offline: bool
    providers: dict[str, str]
    active_streams: int


def public_base_url(request: Request) -> str:
    settings: Settings = request.app.state.settings
    return external_base_url(request, settings.public_url)


async def call_twiml(request: Request, call_type: str) -> Response:
    """TwiML that connects a call to our media stream, carrying the call's parameters."""
    settings: Settings = request.app.state.settings
    form = await request.form()
    call_sid = str(form.get("CallSid", ""))
    if not call_sid:
        raise ParameterError("CallSid", "is required (this endpoint is for Twilio)")
    query, own = server_parameters(request.query_params, call_type)
    custom = validate_custom_parameters(query, settings, where="query")
    if request.app.state.active_streams >= settings.max_concurrent_calls:
        logger.warning(f"{call_type} call {call_sid}: busy ({settings.max_concurrent_calls} calls)")
        return Response(busy_twiml(), media_type="application/xml")
    parameters = {
        **custom,
        **own,
        "caller_id": str(form.get("From", "")),
        "called_number": str(form.get("To", "")),
        "call_type": call_type,
        TOKEN_PARAMETER: call_token(call_sid, settings.stream_token_secret),
    }
    target = stream_target(settings, public_base_url(request))
    logger.info(f"{call_type} call {call_sid}: streaming to {target.url}")
    return Response(connect_stream_twiml(target, parameters), media_type="application/xml")


def server_parameters(
    query: Mapping[str, str], call_type: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Split the query into the caller's parameters and the ones `/dialout` set itself.

    `amd=1` is ours, put on the `/outbound` URL by `/dialout` (which refuses it from its
    own callers); Twilio's signature covers the URL, so it arrives as we wrote it.
    Anywhere else it is refused, so a webhook can't make the bot wait for a verdict
    that will never come.
    """
    custom = dict(query)
    amd = custom.pop(AMD_PARAMETER, None)
    if amd is None:
        return custom, {}
    if call_type != "outbound" or amd != AMD_REQUESTED:
        raise ParameterError(f"query.{AMD_PARAMETER}", "is reserved; /dialout sets it")
    return custom, {AMD_PARAMETER: amd}


async def amd_verdict(request: Request) -> tuple[str, str, str]:
    """CallSid, AnsweredBy and MachineDetectionDuration (ms) of a Twilio async AMD callback.

    The CallSid keys the in-process registry, so it must look like one; ParameterError
    names the bad field.
    """
    form = await request.form()
    call_sid = str(form.get("CallSid", ""))
    answered_by = str(form.get("AnsweredBy", ""))
    if not CALL_SID.match(call_sid):
        raise ParameterError("CallSid", "must be CA followed by 32 hex digits")
    if answered_by not in ANSWERED_BY:
        raise ParameterError("AnsweredBy", f"must be one of {', '.join(sorted(ANSWERED_BY))}")
    duration = str(form.get("MachineDetectionDuration", ""))
    return call_sid, answered_by, duration if duration.isdigit() else "?"


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        providers = chosen_providers(settings)
        mode = "offline mode" if providers.offline else "online"
        logger.info(f"Phone bot {__version__} ({mode}): {providers.describe()}")
        if settings.twilio_auth_token is None:
            logger.warning("TWILIO_AUTH_TOKEN unset: webhook signatures are not checked")
        if settings.dialout_api_key is None:
            logger.info("DIALOUT_API_KEY unset: POST /dialout is disabled")
        yield

    app = FastAPI(title="Phone bot", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.active_streams = 0
    # In-process, shared with the bots this process runs (see phonebot.voicemail).
    app.state.amd_verdicts = AMD_VERDICTS

    @app.exception_handler(ParameterError)
    async def parameter_error(request: Request, error: ParameterError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error), "field": error.field},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(TwilioUnavailable)
    async def twilio_error(request: Request, error: TwilioUnavailable) -> JSONResponse:
        logger.warning(f"Twilio REST error {error.code}: {error.message}")
        return JSONResponse(
            {"detail": "Twilio rejected the request", "code": error.code, "message": error.message},
            status_code=status.HTTP_502_BAD_GATEWAY,
        )

    @app.post("/", dependencies=[Depends(require_twilio_signature)])
    async def voice_webhook(request: Request) -> Response:
        """Twilio's "A call comes in" webhook (also usable for a SIP domain)."""
        return await call_twiml(request, "inbound")

    @app.post("/outbound", dependencies=[Depends(require_twilio_signature)])
    async def outbound_twiml(request: Request) -> Response:
        """Fetched by Twilio when a call placed by /dialout connects."""
        return await call_twiml(request, "outbound")

    @app.post(
        AMD_CALLBACK_PATH,
        status_code=status.HTTP_204_NO_CONTENT,
        dependencies=[Depends(require_twilio_signature)],
    )
    async def amd_callback(request: Request) -> Response:
        """Twilio's async answering-machine verdict for a call placed by /dialout."""
        call_sid, answered_by, duration = await amd_verdict(request)
        logger.info(f"Call {call_sid} answered by {answered_by} (detection took {duration} ms)")
        app.state.amd_verdicts.set(call_sid, answered_by)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        app.state.active_streams += 1
        try:
            await serve_call(websocket, settings)
        finally:
            app.state.active_streams -= 1

    @app.post(
        "/dialout",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(require_dialout_key)],
    )
    async def dialout(body: DialoutRequest, request: Request) -> DialoutResponse:
        if app.state.active_streams >= settings.max_concurrent_calls:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"at capacity: {settings.max_concurrent_calls} concurrent calls "
                "(MAX_CONCURRENT_CALLS)",
            )
        return await place_call(body, settings, public_base_url(request))

    @app.get("/health")
    async def health() -> HealthResponse:
        providers = chosen_providers(settings)
        return HealthResponse(
            status="ok",
            version=__version__,
            offline=providers.offline,
            providers={"stt": providers.stt, "llm": providers.llm, "tts": providers.tts},
            active_streams=app.state.active_streams,
        )

    return app


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


if __name__ == "__main__":
    main()
