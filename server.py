"""The phone bot's HTTP and websocket server.

    POST /          Twilio voice webhook ("A call comes in") → TwiML <Connect><Stream>
    POST /outbound  the TwiML for calls placed by /dialout (Twilio fetches it on answer)
    WS   /ws        Twilio Media Streams → bot.py's pipeline
    POST /dialout   place an outbound call (Bearer DIALOUT_API_KEY)
    POST /amd       Twilio's answering-machine verdict for a dial-out call (signed)
    POST /status    Twilio's status callbacks for a dial-out call (signed): its final status
    GET  /calls     the call records (Bearer ADMIN_API_KEY; phonebot.records.api)
    GET  /calls/ui  the calls web page (login with ADMIN_API_KEY; phonebot.records.ui)
    /campaigns, /dnc  outbound campaigns and the do-not-call list (Bearer ADMIN_API_KEY;
                    phonebot.campaigns, whose scheduler runs in the lifespan)
    GET  /health    providers in use, version, calls, records, shared state, draining
                    (503 while shutting down or while the shared state is unreachable)

Run it with `python server.py` (uvicorn on PORT, default 8000; `--workers N` runs N
processes sharing the port, `phonebot.workers`). In front of every route
sit the HTTP guards of `phonebot.http_guards` (body size, client IP, /dialout rate) and
the shared state of `phonebot.state` (replays, call admission, AMD verdicts: in memory,
or in Redis with REDIS_URL so several processes share them); SIGTERM drains calls before
exiting (`phonebot.shutdown`). When Redis is unreachable new calls hear the busy message,
/dialout answers 503, live calls go on, and it all recovers by itself.
"""

from __future__ import annotations

# First: with LOG_FORMAT=json, what Pipecat logs on import is held for the JSON log.
import phonebot.log_start  # noqa: F401  # isort: skip

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, status
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from phonebot.campaigns.app import install_campaigns
from phonebot.config import Settings, get_settings
from phonebot.diagnostics import resource_usage_log
from phonebot.http_guards import (
    BodyCap,
    BodySizeLimit,
    RejectionLog,
    key_matches,
    limit_dialout_rate,
)
from phonebot.inference import load_shared_models
from phonebot.inference.turn import SMART_TURN_THREADS, smart_turn_executor
from phonebot.logs import configure_logging
from phonebot.metrics import (
    DIALOUT,
    DRAINING,
    RATE_LIMITED,
    REPLAY,
    STATE_UNAVAILABLE,
    WEBHOOK,
    Metrics,
)
from phonebot.metrics import router as metrics_router
from phonebot.providers import chosen_providers
from phonebot.records import Records
from phonebot.records.api import router as records_router
from phonebot.records.callbacks import status_refusal, verdict_refusal
from phonebot.records.db import UnsupportedDatabase
from phonebot.records.limits import check_webhook
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
from phonebot.shutdown import UVICORN_CLOSE_TIMEOUT_S, ActiveCalls, Drain, GracefulServer
from phonebot.state import (
    CallAdmission,
    LeaseCounts,
    ReplayGuard,
    SharedState,
    StateUnavailable,
    StreamGate,
    build_app_state,
)
from phonebot.stream_guard import MAX_MEDIA_MESSAGE_BYTES
from phonebot.threads import start_every_thread, started_default_executor
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
from phonebot.voicemail import AMD_CALLBACK_PATH, AMD_PARAMETER, AMD_REQUESTED, ANSWERED_BY
from phonebot.workers import EXIT_CONFIG, inherited_socket, run_workers

CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")


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


def public_base_url(request: Request) -> str:
    settings: Settings = request.app.state.settings
    return external_base_url(request, settings.public_url)


async def call_twiml(request: Request, call_type: str) -> Response:
    """TwiML that connects a call to our media stream, carrying the call's parameters.

    Answered once per CallSid (`answered_once`); a call that can't be taken (capacity,
    shutdown, shared state unreachable) hears the busy message instead: never a hang, and
    never a stream we couldn't account for.
    """
    settings: Settings = request.app.state.settings
    form = await request.form()
    call_sid = str(form.get("CallSid", ""))
    if not call_sid:
        raise ParameterError("CallSid", "is required (this endpoint is for Twilio)")
    try:
        twiml = await webhook_answer(request, settings, call_sid, call_type, form)
    except StateUnavailable as error:
        logger.warning(f"{call_type} call {call_sid}: busy (shared state unavailable: {error})")
        request.app.state.metrics.call_refused(STATE_UNAVAILABLE, WEBHOOK)
        twiml = busy_twiml()
    return Response(twiml, media_type="application/xml")


