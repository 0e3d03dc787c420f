"""The phone bot's HTTP and websocket server.

    POST /          Twilio voice webhook ("A call comes in") → TwiML <Connect><Stream>
    POST /outbound  the TwiML for calls placed by /dialout (Twilio fetches it on answer)
    WS   /ws        Twilio Media Streams → bot.py's pipeline
    POST /dialout   place an outbound call (Bearer DIALOUT_API_KEY)
    POST /amd       Twilio's answering-machine verdict for a dial-out call (signed)
    POST /status    Twilio's status callbacks for a dial-out call (signed): its final status
    GET  /calls     the call records (Bearer ADMIN_API_KEY; phonebot.records.api)
    GET  /calls/ui  the calls web page (login with ADMIN_API_KEY; phonebot.records.ui)
    GET  /health    providers in use, version, calls, records, draining (503 while shutting down)

Run it with `python server.py` (uvicorn on PORT, default 8000). In front of every route
sit the abuse limits of `phonebot.limits` (body size, replays, admission, /dialout rate);
SIGTERM drains calls before exiting (`phonebot.shutdown`).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, status
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel

from bot import serve_call
from dialout import (
    STATUS_CALLBACK_PATH,
    DialoutRequest,
    DialoutResponse,
    StatusCallback,
    place_call,
)
from phonebot import __version__
from phonebot.caller_id import presented_caller_id
from phonebot.config import Settings, get_settings
from phonebot.limits import (
    BodySizeLimit,
    CallAdmission,
    RateLimiter,
    RejectionLog,
    ReplayGuard,
    StreamGate,
    limit_dialout_rate,
)
from phonebot.logs import configure_logging
from phonebot.models import load_shared_models
from phonebot.providers import chosen_providers
from phonebot.records import Records
from phonebot.records.api import router as records_router
from phonebot.records.db import UnsupportedDatabase
from phonebot.records.models import RecordsHealth
from phonebot.records.schema import utcnow
from phonebot.records.ui import router as records_ui_router
from phonebot.security import (
    TOKEN_PARAMETER,
    UnsafeConfiguration,
    call_token,
    checks_webhook_signatures,
    external_base_url,
    require_dialout_key,
    require_safe_configuration,
    require_twilio_signature,
)
from phonebot.shutdown import UVICORN_CLOSE_TIMEOUT_S, Drain, GracefulServer
from phonebot.stream_guard import MAX_MEDIA_MESSAGE_BYTES
from phonebot.twilio_api import TwilioUnavailable
from phonebot.twiml import (
    ParameterError,
    busy_twiml,
    closing_phrase,
    connect_stream_twiml,
    insecure_stream_url,
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
    active_streams: int  # open /ws connections, verified or not
    active_calls: int  # admitted streams running a call
    reserved_calls: int  # webhooks answered whose stream has not connected yet
    draining: bool
    records: RecordsHealth


def public_base_url(request: Request) -> str:
    settings: Settings = request.app.state.settings
    return external_base_url(request, settings.public_url)


async def call_twiml(request: Request, call_type: str) -> Response:
    """TwiML that connects a call to our media stream, carrying the call's parameters.

    Answered once per CallSid (`answered_once`); a call that can't be taken (capacity,
    shutdown) hears the busy message instead.
    """
    settings: Settings = request.app.state.settings
    form = await request.form()
    call_sid = str(form.get("CallSid", ""))
    if not call_sid:
        raise ParameterError("CallSid", "is required (this endpoint is for Twilio)")
    replays: ReplayGuard = request.app.state.replays
    if (again := replays.answer_for_retry(request, call_sid)) is not None:
        # Not recorded again: the record keeps when the call was first answered.
        logger.info(f"{call_type} call {call_sid}: Twilio retried its webhook; same answer")
        return Response(again, media_type="application/xml")
    with answered_once(request, call_sid):
        twiml = answer_call(request, settings, call_sid, call_type, form)
        replays.remember_answer(request, call_sid, twiml)
        return Response(twiml, media_type="application/xml")


def answer_call(
    request: Request, settings: Settings, call_sid: str, call_type: str, form: Mapping
) -> str:
    """The TwiML for a call we haven't answered yet: the stream, or busy (no slot)."""
    query, own = server_parameters(request.query_params, call_type)
    custom = validate_custom_parameters(query, settings, where="query")
    parameters = {
        **custom,
        **own,
        # A withheld number (+266696687, Anonymous, ...) is passed on as no caller ID.
        "caller_id": presented_caller_id(str(form.get("From", ""))),
        "called_number": str(form.get("To", "")),
        "call_type": call_type,
        TOKEN_PARAMETER: call_token(call_sid, settings.stream_token_secret),
    }
    target = stream_target(settings, public_base_url(request))
    if refusal := admit_webhook(request.app.state.admission, settings, call_sid):
        logger.warning(f"{call_type} call {call_sid}: busy ({refusal})")
        return busy_twiml()
    if problem := insecure_stream_url(target.url):
        logger.error(f"{call_type} call {call_sid}: {problem}")
    logger.info(f"{call_type} call {call_sid}: streaming to {target.url}")
    # The record starts here; a call turned away as busy above leaves none.
    request.app.state.records.writer.call_updated(call_sid, webhook_answered_at=utcnow())
    return connect_stream_twiml(target, parameters, closing_phrase(settings))


