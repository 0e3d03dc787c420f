"""Events to the user's system: signed POSTs, stored in the database, retried for 24 h.

Every event is a JSON object `{"id", "type", "created", "data"}` POSTed to
EVENTS_WEBHOOK_URL with the header

    X-Phonebot-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

keyed with EVENTS_WEBHOOK_SECRET (the scheme Stripe uses: the timestamp inside the signed
text stops a captured request from being replayed later). The event row is written in the
same transaction as the call record it describes; `EventDeliverer` sends rows that are due,
retrying with exponential backoff and jitter until a 2xx or 24 h have passed, and after a
restart picks up where it left off. Each try carries the same `id`: receivers de-duplicate
on it. Nothing here runs on a call's path: the record writer stages the row, this task sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
from loguru import logger
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from phonebot import __version__
from phonebot.records.schema import EventDelivery, utcnow

# The signing scheme is shared with the agents' HTTP tools; its names stay importable here.
from phonebot.signing import SIGNATURE_HEADER, signature_header, verify_signature  # noqa: F401

EVENT_TYPES = (
    "call.started", "call.ended", "call.failed",
    # The post-call analysis of a call whose agent asks for one (phonebot.call.analysis).
    "call.analyzed",
    # Outbound campaigns (phonebot.campaigns): a contact reached its last state; a campaign
    # has no contact left to call.
    "contact.finished", "campaign.completed",
)
# Retry schedule: 5 s, 10 s, 20 s, … doubling up to an hour between tries (each shortened
# by up to half at random, so receivers coming back from an outage aren't hit in lockstep),
# for at most a day after the event was created.
RETRY_BASE_S = 5.0
RETRY_CAP_S = 3600.0
MAX_AGE_S = 24 * 3600.0
# A receiver gets this long to answer one POST.
DELIVERY_TIMEOUT_S = 10.0
# Also look for due rows this often, for rows written by another server process.
POLL_S = 30.0
BATCH = 50


def new_event(event_type: str, data: dict[str, Any], now: datetime | None = None) -> dict:
    """An event as sent: a fresh id (receivers de-duplicate on it), type, unix time, data."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    created = now or utcnow()
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": event_type,
        "created": int(created.timestamp()),
        "data": data,
    }


