"""Call records: every call's record and transcript in a database, events to your system,
and the API and command line that read them (docs/records.md).

The app owns one `Records` (see `service.py`); the call path feeds `Records.writer`.
"""

from phonebot.records.migrate import migrate
from phonebot.records.service import Records

__all__ = ["Records", "migrate"]
