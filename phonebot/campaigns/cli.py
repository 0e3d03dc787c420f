"""`python -m phonebot.campaign`: campaigns from a terminal, straight on DATABASE_URL.

    python -m phonebot.campaign start contacts.csv --param campaign_id=summer_sale \\
        --window 09:00-20:00 --max-concurrent 5
    python -m phonebot.campaign list
    python -m phonebot.campaign status cmp_0123…      [--json]
    python -m phonebot.campaign pause|resume|cancel cmp_0123…
    python -m phonebot.campaign results cmp_0123… [-o results.csv]

The server's scheduler dials what this writes (any server on the same database), like the
API would; reads DATABASE_URL from the environment or ./.env, like `python -m phonebot.calls`.
Exit status: 0 done, 1 bad input or no such campaign.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from dialout import _parse_param
from phonebot.campaigns.contacts import ContactErrors, prepare, read_csv
from phonebot.campaigns.models import DAYS, CampaignDetail, CampaignIn
from phonebot.campaigns.store import (
    RESULT_COLUMNS,
    BadTransition,
    CampaignNotFound,
    CampaignStore,
)
from phonebot.campaigns.windows import SystemClock
from phonebot.config import Settings, get_settings
from phonebot.csv_cells import SafeDictWriter
from phonebot.records.cli import database_parser, migrated_database, parse_when


def _window(text: str) -> tuple[str, str]:
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HH:MM-HH:MM, got {text!r}")
    return start.strip(), end.strip()


def _days(text: str) -> list[str]:
    days = [day.strip().lower()[:3] for day in text.split(",") if day.strip()]
    if not days or any(day not in DAYS for day in days):
        raise argparse.ArgumentTypeError(f"expected days like mon,tue,wed, got {text!r}")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = database_parser("python -m phonebot.campaign", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="create a campaign from a CSV of contacts")
    start.add_argument("contacts", type=Path, help="CSV: to, customer_id?, timezone?, …")
    start.add_argument("--name", help="default: the file's name")
    start.add_argument("--param", action="append", type=_parse_param, default=[],
                       metavar="NAME=VALUE", help="a stream parameter for every call")
    start.add_argument("--window", type=_window, default=("09:00", "20:00"),
                       metavar="HH:MM-HH:MM", help="local time of each contact")
    start.add_argument("--days", type=_days, default=list(DAYS), help="e.g. mon,tue,wed")
    start.add_argument("--max-concurrent", type=int, default=5)
    start.add_argument("--calls-per-minute", type=int, default=10)
    start.add_argument("--attempts", type=int, default=3, help="calls per contact at most")
    start.add_argument("--retry-delay", type=int, default=3600, metavar="SECONDS")
    start.add_argument("--retry-on", default="busy,no-answer,failed,voicemail")
    start.add_argument("--machine-detection", action="store_true")
    start.add_argument("--from", dest="from_", help="caller ID (default TWILIO_PHONE_NUMBER)")
    start.add_argument("--start-at", type=parse_when, help="ISO date-time (UTC if no zone)")
    start.add_argument("--end-at", type=parse_when, help="ISO date-time (UTC if no zone)")
    commands.add_parser("list", help="campaigns, newest first")
    status = commands.add_parser("status", help="a campaign and its contacts")
    status.add_argument("campaign_id")
    status.add_argument("--json", action="store_true")
    for action in ("pause", "resume", "cancel"):
        commands.add_parser(action, help=f"{action} a campaign").add_argument("campaign_id")
    results = commands.add_parser("results", help="one CSV row per contact")
    results.add_argument("campaign_id")
    results.add_argument("--output", "-o", help="file to write (default: standard output)")
    return parser


def campaign_body(args: argparse.Namespace) -> CampaignIn:
    """The API's request body from the command line (same validation, same errors)."""
    contacts = read_csv(args.contacts.read_text(encoding="utf-8-sig"))
    return CampaignIn.model_validate({
        "name": args.name or args.contacts.stem,
        "parameters": dict(args.param),
        "contacts": contacts,
        "window": {"start": args.window[0], "end": args.window[1], "days": args.days},
        "max_concurrent": args.max_concurrent,
        "calls_per_minute": args.calls_per_minute,
        "retry": {"attempts": args.attempts, "delay_s": args.retry_delay,
                  "on": [o.strip() for o in args.retry_on.split(",") if o.strip()]},
        "machine_detection": args.machine_detection,
        "from": args.from_,
        "start_at": args.start_at,
        "end_at": args.end_at,
    })


async def run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    url = args.database_url or settings.database_url.get_secret_value()
    async with migrated_database(url) as sessions:
        return await _command(args, settings, CampaignStore(sessions, settings), out)


async def _command(
    args: argparse.Namespace, settings: Settings, store: CampaignStore, out: TextIO
) -> int:
    now = SystemClock().now()
    if args.command == "start":
        body = campaign_body(args)
        prepared = prepare(body, settings)
        campaign = await store.create(body, prepared, now)
        out.write(f"campaign {campaign.id}: {campaign.status}, {len(prepared.contacts)}"
                  " contacts\n")
        for duplicate in prepared.duplicates:
            out.write(f"  {duplicate['to']} given on rows {duplicate['rows']}: merged\n")
    elif args.command == "list":
        for summary in await store.list():
            counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
            out.write(f"{summary.created_at:%Y-%m-%d %H:%M}  {summary.id}  {summary.status:9}"
                      f"  {summary.name}  ({counts})\n")
    elif args.command == "status":
        detail = await store.get(args.campaign_id)
        out.write(detail.model_dump_json(indent=2) + "\n" if args.json else describe(detail))
    elif args.command in ("pause", "resume", "cancel"):
        status = await store.act(args.campaign_id, args.command, now)
        out.write(f"campaign {args.campaign_id}: {status}\n")
    else:
        writer = SafeDictWriter(out, RESULT_COLUMNS)  # no cell a spreadsheet would run
        writer.writeheader()
        writer.writerows(await store.results(args.campaign_id))
    return 0


def describe(detail: CampaignDetail) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in detail.counts.items())
    lines = [f"{detail.id}  {detail.name}: {detail.status}  ({counts}; {detail.total} contacts)"]
    for c in detail.contacts:
        outcome = f"  {c.outcome}" if c.outcome else ""
        fields = f"  {json.dumps(c.outcomes)}" if c.outcomes else ""
        lines.append(f"  {c.row:4}  {c.to:16} {c.state:12} attempts {c.attempts}{outcome}"
                     f"{fields}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    try:
        if args.command == "results" and args.output:
            with open(args.output, "w", newline="", encoding="utf-8") as out:
                return asyncio.run(run(args, settings, out))
        return asyncio.run(run(args, settings, sys.stdout))
    except ContactErrors as error:
        for problem in error.errors:
            print(f"error: {'.'.join(map(str, problem['loc'][1:]))}: {problem['msg']}",
                  file=sys.stderr)
    except ValidationError as error:
        for problem in error.errors():
            print(f"error: {'.'.join(map(str, problem['loc']))}: {problem['msg']}",
                  file=sys.stderr)
    except CampaignNotFound as error:
        print(f"error: no campaign {error}", file=sys.stderr)
    except (BadTransition, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
    return 1
