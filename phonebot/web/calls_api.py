"""The records API: GET /calls, GET /calls/{sid}, its recording, DELETE /calls/{sid}.

Behind `Authorization: Bearer $ADMIN_API_KEY`: 401 without it or with a wrong key, 503
while ADMIN_API_KEY is unset (the API is off, not open). Reads also accept the session
cookie of the calls page (`/calls/ui`, see `ui.py`; the key check is
`phonebot.web.auth.require_admin_key`). The app provides its `Records` among its services
(`phonebot.web.services`); include `router` in the app.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.responses import FileResponse, RedirectResponse
from loguru import logger

from phonebot.records.models import CallDetail, CallPage, Direction
from phonebot.records.recording_store import (
    LocalRecordings,
    RecordingError,
    Recordings,
    is_s3,
)
from phonebot.records.store import MAX_PAGE, BadCursor, CallFilter, CallStore
from phonebot.web.auth import require_admin_key
from phonebot.web.services import Services


def get_store(services: Services) -> CallStore:
    """The app's records, or 503 when the server keeps none (CALL_RECORDS=false)."""
    records = services.records
    if not records.enabled:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "call records are off: CALL_RECORDS=false"
        )
    return records.store


Store = Annotated[CallStore, Depends(get_store)]
router = APIRouter(prefix="/calls", tags=["records"], dependencies=[Depends(require_admin_key)])
NOT_FOUND = {404: {"description": "No record of this call"}}


@router.get("", response_model=CallPage)
async def list_calls(
    store: Store,
    direction: Direction | None = None,
    persona: str | None = None,
    campaign_id: str | None = None,
    end_reason: str | None = Query(None, description='e.g. "caller hung up", "not connected"'),
    status_: str | None = Query(
        None, alias="status", description="Twilio's final status, e.g. completed, busy"
    ),
    number: str | None = Query(None, description="The caller's or the called number, E.164"),
    success: bool | None = Query(
        None, description="The post-call analysis's judgement: true or false"
    ),
    since: datetime | None = Query(None, description="Calls created at or after (ISO 8601)"),
    until: datetime | None = Query(None, description="Calls created before (ISO 8601)"),
    limit: int = Query(50, ge=1, le=MAX_PAGE),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
) -> CallPage:
    """The call log, newest first."""
    if since is not None and until is not None and since >= until:
        raise _invalid("until", "must be after since")
    where = CallFilter(
        direction=direction,
        persona=persona,
        campaign_id=campaign_id,
        end_reason=end_reason,
        status=status_,
        number=number,
        success=success,
        since=since,
        until=until,
    )
    try:
        return await store.list(where, limit, cursor)
    except BadCursor as error:
        raise _invalid("cursor", str(error)) from None


@router.get("/{call_sid}", response_model=CallDetail, responses=NOT_FOUND)
async def get_call(call_sid: str, store: Store) -> CallDetail:
    """One call with its transcript in order, and its post-call analysis once done."""
    found = await store.get(call_sid)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no record of call {call_sid}")
    return found


def get_recordings(services: Services) -> Recordings:
    return services.records.recordings


@router.get(
    "/{call_sid}/recording",
    response_class=FileResponse,
    responses={
        200: {"content": {"audio/wav": {}}, "description": "The WAV (RECORDINGS_DIR)"},
        307: {"description": "Stored in S3: a presigned URL to the WAV, valid 5 minutes"},
        **NOT_FOUND,
    },
)
async def get_recording(
    call_sid: str, store: Store, recordings: Annotated[Recordings, Depends(get_recordings)]
) -> Response:
    """The call's recording: a stereo 8 kHz WAV, the caller left, the bot right."""
    path = await store.recording_path(call_sid)
    if path and is_s3(path):
        try:
            url = await recordings.s3_for(path).presigned_url(path, call_sid)
        except Exception as error:  # no credentials, bad configuration
            logger.error(f"Call {call_sid}: no link to the recording: {type(error).__name__}")
            raise HTTPException(
                status.HTTP_502_BAD_GATEWAY, "the recording's storage is unavailable"
            ) from None
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    if not path or not LocalRecordings.is_recording_of(path, call_sid) or not Path(path).is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recording of call {call_sid}")
    return FileResponse(path, media_type="audio/wav", filename=f"{call_sid}.wav")


@router.delete("/{call_sid}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_call(
    call_sid: str, store: Store, recordings: Annotated[Recordings, Depends(get_recordings)]
) -> Response:
    """Erase the record, its transcript and its recording.

    The recording goes first: if it can't be deleted the answer is 500 and the record stays,
    so the request can be repeated instead of leaving an orphaned file nobody can find.
    """
    path = await store.recording_path(call_sid)
    if path:
        try:
            await recordings.delete(path, call_sid)  # a file, or the S3 object
        except RecordingError as error:
            logger.error(f"Call {call_sid}: recording not deleted: {error}")
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, "the recording could not be deleted"
            ) from None
    found, _ = await store.delete(call_sid)
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no record of call {call_sid}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the query field."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        [{"loc": ["query", field], "msg": message, "type": "value_error"}],
    )
