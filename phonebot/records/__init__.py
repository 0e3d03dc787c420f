"""Call records: every call's record, transcript and recording, written in batches, read by
the API, page and CLI, and sent to your system as signed events (docs/records.md)."""

from phonebot.db.migrate import migrate
from phonebot.records.service import Records

__all__ = ["Records", "migrate"]
