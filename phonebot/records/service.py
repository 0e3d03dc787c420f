"""`Records`: the database, the writer, the store and the event deliverer of one app.

The server creates one at startup (its services' `records`), starts it in its lifespan and
stops it on shutdown; nothing here is a module global, so tests build as many as they like.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from loguru import logger
from sqlalchemy.engine import make_url

from phonebot.config import Settings
from phonebot.db.engine import create_engine, safe_url, sessionmaker
from phonebot.db.migrate import migrate
from phonebot.records.callbacks import CallProgress
from phonebot.records.events import EventDeliverer
from phonebot.records.recording_store import Recordings
from phonebot.records.store import CallStore
from phonebot.records.writer import RecordWriter

# How long a webhook or callback waits to read a call's record before going on without it
# (the writer's conditional UPDATEs still keep a finished call as it was).
LOOKUP_TIMEOUT_S = 1.0


class Records:
    """Everything about call records for one app."""

    def __init__(self, settings: Settings, **deliverer_options) -> None:
        self.settings = settings
        self.enabled = settings.call_records  # CALL_RECORDS=false: nothing is kept
        self.database_url = settings.database_url.get_secret_value()
        self.engine = create_engine(self.database_url)
        self.sessions = sessionmaker(self.engine)
        self.store = CallStore(self.sessions)
        self.events = self._deliverer(settings, deliverer_options)
        self.writer = RecordWriter(
            self.sessions,
            settings.records_queue_size,
            events=self.events,
            prepare=self._migrate_late,
        )
        # Call recordings (RECORD_CALLS): stored, put on the records, expired.
        self.recordings = Recordings(settings, self.writer, self.sessions)
        self.writer.recordings = self.recordings
        self.writer.enabled = self.enabled
        self._migrated = False
        self._started = False
        self._lookups_failing = False

    def _deliverer(self, settings: Settings, options: dict) -> EventDeliverer | None:
        url, secret = settings.events_webhook_url, settings.events_webhook_secret
        if url and not secret:
            logger.error("EVENTS_WEBHOOK_URL is set but EVENTS_WEBHOOK_SECRET is not: no events")
        if not (url and secret):
            return None
        return EventDeliverer(self.sessions, url, secret.get_secret_value(), **options)

    async def start(self) -> None:
        """Apply migrations and start the writer and the deliverer.

        A database that is down at startup does not stop the server: calls go on, their
        records fail (counted), and the migration is retried before the next write.
        With CALL_RECORDS=false nothing starts and the database is never opened.
        """
        if not self.enabled:
            logger.info("Call records off (CALL_RECORDS=false): calls leave no record")
            return
        try:
            await self._migrate_late()
        except Exception as error:
            original = getattr(error, "orig", None) or error
            logger.error(
                f"Call records: database {safe_url(self.database_url)} unavailable at"
                f" startup ({type(original).__name__}: {str(original)[:200]});"
                " calls go on without records until it is back"
            )
        self.writer.start()
        self._started = True
        if self.events is not None:
            self.events.start()
        self.recordings.start()  # retention: now, then hourly

    async def _migrate_late(self) -> None:
        if not self._migrated:
            await migrate(self.database_url, self.engine)
            self._migrated = True

    async def stop(self, events_grace_s: float = 0.0) -> None:
        """Write what is queued, stop sending events (pending ones wait in the database).

        `events_grace_s` > 0 first gives the events just written (the last `call.ended`)
        that long to be sent: for a session that will not run again to retry them.
        """
        if not self.enabled:
            return
        await self.recordings.close()  # first: a stored recording updates its record
        await self.writer.close()
        if self.events is not None:
            if events_grace_s > 0:
                await self.events.settle(events_grace_s)
            await self.events.close()
        await self.engine.dispose()

    async def progress(self, call_sid: str) -> CallProgress | None:
        """How far the call has got, for deciding on a late callback; None without a
        record, with records off or not started, or when the database does not answer
        within LOOKUP_TIMEOUT_S (one warning per outage: the callback goes on without it)."""
        if not (self.enabled and self._started):
            return None
        try:
            found = await asyncio.wait_for(self.store.progress(call_sid), LOOKUP_TIMEOUT_S)
        except Exception as error:  # database down or slow: never fail the request
            if not self._lookups_failing:
                original = getattr(error, "orig", None) or error
                logger.warning(
                    f"Call records: can't read call {call_sid}'s record"
                    f" ({type(original).__name__}); callbacks are checked by the writer only"
                )
            self._lookups_failing = True
            return None
        self._lookups_failing = False
        return found

    async def answered_before(self, call_sid: str) -> bool:
        """True when the call's record shows its webhook was already answered."""
        call = await self.progress(call_sid)
        return call is not None and call.webhook_answered_at is not None

    def health(self) -> dict[str, int | bool]:
        """Counters for /health."""
        stats = self.writer.stats()
        if self.events is not None:
            stats["events_delivered"] = self.events.delivered
            stats["events_failed_attempts"] = self.events.failed_attempts
        return stats


# How long a Pipecat Cloud session waits, after its call, for its last events to be sent.
SESSION_EVENTS_GRACE_S = 5.0


@asynccontextmanager
async def session_records(settings: Settings) -> AsyncIterator[RecordWriter | None]:
    """Records for one Pipecat Cloud session, which has no app and no lifespan: a writer
    for its one call, or None (with one INFO line) when DATABASE_URL is a SQLite file.

    A SQLite file inside a Pipecat Cloud container is gone with the container and seen by
    no other server, so records there need a shared database (PostgreSQL). The database
    is opened in the background, so the call never waits for it; when the call is over,
    its writes are flushed and its events get `SESSION_EVENTS_GRACE_S` to be sent.
    """
    url = settings.database_url.get_secret_value()
    if make_url(url).get_backend_name() == "sqlite":
        logger.info(
            "Call records off: on Pipecat Cloud they need a shared database; set"
            " DATABASE_URL to your PostgreSQL (postgresql://...)"
        )
        yield None
        return
    records = Records(settings)
    starting = asyncio.create_task(records.start(), name="records-start")
    try:
        yield records.writer
    finally:
        await starting
        await records.stop(events_grace_s=SESSION_EVENTS_GRACE_S)
