"""`Records`: the database, the writer, the store and the event deliverer of one app.

The server creates one at startup (`app.state.records`), starts it in its lifespan and
stops it on shutdown; nothing here is a module global, so tests build as many as they like.
"""

from __future__ import annotations

from loguru import logger

from phonebot.config import Settings
from phonebot.records.db import create_engine, safe_url, sessionmaker
from phonebot.records.events import EventDeliverer
from phonebot.records.migrate import migrate
from phonebot.records.store import CallStore
from phonebot.records.writer import RecordWriter


class Records:
    """Everything about call records for one app."""

    def __init__(self, settings: Settings, **deliverer_options) -> None:
        self.settings = settings
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
        self._migrated = False

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
        """
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
        if self.events is not None:
            self.events.start()

    async def _migrate_late(self) -> None:
        if not self._migrated:
            await migrate(self.database_url, self.engine)
            self._migrated = True

    async def stop(self) -> None:
        """Write what is queued, stop sending events (pending ones wait in the database)."""
        await self.writer.close()
        if self.events is not None:
            await self.events.close()
        await self.engine.dispose()

    def health(self) -> dict[str, int | bool]:
        """Counters for /health."""
        stats = self.writer.stats()
        if self.events is not None:
            stats["events_delivered"] = self.events.delivered
            stats["events_failed_attempts"] = self.events.failed_attempts
        return stats