async def webhook_answer(
    request: Request, settings: Settings, call_sid: str, call_type: str, form: Mapping
) -> str:
    """The TwiML for this webhook: the same as before for Twilio's retry, else a new one.

    A CallSid whose record shows its webhook was answered is a replay (409) even after the
    replay cache forgot it (REPLAY_CACHE_TTL_S). Fields its record can't hold: 422.
    """
    check_webhook(form, request.query_params)
    replays: ReplayGuard = request.app.state.replays
    if (again := await replays.answer_for_retry(request, call_sid)) is not None:
        # Not recorded again: the record keeps when the call was first answered.
        logger.info(f"{call_type} call {call_sid}: Twilio retried its webhook; same answer")
        return again
    async with answered_once(request, call_sid):
        if await request.app.state.records.answered_before(call_sid):
            request.app.state.rejections.note(f"409 replayed webhook to {request.url.path}")
            request.app.state.metrics.call_refused(REPLAY, WEBHOOK)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                "a webhook with this CallSid was already answered (its call has a record); "
                "each signed request is accepted once",
            )
        twiml = await answer_call(request, settings, call_sid, call_type, form)
    try:
        await replays.remember_answer(request, call_sid, twiml)
    except StateUnavailable as error:  # the call is answered; only a retry would miss it
        logger.warning(f"{call_type} call {call_sid}: answer not kept for retries ({error})")
    return twiml


async def answer_call(
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
    }
    # Bound to this call, these parameters and a short life (phonebot.security).
    expires_at = time.time() + settings.stream_token_ttl_s
    parameters[TOKEN_PARAMETER] = call_token(
        call_sid, settings.stream_token_secret, parameters, expires_at
    )
    target = stream_target(settings, public_base_url(request))
    if refusal := await admit_webhook(request.app.state.admission, settings, call_sid):
        logger.warning(f"{call_type} call {call_sid}: busy ({refusal})")
        request.app.state.metrics.call_refused(refusal, WEBHOOK)
        return busy_twiml()
    request.app.state.metrics.call_admitted(WEBHOOK)
    if problem := insecure_stream_url(target.url):
        logger.error(f"{call_type} call {call_sid}: {problem}")
    logger.info(f"{call_type} call {call_sid}: streaming to {target.url}")
    # The record starts here; a call turned away as busy above leaves none.
    request.app.state.records.writer.call_updated(call_sid, webhook_answered_at=utcnow())
    return connect_stream_twiml(target, parameters, closing_phrase(settings))


async def admit_webhook(
    admission: CallAdmission, settings: Settings, call_sid: str
) -> str | None:
    """Reserve a slot for a call about to stream here; why not, or None.

    Only a stream to this server reserves: in production the stream goes to Pipecat
    Cloud, which admits calls itself, so only draining turns a call away.
    """
    if settings.env == "local":
        return await admission.reserve(call_sid)
    return "the server is shutting down" if admission.draining else None


@asynccontextmanager
async def answered_once(request: Request, call_sid: str) -> AsyncIterator[None]:
    """409 for a webhook we already answered (same CallSid or idempotency token).

    Runs after the signature check, so only Twilio-signed requests are remembered and a
    stranger can't block a real call by sending its CallSid first. A request that fails
    here (any exception) is forgotten, so Twilio's retry of it is answered. Twilio's retry
    of one we answered never gets here: `ReplayGuard.answer_for_retry` answers it first.
    The claim holds across processes (SET NX on the shared state).
    """
    replays: ReplayGuard = request.app.state.replays
    keys = replays.keys(request, call_sid)
    if replayed := await replays.claim(keys):
        header = {"CallSid": "CallSid", "Idempotency": "I-Twilio-Idempotency-Token"}
        request.app.state.rejections.note(f"409 replayed webhook to {request.url.path}")
        request.app.state.metrics.call_refused(REPLAY, WEBHOOK)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"a webhook with this {header[replayed.split(':', 1)[0]]} was already answered; "
            "each signed request is accepted once",
        )
    try:
        yield
    except BaseException:
        with suppress(StateUnavailable):  # then the keys expire after REPLAY_CACHE_TTL_S
            await replays.forget(keys)
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

    The CallSid keys the shared verdict store, so it must look like one; ParameterError
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


