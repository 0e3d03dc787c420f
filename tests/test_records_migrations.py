"""Records schema: DATABASE_URL picks the async driver, migrations keep rows and match the
tables the code writes to, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from phonebot.campaigns.schema import Campaign, CampaignContact
from phonebot.db.engine import UnsupportedDatabase, async_url, create_engine, sessionmaker
from phonebot.db.migrate import alembic_config, head_revision, migrate
from phonebot.db.tables import Base
from phonebot.records.schema import CallRecord, TranscriptEntry, utcnow

pytest_plugins = ["tests.pg_server"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("plain", "driver"),
    [
        ("sqlite:///./phonebot.db", "sqlite+aiosqlite"),
        ("postgresql://u:p@db/calls", "postgresql+asyncpg"),
        ("postgres://u:p@db/calls", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u:p@db/calls", "postgresql+asyncpg"),
    ],
)
def test_the_async_driver_is_picked_from_the_scheme(plain: str, driver: str):
    url = async_url(plain)
    assert url.drivername == driver
    # Only the driver changes: path, user, password and host are kept as written.
    assert url.render_as_string(hide_password=False).split("://")[1] == plain.split("://")[1]


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db"])
def test_unsupported_or_blocking_drivers_are_refused(url: str):
    with pytest.raises(UnsupportedDatabase):
        async_url(url)


async def test_an_upgrade_keeps_existing_records(database_url: str):
    assert await migrate(database_url) == head_revision()
    engine = create_engine(database_url)
    async with sessionmaker(engine).begin() as session:
        session.add(CallRecord(call_sid="CAkeep", created_at=utcnow(), direction="inbound"))
        session.add(TranscriptEntry(call_sid="CAkeep", seq=0, kind="caller", text="hello"))
    await engine.dispose()

    # A restart (or the command) runs the migrations again on the same database.
    assert await migrate(database_url) == head_revision()

    engine = create_engine(database_url)
    async with sessionmaker(engine)() as session:
        kept = await session.get(CallRecord, "CAkeep")
        texts = (await session.scalars(select(TranscriptEntry.text))).all()
        async with engine.connect() as connection:
            version = await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    await engine.dispose()
    assert kept is not None and kept.direction == "inbound"
    assert texts == ["hello"]
    assert version == head_revision()


async def test_a_downgrade_keeps_every_row_it_does_not_drop(database_url: str):
    """Down to 0002, columns go and rows stay: on SQLite a batch-mode drop would recreate
    the table, and with foreign keys on, cascade-delete every transcript and contact."""
    assert await migrate(database_url) == head_revision()
    engine = create_engine(database_url)
    now = utcnow()
    async with sessionmaker(engine).begin() as session:
        session.add(CallRecord(call_sid="CAkeep", created_at=now, direction="inbound"))
        session.add(TranscriptEntry(call_sid="CAkeep", seq=0, kind="caller", text="hello"))
        session.add(Campaign(
            id="cmp_keep", name="keep", status="running", created_at=now, updated_at=now,
            window_start="09:00", window_end="20:00", window_days=["mon"], max_concurrent=1,
            calls_per_minute=1, retry_attempts=1, retry_delay_s=60, retry_on=[],
            machine_detection=True, machine_detection_by="bot",
        ))  # fmt: skip
        await session.flush()
        session.add(CampaignContact(
            campaign_id="cmp_keep", row=1, to_number="+12025550100", timezone="UTC",
            state="pending", attempts=0, updated_at=now,
        ))  # fmt: skip

    def down(connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")

    async with engine.begin() as connection:
        await connection.run_sync(down)
        rows = {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar()
            for table in ("calls", "transcript_entries", "campaigns", "campaign_contacts")
        }
    await engine.dispose()
    assert rows == {"calls": 1, "transcript_entries": 1, "campaigns": 1, "campaign_contacts": 1}


async def test_the_migrations_build_exactly_the_tables_the_code_uses(database_url: str):
    """A column added to schema.py without a migration (or the reverse) fails here."""
    await migrate(database_url)
    engine = create_engine(database_url)
    async with engine.connect() as connection:
        differences = await connection.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
        tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    await engine.dispose()
    assert differences == []
    assert {"calls", "transcript_entries", "event_deliveries"} <= tables


def test_the_migrate_command(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'deploy' / 'calls.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "phonebot.records", "migrate", "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"revision {head_revision()}" in result.stdout
    assert (tmp_path / "deploy" / "calls.db").is_file()
