"""`python -m phonebot.records list | show CALL_SID | export | migrate`: the call log, and
the database's schema, from a terminal (phonebot.records.cli)."""

import sys

from phonebot.records.cli import main

if __name__ == "__main__":
    sys.exit(main())
