"""Engines for DATABASE_URL: the user writes a plain URL, we pick the async driver.

`sqlite:///./phonebot.db` becomes `sqlite+aiosqlite:///./phonebot.db` and
`postgresql://…` (or Heroku-style `postgres://…`) becomes `postgresql+asyncpg://…`, so the
same setting works for the server, the migrations and the command line.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
# Seconds to wait for PostgreSQL to accept a connection: an unreachable database must turn
# into a counted, logged write failure quickly, not hold the record writer for a minute.
CONNECT_TIMEOUT_S = 5.0
# Seconds SQLite waits on a lock held by another process (the CLI reading while the
# server writes) before failing the write.
SQLITE_BUSY_TIMEOUT_MS = 5000


class UnsupportedDatabase(ValueError):
    """DATABASE_URL names a database we do not support."""


def async_url(database_url: str) -> URL:
    """The URL with its async driver, e.g. sqlite → sqlite+aiosqlite."""
    url = make_url(database_url)
    backend, _, driver = url.drivername.partition("+")
    if backend not in ASYNC_DRIVERS:
        raise UnsupportedDatabase(
            f"DATABASE_URL must start with sqlite:// or postgresql://, not {backend}://"
        )
    wanted = ASYNC_DRIVERS[backend]
    if driver and f"{backend}+{driver}" not in ASYNC_DRIVERS.values():
        # e.g. postgresql+psycopg2: the synchronous driver would block the event loop.
        raise UnsupportedDatabase(f"DATABASE_URL driver {driver!r} is not async; use {wanted}")
    return url.set(drivername=wanted)


def safe_url(database_url: str) -> str:
    """The URL with its password hidden, for log lines."""
    return make_url(database_url).render_as_string(hide_password=True)


def create_engine(database_url: str) -> AsyncEngine:
    """An async engine for DATABASE_URL (SQLite: WAL, foreign keys on, folder created)."""
    url = async_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_async_engine(
        url, pool_pre_ping=True, connect_args={"timeout": CONNECT_TIMEOUT_S}
    )


def _sqlite_engine(url: URL) -> AsyncEngine:
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Foreign keys make deleting a call delete its transcript; WAL lets the CLI and the
        # API read while the writer writes.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if url.database and url.database != ":memory:":
            # WAL with synchronous=NORMAL: no fsync per commit (SQLite's recommended pairing;
            # still never corrupts, a power cut may lose the last commits).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    """Sessions whose objects stay readable after commit (we return them to the API)."""
    return async_sessionmaker(engine, expire_on_commit=False)