def encode(event: dict) -> bytes:
    """The raw body: compact JSON, the exact bytes that are signed and sent."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()




def backoff_s(attempts: int, rng: random.Random, base_s: float, cap_s: float) -> float:
    """Seconds before try number attempts+1: exponential, capped, with jitter."""
    delay = min(cap_s, base_s * 2 ** max(0, attempts - 1))
    return delay * rng.uniform(0.5, 1.0)


class EventDeliverer:
    """Sends stored events to EVENTS_WEBHOOK_URL; one background task per app."""

    def __init__(
        self,
        sessions: async_sessionmaker,
        url: str,
        secret: str,
        *,
        retry_base_s: float = RETRY_BASE_S,
        retry_cap_s: float = RETRY_CAP_S,
        max_age_s: float = MAX_AGE_S,
        timeout_s: float = DELIVERY_TIMEOUT_S,
        poll_s: float = POLL_S,
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        self._url = url
        self._secret = secret
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._max_age = timedelta(seconds=max_age_s)
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._db_failing = False
        self._stopping = False
        self._passes_started = 0
        self._passes_done = 0
        self.delivered = 0
        self.failed_attempts = 0
        self.gave_up = 0

    # --- staging (inside the record writer's transaction) -------------------------------
    def stage(self, session: AsyncSession, event_type: str, data: dict[str, Any]) -> str:
        """Add the event's delivery row to `session`; it is sent once that commits."""
        event = new_event(event_type, data)
        now = utcnow()
        session.add(
            EventDelivery(
                id=event["id"],
                type=event_type,
                created=now,
                payload=event,
                attempts=0,
                next_attempt_at=now,
            )
        )
        return event["id"]

    def wake(self) -> None:
        """New rows were committed: look now rather than at the next poll."""
        self._wake.set()

    # --- the task -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s)
            self._task = asyncio.create_task(self._run(), name="records-events")

    async def close(self) -> None:
        """Stop sending; undelivered events stay in the database for the next start.

        A POST in flight may finish (up to the delivery timeout) so that its outcome is
        stored: cut off, a delivered event would be sent again after the restart.
        """
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self._timeout_s + 1)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def settle(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) for one full pass over the due events that starts
        after this call, so what was committed before it has had its try. For a short-lived
        session (Pipecat Cloud) that stops right after its call: without it, the last
        events would wait in the database for the next deliverer on the same database."""
        if self._task is None:
            return False
        wanted = self._passes_started + 1
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while self._passes_done < wanted:
            if time.monotonic() >= deadline or self._task.done():
                return False
            await asyncio.sleep(0.02)
        return True

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._passes_started += 1
            this_pass = self._passes_started
            try:
                await self.send_due()
                wait_s = await self._seconds_to_next()
                self._database_ok()
            except Exception as error:  # the database is down: try again later
                self._database_failed(error)
                wait_s = self._poll_s
            self._passes_done = this_pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait_s)

    async def send_due(self) -> int:
        """Try every event that is due now; returns how many were tried."""
        tried = 0
        while True:
            async with self._sessions() as session:
                rows = (
                    await session.scalars(
                        select(EventDelivery)
                        .where(EventDelivery.delivered_at.is_(None))
                        .where(EventDelivery.next_attempt_at <= utcnow())
                        .order_by(EventDelivery.next_attempt_at, EventDelivery.created)
                        .limit(BATCH)
                    )
                ).all()
            for row in rows:
                if self._stopping:
                    return tried
                await self._attempt(row.id, row.payload, row.attempts, row.created)
                tried += 1
            if len(rows) < BATCH:
                return tried

    async def _seconds_to_next(self) -> float:
        async with self._sessions() as session:
            due = await session.scalar(
                select(func.min(EventDelivery.next_attempt_at)).where(
                    EventDelivery.delivered_at.is_(None)
                )
            )
        if due is None:
            return self._poll_s
        return min(self._poll_s, max(0.0, (due - utcnow()).total_seconds()))

    async def _attempt(self, event_id: str, payload: dict, attempts: int, created) -> None:
        error = await self._post(payload)
        async with self._sessions.begin() as session:
            row = await session.get(EventDelivery, event_id)
            if row is None or row.delivered_at is not None:
                return
            row.attempts = attempts + 1
            if error is None:
                row.delivered_at = utcnow()
                row.last_error = None
                self.delivered += 1
                return
            self.failed_attempts += 1
            row.last_error = error
            retry_at = utcnow() + timedelta(
                seconds=backoff_s(row.attempts, self._rng, self._retry_base_s, self._retry_cap_s)
            )
            if retry_at - created > self._max_age:
                row.next_attempt_at = None
                row.last_error = f"gave up after {row.attempts} tries: {error}"
                self.gave_up += 1
                logger.error(f"Event {event_id} ({payload['type']}) not delivered: {error}")
            else:
                row.next_attempt_at = retry_at
                logger.warning(
                    f"Event {event_id} ({payload['type']}) try {row.attempts} failed: {error};"
                    f" retrying at {retry_at:%H:%M:%S} UTC"
                )

    async def _post(self, payload: dict) -> str | None:
        """POST one event; None when the receiver answered 2xx, else what went wrong."""
        assert self._client is not None
        body = encode(payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"phonebot/{__version__}",
            SIGNATURE_HEADER: signature_header(self._secret, body, int(time.time())),
        }
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def _database_failed(self, error: Exception) -> None:
        if not self._db_failing:
            self._db_failing = True
            logger.error(f"Events: database unavailable, deliveries paused: {_short(error)}")

    def _database_ok(self) -> None:
        if self._db_failing:
            self._db_failing = False
            logger.info("Events: database reachable again, deliveries resumed")


def _short(error: Exception) -> str:
    """The driver's message without SQLAlchemy's statement and parameters (call content)."""
    original = getattr(error, "orig", None) or error
    return f"{type(original).__name__}: {original}"[:300]
