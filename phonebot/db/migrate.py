"""Bring the database schema to the newest revision: at startup and by a command.

Alembic's command API is synchronous and its env.py would start its own event loop, so we
open an async connection and run Alembic inside `run_sync` on it (Alembic's documented
"programmatic API use with asyncio" recipe); the server's loop is never blocked by a
second loop.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from loguru import logger
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from phonebot.db.engine import create_engine, safe_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic config pointing at our migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if database_url:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def migrate(database_url: str, engine: AsyncEngine | None = None) -> str:
    """Upgrade to the head revision; returns it. Safe to run on every start."""
    own = engine is None
    engine = engine or create_engine(database_url)
    try:
        async with engine.begin() as connection:
            before = await connection.run_sync(_current_revision)
            await connection.run_sync(_upgrade)
    finally:
        if own:
            await engine.dispose()
    head = head_revision()
    if before != head:
        logger.info(f"Records database {safe_url(database_url)}: schema {before} → {head}")
    return head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