def admit_webhook(admission: CallAdmission, settings: Settings, call_sid: str) -> str | None:
    """Reserve a slot for a call about to stream here; why not, or None.

    Only a stream to this server reserves: in production the stream goes to Pipecat
    Cloud, which admits calls itself, so only draining turns a call away.
    """
    if settings.env == "local":
        return admission.reserve(call_sid)
    return "the server is shutting down" if admission.draining else None


@contextmanager
def answered_once(request: Request, call_sid: str) -> Iterator[None]:
    """409 for a webhook we already answered (same CallSid or idempotency token).

    Runs after the signature check, so only Twilio-signed requests are remembered and a
    stranger can't block a real call by sending its CallSid first. A request that fails
    here (any exception) is forgotten, so Twilio's retry of it is answered. Twilio's retry
    of one we answered never gets here: `ReplayGuard.answer_for_retry` answers it first.
    """
    replays: ReplayGuard = request.app.state.replays
    keys = replays.keys(request, call_sid)
    if replayed := replays.claim(keys):
        header = {"CallSid": "CallSid", "Idempotency": "I-Twilio-Idempotency-Token"}
        request.app.state.rejections.note(f"409 replayed webhook to {request.url.path}")
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"a webhook with this {header[replayed.split(':', 1)[0]]} was already answered; "
            "each signed request is accepted once",
        )
    try:
        yield
    except BaseException:
        replays.forget(keys)
        raise


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


def record_dialout(
    records: Records, body: DialoutRequest, placed: DialoutResponse, settings: Settings
) -> None:
    """A dial-out's record starts when Twilio accepts it, with its campaign, so one that
    is never answered is still found by campaign_id or customer_id."""
    fields = {
        "direction": "outbound",
        "from_number": body.from_ or settings.twilio_phone_number,
        "to_number": placed.to,
        "parameters": body.parameters,
        "campaign_id": body.parameters.get("campaign_id"),
        "customer_id": body.parameters.get("customer_id"),
    }
    records.writer.call_updated(placed.call_sid, **given(fields))


def record_status(records: Records, update: StatusCallback) -> None:
    """A final CallStatus goes on the record (and closes it, with a `call.failed` event,
    when the call never connected); progress only makes sure the record exists.

    Only final statuses are written: Twilio's callbacks may arrive out of order, and a
    late "ringing" must not overwrite "completed".
    """
    fields = given({"from_number": update.from_, "to_number": update.to})
    if update.final:
        logger.info(f"Call {update.call_sid}: Twilio's final status {update.status}")
        records.writer.dialout_status(update.call_sid, update.status, **fields)
    else:
        logger.debug(f"Call {update.call_sid}: Twilio status {update.status}")
        records.writer.call_updated(update.call_sid, direction="outbound", **fields)


def given(fields: dict[str, object]) -> dict[str, object]:
    """The fields that have a value: an update must not blank what an earlier one set."""
    return {name: value for name, value in fields.items() if value is not None}


