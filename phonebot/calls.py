"""`python -m phonebot.calls list | show CALL_SID | export`: the call log from a terminal.

The code lives in phonebot.records.cli.
"""

from phonebot.records.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
