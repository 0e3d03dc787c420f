"""`python -m phonebot.campaigns start contacts.csv | list | status ID | pause ID | resume ID
| cancel ID | results ID`: outbound campaigns from a terminal (phonebot.campaigns.cli)."""

import sys

from phonebot.campaigns.cli import main

if __name__ == "__main__":
    sys.exit(main())