async def warm_up_models(offline_stt: bool) -> None:
    """Load the shared VAD / Smart Turn sessions (and offline STT workers) before the first call.

    Otherwise the first caller pays for it, and the load runs on the event loop that
    every other call's audio pacing shares.
    """
    await asyncio.to_thread(load_shared_models)
    if offline_stt:
        from phonebot.offline.stt import start_decoder_pool

        await start_decoder_pool()


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        providers = chosen_providers(settings)
        mode = "offline mode" if providers.offline else "online"
        logger.info(f"Phone bot {__version__} ({mode}): {providers.describe()}")
        if settings.webhook_auth == "external":
            logger.info("WEBHOOK_AUTH=external: webhook signatures are left to your gateway")
        elif not checks_webhook_signatures(settings):
            logger.warning("TWILIO_AUTH_TOKEN unset: webhook signatures are not checked")
        if settings.dialout_api_key is None:
            logger.info("DIALOUT_API_KEY unset: POST /dialout is disabled")
        await warm_up_models(providers.stt == "offline")
        await records.start()
        try:
            yield
        finally:
            # Calls have drained by now (phonebot.shutdown runs before the lifespan ends):
            # their last writes are queued, and are written here.
            await records.stop()

    require_safe_configuration(settings)
    app = FastAPI(title="Phone bot", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_bytes)
    app.state.settings = settings
    app.state.active_streams = 0
    app.state.admission = CallAdmission(settings)
    app.state.replays = ReplayGuard(
        settings.replay_cache_ttl_s,
        settings.replay_cache_size,
        retry_window_s=settings.webhook_retry_window_s,
    )
    app.state.dialout_limiter = RateLimiter(
        settings.dialout_rate_limit_per_minute, settings.dialout_rate_limit_burst
    )
    app.state.rejections = RejectionLog()
    # In-process, shared with the bots this process runs (see phonebot.voicemail).
    app.state.amd_verdicts = AMD_VERDICTS
    app.state.records = records = Records(settings)  # started in the lifespan
    app.include_router(records_ui_router)  # first: /calls/{call_sid} would take /calls/ui
    app.include_router(records_router)

    @app.exception_handler(ParameterError)
    async def parameter_error(request: Request, error: ParameterError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error), "field": error.field},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(TwilioUnavailable)
    async def twilio_error(request: Request, error: TwilioUnavailable) -> JSONResponse:
        logger.warning(f"Twilio REST error {error.code}: {error.detail}: {error.message}")
        body = {
            "detail": error.detail,  # says whether the call may have been placed
            "code": error.code,
            "message": error.message,
            "call_may_have_been_placed": error.uncertain,
        }
        return JSONResponse(body, status_code=status.HTTP_502_BAD_GATEWAY)

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
        records.writer.call_updated(call_sid, amd_verdict=answered_by)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.post(
        STATUS_CALLBACK_PATH,
        status_code=status.HTTP_204_NO_CONTENT,
        dependencies=[Depends(require_twilio_signature)],
    )
    async def status_callback(request: Request) -> Response:
        """Twilio's status callbacks for a call placed by /dialout: its progress, and its
        final CallStatus, recorded also for a call that never connected (busy, …)."""
        update = StatusCallback.from_form(await request.form())
        record_status(records, update)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        """A stream runs its call only once admitted (single-use token, capacity, drain)."""
        await websocket.accept()
        app.state.active_streams += 1
        gate = StreamGate(app.state.admission)
        try:
            writer = records.writer if records.enabled else None  # None: no per-call record work
            await serve_call(websocket, settings, admit=gate, records=writer)
        finally:
            gate.release()
            app.state.active_streams -= 1

    @app.post(
        "/dialout",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(limit_dialout_rate), Depends(require_dialout_key)],
    )
    async def dialout(body: DialoutRequest, request: Request) -> DialoutResponse:
        admission: CallAdmission = app.state.admission
        if admission.draining:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "the server is shutting down; no new calls"
            )
        if refusal := admission.refusal():
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, refusal)
        placed = await place_call(body, settings, public_base_url(request))
        record_dialout(records, body, placed, settings)
        return placed

    @app.get("/health")
    async def health(response: Response) -> HealthResponse:
        """503 while draining, so a load balancer stops sending calls here."""
        providers = chosen_providers(settings)
        admission: CallAdmission = app.state.admission
        if admission.draining:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return HealthResponse(
            status="draining" if admission.draining else "ok",
            version=__version__,
            offline=providers.offline,
            providers={"stt": providers.stt, "llm": providers.llm, "tts": providers.tts},
            active_streams=app.state.active_streams,
            active_calls=admission.live,
            reserved_calls=admission.reserved,
            draining=admission.draining,
            records=RecordsHealth(**records.health()),
        )

    return app


def main() -> None:
    """uvicorn, with our signal handling: SIGTERM drains calls, a second one exits now."""
    settings = get_settings()
    configure_logging(settings)
    try:
        app = create_app(settings)
    except (UnsafeConfiguration, UnsupportedDatabase) as problem:
        logger.error(str(problem))
        sys.exit(2)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=MAX_MEDIA_MESSAGE_BYTES,
        timeout_graceful_shutdown=UVICORN_CLOSE_TIMEOUT_S,
    )
    server = GracefulServer(config, Drain(settings, app.state.admission))
    server.run()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
