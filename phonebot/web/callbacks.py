"""Twilio's callbacks about a call placed by /dialout, both signed.

    POST /amd     its answering-machine verdict (the first one per call counts)
    POST /status  its progress and final CallStatus, recorded also for a call that never
                  connected (busy, no-answer, ...); for a warm transfer's person
                  (`?transfer_of=`), one never reached is also the transfer's verdict

A callback is applied only when it moves the call forward (`phonebot.records.callbacks`).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import Response
from loguru import logger

from phonebot.call.warm_transfer import PERSON_HUNG_UP
from phonebot.records import Records
from phonebot.records.callbacks import status_refusal, verdict_refusal
from phonebot.records.writer import NOT_CONNECTED
from phonebot.state import CallAdmission, StateUnavailable, TransferVerdicts
from phonebot.state.verdicts import TransferVerdict
from phonebot.twilio.amd import AMD_CALLBACK_PATH, ANSWERED_BY
from phonebot.twilio.dialout import STATUS_CALLBACK_PATH, StatusCallback
from phonebot.twilio.ids import check_call_sid
from phonebot.twilio.transfer import TRANSFER_OF_PARAMETER
from phonebot.twilio.twiml import ParameterError
from phonebot.web.auth import require_twilio_signature
from phonebot.web.services import Services

router = APIRouter(dependencies=[Depends(require_twilio_signature)])


@router.post(AMD_CALLBACK_PATH, status_code=status.HTTP_204_NO_CONTENT)
async def amd_callback(request: Request, services: Services) -> Response:
    """Twilio's async answering-machine verdict for a call placed by /dialout: the
    first one per call counts; another (replayed, late) is ignored with a log line."""
    call_sid, answered_by, duration = await amd_verdict(request)
    records = services.records
    ignored = verdict_refusal(await records.progress(call_sid))
    # The shared store keeps the first verdict (SET NX); 503 if the state is down.
    if ignored is None and not await services.amd_verdicts.set(call_sid, answered_by):
        ignored = "the call already has its verdict"
    if ignored:
        logger.info(f"Call {call_sid}: AMD verdict {answered_by} ignored ({ignored})")
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    logger.info(f"Call {call_sid} answered by {answered_by} (detection took {duration} ms)")
    records.writer.call_updated(call_sid, amd_verdict=answered_by)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(STATUS_CALLBACK_PATH, status_code=status.HTTP_204_NO_CONTENT)
async def status_callback(request: Request, services: Services) -> Response:
    """Twilio's status callbacks for a call placed by /dialout: its progress, and its
    final CallStatus, recorded also for a call that never connected (busy, …)."""
    update = StatusCallback.from_form(await request.form())
    caller_sid = transfer_of(request)
    # Ignored (logged) unless it moves the call on.
    if await record_status(services.records, update) and update.final:
        await end_stream_token(services.admission, update)
        if caller_sid is not None:
            await person_call_over(services.transfer_verdicts, caller_sid, update)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def transfer_of(request: Request) -> str | None:
    """The caller a warm transfer's person was called for (our own `?transfer_of=` on the
    status callback URL, covered by Twilio's signature), or None for any other call."""
    caller_sid = request.query_params.get(TRANSFER_OF_PARAMETER)
    if caller_sid is None:
        return None
    return check_call_sid(caller_sid, f"query.{TRANSFER_OF_PARAMETER}")


async def person_call_over(
    verdicts: TransferVerdicts, caller_sid: str, update: StatusCallback
) -> None:
    """A warm transfer's person's call is over: unless its briefing gave the verdict, that
    is it: never answered (busy, no-answer, failed, canceled), or answered and over without
    a key (our own webhook turned it away, say, or the stream never started)."""
    outcome = update.status if update.status in NOT_CONNECTED else PERSON_HUNG_UP
    verdict = TransferVerdict(outcome, update.call_sid, at=time.time())
    if await verdicts.set(update.call_sid, verdict.encode()):  # keyed by the person's call
        logger.info(f"Call {caller_sid}: warm transfer's person {update.status}")


async def amd_verdict(request: Request) -> tuple[str, str, str]:
    """CallSid, AnsweredBy and MachineDetectionDuration (ms) of a Twilio async AMD callback.

    The CallSid keys the shared verdict store, so it must look like one; ParameterError
    names the bad field.
    """
    form = await request.form()
    call_sid = check_call_sid(str(form.get("CallSid", "")))
    answered_by = str(form.get("AnsweredBy", ""))
    if answered_by not in ANSWERED_BY:
        raise ParameterError("AnsweredBy", f"must be one of {', '.join(sorted(ANSWERED_BY))}")
    duration = str(form.get("MachineDetectionDuration", ""))
    return call_sid, answered_by, duration if duration.isdigit() else "?"


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