async def record_status(records: Records, update: StatusCallback) -> bool:
    """A final CallStatus goes on the record (and closes it, with a `call.failed` event,
    when the call never connected); progress only makes sure the record exists. From and
    To are kept only when the record has none: a callback never changes who called.

    Only a callback that moves the call forward counts: Twilio's callbacks may arrive out
    of order, and a replayed one late, so one for a call already final (or ended), or one
    that would move it back, is ignored with one log line (`phonebot.records.callbacks`;
    the writer's UPDATE holds the same rule when two callbacks race). Whether it counted.
    """
    if reason := status_refusal(await records.progress(update.call_sid), update.status):
        logger.info(f"Call {update.call_sid}: Twilio status {update.status} ignored ({reason})")
        return False
    if update.final:
        logger.info(f"Call {update.call_sid}: Twilio's final status {update.status}")
    else:
        logger.debug(f"Call {update.call_sid}: Twilio status {update.status}")
    fields = given({"from_number": update.from_, "to_number": update.to})
    records.writer.dialout_status(update.call_sid, update.status, **fields)
    return True


async def end_stream_token(admission: CallAdmission, update: StatusCallback) -> None:
    """A call Twilio reports over can't start a stream any more, on any process: its token
    is spent as its stream would have spent it. Best effort: the token expires anyway."""
    try:
        await admission.call_over(update.call_sid)
    except StateUnavailable as error:
        logger.warning(f"Call {update.call_sid}: stream token not ended ({error})")


def given(fields: dict[str, object]) -> dict[str, object]:
    """The fields that have a value: an update must not blank what an earlier one set."""
    return {name: value for name, value in fields.items() if value is not None}


async def warm_up_models(offline_stt: bool) -> None:
    """Start the thread pools, and load the shared VAD / Smart Turn sessions (and offline
    STT workers), before the first call.

    Otherwise the first caller pays for it, and the load runs on the event loop that
    every other call's audio pacing shares.
    """
    loop = asyncio.get_running_loop()
    # Every pool thread now, not under the first peak (phonebot.threads).
    loop.set_default_executor(started_default_executor())
    start_every_thread(smart_turn_executor(), SMART_TURN_THREADS)
    await asyncio.to_thread(load_shared_models)
    if offline_stt:
        from phonebot.offline.stt import start_decoder_pool

        await start_decoder_pool()


def stop_models(offline_stt: bool) -> None:
    """End the offline STT workers at once: the calls have drained, and waiting for them
    (the stdlib's exit hook does) held the exit ~10 s when one was still starting."""
    if offline_stt:
        from phonebot.offline.stt import shutdown_decoder_pool

        shutdown_decoder_pool(wait=False)


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


async def dialout_rate(request: Request) -> None:
    """`limit_dialout_rate`, with its 429s counted in /metrics."""
    try:
        await limit_dialout_rate(request)
    except HTTPException as refused:
        if refused.status_code == status.HTTP_429_TOO_MANY_REQUESTS:
            request.app.state.metrics.call_refused(RATE_LIMITED, DIALOUT)
        raise


def api_docs(settings: Settings) -> dict[str, str | None]:
    """FastAPI's /docs, /redoc and /openapi.json: off under ENV=production, where they would
    hand a stranger the map of every route and field."""
    if settings.env == "production":
        return {"docs_url": None, "redoc_url": None, "openapi_url": None}
    return {}


async def carries_admin_key(request: Request, settings: Settings) -> bool:
    """Whether the request has `Authorization: Bearer $ADMIN_API_KEY`, for what only the
    operator may see; never a gate that answers 401 or 429. A wrong key still counts
    toward the client's lockout (`key_matches`), so /health is no way around it."""
    key = settings.admin_api_key
    if key is None:
        return False
    try:
        return await key_matches(
            request, request.headers.get("authorization"), f"Bearer {key.get_secret_value()}"
        )
    except StarletteHTTPException:  # locked out (429): the stranger's answer
        return False


