"""Every table of the database on one metadata: what Alembic compares its migrations with.

The call records, the campaigns and the do-not-call list each declare their own tables on
`phonebot.db.base.Base`; this module imports their schemas so `metadata` holds them all.
Only Alembic's `env.py` and the schema tests read it: it sits above the three (see
`.importlinter`), which is why it is not `phonebot.db.base`.
"""

from __future__ import annotations

from phonebot.campaigns import schema as campaign_tables
from phonebot.db.base import Base
from phonebot.dnc import schema as dnc_tables
from phonebot.records import schema as record_tables

SCHEMAS = (record_tables, campaign_tables, dnc_tables)
metadata = Base.metadata

__all__ = ["SCHEMAS", "Base", "metadata"]
