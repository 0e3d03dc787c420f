"""Twilio's voice webhooks: the TwiML that connects a call to our media stream.

    POST /          "A call comes in" (also usable for a SIP domain)
    POST /outbound  fetched by Twilio when a call placed by /dialout connects

Both are signed (`phonebot.web.auth.require_twilio_signature`) and answered once per
CallSid (`answered_once`); a call that can't be taken hears the busy message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response
from loguru import logger

from phonebot.config import Settings
from phonebot.ops.metrics import REPLAY, STATE_UNAVAILABLE, WEBHOOK
from phonebot.records.limits import check_webhook
from phonebot.records.schema import utcnow
from phonebot.state import CallAdmission, StateUnavailable
from phonebot.twilio.amd import AMD_BY_BOT, AMD_PARAMETER, AMD_REQUESTED
from phonebot.twilio.caller_id import presented_caller_id
from phonebot.twilio.signatures import external_base_url
from phonebot.twilio.stream_token import TOKEN_PARAMETER, call_token
from phonebot.twilio.transfer import TRANSFER_PARAMETERS
from phonebot.twilio.twiml import (
    ParameterError,
    busy_twiml,
    closing_phrase,
    connect_stream_twiml,
    insecure_stream_url,
    stream_target,
    validate_custom_parameters,
)
from phonebot.web.auth import require_twilio_signature
from phonebot.web.services import AppServices, Services

router = APIRouter(dependencies=[Depends(require_twilio_signature)])


@router.post("/")
async def voice_webhook(request: Request, services: Services) -> Response:
    """Twilio's "A call comes in" webhook (also usable for a SIP domain)."""
    return await call_twiml(request, services, "inbound")


@router.post("/outbound")
async def outbound_twiml(request: Request, services: Services) -> Response:
    """Fetched by Twilio when a call placed by /dialout connects."""
    return await call_twiml(request, services, "outbound")


async def call_twiml(request: Request, services: AppServices, call_type: str) -> Response:
    """TwiML that connects a call to our media stream, carrying the call's parameters.

    Answered once per CallSid (`answered_once`); a call that can't be taken (capacity,
    shutdown, shared state unreachable) hears the busy message instead: never a hang, and
    never a stream we couldn't account for.
    """
    form = await request.form()
    call_sid = str(form.get("CallSid", ""))
    if not call_sid:
        raise ParameterError("CallSid", "is required (this endpoint is for Twilio)")
    try:
        twiml = await webhook_answer(request, services, call_sid, call_type, form)
    except StateUnavailable as error:
        logger.warning(f"{call_type} call {call_sid}: busy (shared state unavailable: {error})")
        services.metrics.call_refused(STATE_UNAVAILABLE, WEBHOOK)
        twiml = busy_twiml()
    return Response(twiml, media_type="application/xml")


async def webhook_answer(
    request: Request, services: AppServices, call_sid: str, call_type: str, form: Mapping
) -> str:
    """The TwiML for this webhook: the same as before for Twilio's retry, else a new one.

    A CallSid whose record shows its webhook was answered is a replay (409) even after the
    replay cache forgot it (REPLAY_CACHE_TTL_S). Fields its record can't hold: 422.
    """
    check_webhook(form, request.query_params)
    replays = services.replays
    if (again := await replays.answer_for_retry(request, call_sid)) is not None:
        # Not recorded again: the record keeps when the call was first answered.
        logger.info(f"{call_type} call {call_sid}: Twilio retried its webhook; same answer")
        return again
    async with answered_once(request, services, call_sid):
        if await services.records.answered_before(call_sid):
            services.rejections.note(f"409 replayed webhook to {request.url.path}")
            services.metrics.call_refused(REPLAY, WEBHOOK)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                "a webhook with this CallSid was already answered (its call has a record); "
                "each signed request is accepted once",
            )
        twiml = await answer_call(request, services, call_sid, call_type, form)
    try:
        await replays.remember_answer(request, call_sid, twiml)
    except StateUnavailable as error:  # the call is answered; only a retry would miss it
        logger.warning(f"{call_type} call {call_sid}: answer not kept for retries ({error})")
    return twiml


async def answer_call(
    request: Request, services: AppServices, call_sid: str, call_type: str, form: Mapping
) -> str:
    """The TwiML for a call we haven't answered yet: the stream, or busy (no slot)."""
    settings = services.settings
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
    # Bound to this call, these parameters and a short life (phonebot.twilio.stream_token).
    expires_at = time.time() + settings.stream_token_ttl_s
    parameters[TOKEN_PARAMETER] = call_token(
        call_sid, settings.stream_token_secret, parameters, expires_at
    )
    target = stream_target(settings, external_base_url(request, settings.public_url))
    if refusal := await admit_webhook(services.admission, settings, call_sid):
        logger.warning(f"{call_type} call {call_sid}: busy ({refusal})")
        services.metrics.call_refused(refusal, WEBHOOK)
        return busy_twiml()
    services.metrics.call_admitted(WEBHOOK)
    if problem := insecure_stream_url(target.url):
        logger.error(f"{call_type} call {call_sid}: {problem}")
    logger.info(f"{call_type} call {call_sid}: streaming to {target.url}")
    # The record starts here; a call turned away as busy above leaves none.
    services.records.writer.call_updated(call_sid, webhook_answered_at=utcnow())
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
async def answered_once(
    request: Request, services: AppServices, call_sid: str
) -> AsyncIterator[None]:
    """409 for a webhook we already answered (same CallSid or idempotency token).

    Runs after the signature check, so only Twilio-signed requests are remembered and a
    stranger can't block a real call by sending its CallSid first. A request that fails
    here (any exception) is forgotten, so Twilio's retry of it is answered. Twilio's retry
    of one we answered never gets here: `ReplayGuard.answer_for_retry` answers it first.
    The claim holds across processes (SET NX on the shared state).
    """
    replays = services.replays
    keys = replays.keys(request, call_sid)
    if replayed := await replays.claim(keys):
        header = {"CallSid": "CallSid", "Idempotency": "I-Twilio-Idempotency-Token"}
        services.rejections.note(f"409 replayed webhook to {request.url.path}")
        services.metrics.call_refused(REPLAY, WEBHOOK)
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

    `amd=1` (Twilio's AMD) and `amd=bot` (the bot listens) are ours, put on the
    `/outbound` URL by `/dialout` (which refuses them from its own callers); so are a warm
    transfer's `transfer_of` and `transfer_summary` (phonebot.call.warm_transfer). Twilio's
    signature covers the URL, so they arrive as we wrote them. Anywhere else they are
    refused, so a webhook can't make the bot wait for a verdict that will never come.
    """
    custom = dict(query)
    own = {name: custom.pop(name) for name in TRANSFER_PARAMETERS if name in custom}
    if own and call_type != "outbound":
        raise ParameterError(f"query.{next(iter(own))}", "is reserved; a warm transfer sets it")
    amd = custom.pop(AMD_PARAMETER, None)
    if amd is None:
        return custom, own
    if call_type != "outbound" or amd not in (AMD_REQUESTED, AMD_BY_BOT):
        raise ParameterError(f"query.{AMD_PARAMETER}", "is reserved; /dialout sets it")
    return custom, {**own, AMD_PARAMETER: amd}