def create_app(settings: Settings, shared: SharedState | None = None) -> FastAPI:
    """The app; `shared` replaces the state backend the settings pick (tests)."""
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
        logger.info(f"Shared state: {shared.describe()}")
        await warm_up_models(providers.stt == "offline")
        await records.start()
        app.state.metrics.start_loop_lag()
        await campaigns.start(app.state.admission)  # the scheduler, after the migrations
        try:
            # LOG_RESOURCE_USAGE: RSS, fds, threads, tasks on a timer and on SIGUSR1 (soak)
            async with resource_usage_log(settings):
                yield
        finally:
            # Calls have drained by now (phonebot.shutdown runs before the lifespan ends):
            # their last writes are queued, and are written here.
            await app.state.metrics.stop_loop_lag()
            await campaigns.stop()
            await records.stop()
            await app.state.admission.close()
            await shared.close()
            stop_models(providers.stt == "offline")

    require_safe_configuration(settings)
    app = FastAPI(title="Phone bot", version=__version__, lifespan=lifespan, **api_docs(settings))
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_request_body_bytes,
        per_path={
            "/campaigns": BodyCap(settings.max_campaign_body_bytes, "MAX_CAMPAIGN_BODY_BYTES")
        },
    )
    app.state.settings = settings
    app.state.active_streams = 0
    # Replays, admission, the /dialout rate limit and AMD verdicts, over the shared state
    # (memory, or Redis with REDIS_URL; phonebot.state). Owned by the app, passed to calls.
    state = build_app_state(settings, shared)
    app.state.shared = shared = state.shared
    app.state.admission = state.admission
    app.state.replays = state.replays
    app.state.dialout_limiter = state.dialout_limiter
    app.state.amd_verdicts = state.amd_verdicts
    app.state.auth_lockout = state.auth_lockout  # failed key checks per client (http_guards)
    app.state.calls = ActiveCalls()  # this process's running calls, for the drain
    app.state.rejections = RejectionLog()
    app.state.metrics = Metrics()  # GET /metrics (phonebot.metrics); passed to each call
    state.shared.on_error = app.state.metrics.state_error  # every Redis error, counted once
    app.include_router(metrics_router)
    app.state.records = records = Records(settings)  # started in the lifespan
    # Campaigns (API, do-not-call list, pages under /calls/ui/campaigns): before the
    # records' pages, whose /calls/ui/{call_sid} would take /calls/ui/campaigns.
    campaigns = install_campaigns(app, settings, records)
    app.include_router(records_ui_router)  # first: /calls/{call_sid} would take /calls/ui
    app.include_router(records_router)

    @app.exception_handler(ParameterError)
    async def parameter_error(request: Request, error: ParameterError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error), "field": error.field},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(StateUnavailable)
    async def state_error(request: Request, error: StateUnavailable) -> JSONResponse:
        """Fail closed, naming the cause: no dial-out or verdict is taken without it."""
        logger.warning(f"{request.url.path}: shared state unavailable ({error})")
        if request.url.path == "/dialout":
            app.state.metrics.call_refused(STATE_UNAVAILABLE, DIALOUT)
        detail = (
            f"shared state unavailable ({app.state.shared.backend}: {error}); "
            "no new calls until it is back"
        )
        return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

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
        """Twilio's async answering-machine verdict for a call placed by /dialout: the
        first one per call counts; another (replayed, late) is ignored with a log line."""
        call_sid, answered_by, duration = await amd_verdict(request)
        ignored = verdict_refusal(await records.progress(call_sid))
        # The shared store keeps the first verdict (SET NX); 503 if the state is down.
        if ignored is None and not await app.state.amd_verdicts.set(call_sid, answered_by):
            ignored = "the call already has its verdict"
        if ignored:
            logger.info(f"Call {call_sid}: AMD verdict {answered_by} ignored ({ignored})")
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        logger.info(f"Call {call_sid} answered by {answered_by} (detection took {duration} ms)")
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
        # Ignored (logged) unless it moves the call on.
        if await record_status(records, update) and update.final:
            await end_stream_token(app.state.admission, update)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        """A stream runs its call only once admitted (single-use token, capacity, drain)."""
        await websocket.accept()
        app.state.active_streams += 1
        gate = StreamGate(app.state.admission)
        try:
            writer = records.writer if records.enabled else None  # None: no per-call record work
            await serve_call(
                websocket,
                settings,
                admit=gate,
                records=writer,
                calls=app.state.calls,
                verdicts=app.state.amd_verdicts,
                metrics=app.state.metrics,
            )
        finally:
            await gate.release()
            app.state.active_streams -= 1

    @app.post(
        "/dialout",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(dialout_rate), Depends(require_dialout_key)],
    )
    async def dialout(body: DialoutRequest, request: Request) -> DialoutResponse:
        admission: CallAdmission = app.state.admission
        if admission.draining:
            app.state.metrics.call_refused(DRAINING, DIALOUT)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "the server is shutting down; no new calls"
            )
        if refusal := await admission.refusal():  # 503 if the shared state is down
            app.state.metrics.call_refused(refusal, DIALOUT)
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, refusal)
        await campaigns.check_dial(body.to)  # the do-not-call list: 403 naming it
        placed = await place_call(body, settings, public_base_url(request))  # guard: 403
        record_dialout(records, body, placed, settings)
        return placed

    @app.get("/health")
    async def health(request: Request, response: Response) -> HealthResponse | HealthStatus:
        """503 while draining or while the shared state is unreachable (new calls would
        hear the busy message), so a load balancer stops sending calls here. It asks the
        state each time, so it turns 200 again by itself once Redis is back. Under
        ENV=production only the status, unless the admin key comes with the request."""
        providers = chosen_providers(settings)
        admission: CallAdmission = app.state.admission
        state, counts = await state_health(app.state.shared, admission)
        if admission.draining or not state.ok:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        overall = "draining" if admission.draining else "ok" if state.ok else "degraded"
        if settings.env == "production" and not await carries_admin_key(request, settings):
            return HealthStatus(status=overall)
        return HealthResponse(
            status=overall,
            version=__version__,
            offline=providers.offline,
            providers={"stt": providers.stt, "llm": providers.llm, "tts": providers.tts},
            active_streams=app.state.active_streams,
            active_calls=admission.process_live,
            reserved_calls=counts.reserved if counts else admission.process_reserved,
            cluster_calls=counts.live if counts else admission.process_live,
            draining=admission.draining,
            pid=os.getpid(),
            records=RecordsHealth(**records.health()),
            state=state,
        )

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The phone bot's server (docs/deploy.md; several processes: docs/scaling.md)."
    )
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="server processes sharing the port (default: WORKERS, 1); N > 1 needs REDIS_URL",
    )  # fmt: skip
    # Set by the supervisor (phonebot.workers) on the workers it starts, not by hand.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """uvicorn, with our signal handling: SIGTERM drains calls, a second one exits now.

    With `--workers N` (or WORKERS=N) > 1 this process binds the port and supervises N
    copies of itself that share it (`phonebot.workers`); each copy, started with
    `--listen-fd`, is the one-process server below.
    """
    args = parse_args(argv)
    settings = get_settings()
    if args.workers is not None:
        settings = settings.model_copy(update={"workers": args.workers})
    configure_logging(settings)
    if settings.workers > 1 and args.listen_fd is None:
        try:
            require_safe_configuration(settings)  # REDIS_URL, STREAM_SECRET: refused early
        except UnsafeConfiguration as problem:
            logger.error(str(problem))
            sys.exit(EXIT_CONFIG)
        sys.exit(run_workers(settings, settings.workers, Path(__file__).resolve()))
    try:
        app = create_app(settings)
    except (UnsafeConfiguration, UnsupportedDatabase) as problem:
        logger.error(str(problem))
        sys.exit(EXIT_CONFIG)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=MAX_MEDIA_MESSAGE_BYTES,
        timeout_graceful_shutdown=UVICORN_CLOSE_TIMEOUT_S,
        # X-Forwarded-For is read in one place only, `http_guards.client_ip`, and only for
        # TRUSTED_PROXY_HOPS: uvicorn's own reading (on by default, trusting 127.0.0.1)
        # would let a loopback client pick its address, whatever that setting says.
        proxy_headers=False,
        server_header=False,  # `server: uvicorn` tells a stranger what to probe for
    )
    server = GracefulServer(config, Drain(settings, app.state.admission, app.state.calls))
    sockets = None
    if args.listen_fd is not None:
        sockets = [inherited_socket(args.listen_fd)]
        logger.info(f"Worker {args.worker_index}/{settings.workers} (pid {os.getpid()}) serving")
    server.run(sockets=sockets)
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
