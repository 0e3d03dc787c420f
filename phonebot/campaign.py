"""`python -m phonebot.campaign start contacts.csv | list | status ID | pause ID | resume ID |
cancel ID | results ID`: outbound campaigns from a terminal.

The code lives in phonebot.campaigns.cli (see docs/campaigns.md).
"""

from phonebot.campaigns.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
