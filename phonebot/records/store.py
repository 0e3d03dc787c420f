"""Reading and erasing call records (the API and the command line use this)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, and_, delete, or_, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from phonebot.records.callbacks import CallProgress
from phonebot.records.models import CallDetail, CallPage, detail, summary
from phonebot.records.schema import CallRecord, TranscriptEntry

MAX_PAGE = 200


class BadCursor(ValueError):
    """A ?cursor= that this server did not hand out."""


@dataclass(frozen=True)
class CallFilter:
    """Which calls to list; every field optional, all given ones must match."""

    direction: str | None = None
    persona: str | None = None
    campaign_id: str | None = None
    end_reason: str | None = None
    status: str | None = None  # Twilio's final CallStatus
    number: str | None = None  # the caller's or the called number
    success: bool | None = None  # the post-call analysis's judgement
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until

    def where(self, query: Select) -> Select:
        exact = {
            CallRecord.direction: self.direction,
            CallRecord.persona: self.persona,
            CallRecord.campaign_id: self.campaign_id,
            CallRecord.end_reason: self.end_reason,
            CallRecord.twilio_status: self.status,
            CallRecord.success: self.success,

        }
        for column, value in exact.items():
            if value is not None:
                query = query.where(column == value)
        if self.number is not None:
            query = query.where(
                or_(CallRecord.from_number == self.number, CallRecord.to_number == self.number)
            )
        if self.since is not None:
            query = query.where(CallRecord.created_at >= _utc(self.since))
        if self.until is not None:
            query = query.where(CallRecord.created_at < _utc(self.until))
        return query


class CallStore:
    """Queries over the records tables; one per app (`Records.store`)."""

    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def list(
        self, where: CallFilter | None = None, limit: int = 50, cursor: str | None = None
    ) -> CallPage:
        """Newest first; `next_cursor` continues after the last call of this page.

        Keyset pagination on (created_at, call_sid): a page never repeats or skips a call
        when new calls arrive between requests, unlike an offset.
        """
        limit = max(1, min(limit, MAX_PAGE))
        query = (where or CallFilter()).where(select(CallRecord))
        if cursor:
            created_at, call_sid = decode_cursor(cursor)
            query = query.where(
                or_(
                    CallRecord.created_at < created_at,
                    and_(CallRecord.created_at == created_at, CallRecord.call_sid < call_sid),
                )
            )
        query = query.order_by(CallRecord.created_at.desc(), CallRecord.call_sid.desc())
        async with self._sessions() as session:
            rows = list((await session.scalars(query.limit(limit + 1))).all())
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]) if more else None
        return CallPage(calls=[summary(r) for r in rows], next_cursor=next_cursor)

    async def iterate(self, where: CallFilter | None = None) -> AsyncIterator[CallDetail]:
        """Every matching call with its transcript, newest first (for exports)."""
        cursor = None
        while True:
            page = await self.list(where, MAX_PAGE, cursor)
            for call in page.calls:
                found = await self.get(call.call_sid)
                if found is not None:
                    yield found
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, call_sid: str) -> CallDetail | None:
        async with self._sessions() as session:
            row = await session.get(CallRecord, call_sid)
            if row is None:
                return None
            entries = await session.scalars(
                select(TranscriptEntry)
                .where(TranscriptEntry.call_sid == call_sid)
                .order_by(TranscriptEntry.seq)
            )
            return detail(row, list(entries.all()))

    async def progress(self, call_sid: str) -> CallProgress | None:
        """How far the call has got (status, verdict, answered, started, ended), or None
        without a record: what decides whether a late callback may still change it."""
        columns = [getattr(CallRecord, name) for name in CallProgress.__dataclass_fields__]
        async with self._sessions() as session:
            found = (
                await session.execute(select(*columns).where(CallRecord.call_sid == call_sid))
            ).first()
        return None if found is None else CallProgress(*found)

    async def recording_path(self, call_sid: str) -> str | None:
        async with self._sessions() as session:
            return await session.scalar(
                select(CallRecord.recording_path).where(CallRecord.call_sid == call_sid)
            )

    async def delete(self, call_sid: str) -> tuple[bool, str | None]:
        """Erase the record and its transcript: (found, recording path for the caller to
        delete). The transcript goes explicitly too, not only by ON DELETE CASCADE, so a
        SQLite connection without foreign keys can't leave it behind."""
        async with self._sessions.begin() as session:
            row = await session.get(CallRecord, call_sid)
            if row is None:
                return False, None
            path = row.recording_path
            await session.execute(
                delete(TranscriptEntry).where(TranscriptEntry.call_sid == call_sid)
            )
            await session.execute(delete(CallRecord).where(CallRecord.call_sid == call_sid))
        return True, path


def encode_cursor(row: CallRecord) -> str:
    raw = json.dumps([_utc(row.created_at).isoformat(), row.call_sid]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, call_sid = json.loads(raw)
        return _utc(datetime.fromisoformat(created_at)), str(call_sid)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as error:
        raise BadCursor("not a cursor from this server's GET /calls") from error


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
