"""`python -m phonebot.records migrate`: bring DATABASE_URL's schema up to date.

The server does the same at startup; this is for deploys that migrate before starting.
"""

from __future__ import annotations

import argparse
import asyncio

from phonebot.config import get_settings
from phonebot.records.db import safe_url
from phonebot.records.migrate import migrate


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m phonebot.records")
    parser.add_argument("command", choices=["migrate"])
    parser.add_argument("--database-url", help="default: DATABASE_URL")
    args = parser.parse_args()
    url = args.database_url or get_settings().database_url.get_secret_value()
    head = asyncio.run(migrate(url))
    print(f"{safe_url(url)}: schema at revision {head}")


if __name__ == "__main__":
    main()
