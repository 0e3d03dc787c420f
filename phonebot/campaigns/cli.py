"""`python -m phonebot.campaigns`: campaigns from a terminal, through the server's API.

    python -m phonebot.campaigns start contacts.csv --param campaign_id=summer_sale \\
        --window 09:00-20:00 --max-concurrent 5 [--agent summer_sale]
    python -m phonebot.campaigns list
    python -m phonebot.campaigns status cmp_0123…      [--json]
    python -m phonebot.campaigns pause|resume|cancel cmp_0123…
    python -m phonebot.campaigns results cmp_0123… [-o results.csv]

A client of the running server, like `gh` or `stripe`: `start` uploads the CSV to
`POST /campaigns` exactly as `curl -F contacts=@contacts.csv` would, the others call
`GET /campaigns`, `GET /campaigns/{id}`, `POST /campaigns/{id}/pause|resume|cancel` and
`GET /campaigns/{id}/results.csv`. So contacts are checked in one place, by the server's own
settings (its TWILIO_PHONE_NUMBER, DIALOUT_ALLOWED_COUNTRIES, ...), and the campaign is
dialed by the server that accepted it.

The server: `--server`, else PHONEBOT_URL or SERVER_URL, else http://127.0.0.1:8000. The key:
`--api-key`, else ADMIN_API_KEY from the environment or ./.env (the server's key).
Exit status: 0 done, 1 refused (the API's answer is printed: a 422 names the field and row
of every bad contact) or the server unreachable, 2 a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx
from dotenv import dotenv_values

from phonebot.campaigns.models import (
    DAYS,
    CampaignCreated,
    CampaignDetail,
    CampaignList,
    CampaignStatusChange,
)
from phonebot.records.cli import parse_when
from phonebot.twilio.dialout import parse_param

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_VARIABLES = ("PHONEBOT_URL", "SERVER_URL")
# A 10,000-contact upload is checked in a few seconds; a stalled server is not waited on.
TIMEOUT_S = 60.0


class ApiRefused(Exception):
    """The server answered 4xx/5xx: `lines` say why, one problem a line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


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


def default_server(environ: Mapping[str, str] = os.environ) -> str:
    """PHONEBOT_URL or SERVER_URL, else the server's default address."""
    return next((environ[name] for name in SERVER_VARIABLES if environ.get(name)), DEFAULT_SERVER)


def default_api_key(env_file: Path = Path(".env")) -> str | None:
    """ADMIN_API_KEY from the environment, else from ./.env (as the server reads it)."""
    return os.environ.get("ADMIN_API_KEY") or dotenv_values(env_file).get("ADMIN_API_KEY")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phonebot.campaigns", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=default_server(), metavar="URL",
                        help="the server's base URL (default: PHONEBOT_URL, SERVER_URL or "
                        f"{DEFAULT_SERVER})")
    parser.add_argument("--api-key", help="the server's ADMIN_API_KEY (default: ADMIN_API_KEY "
                        "from the environment or ./.env)")
    commands = parser.add_subparsers(dest="command", required=True)
    _start_parser(commands.add_parser("start", help="create a campaign from a CSV of contacts"))
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


def _start_parser(start: argparse.ArgumentParser) -> None:
    start.add_argument("contacts", type=Path, help="CSV: to, customer_id?, timezone?, …")
    start.add_argument("--name", help="default: the file's name")
    start.add_argument("--param", action="append", type=parse_param, default=[],
                       metavar="NAME=VALUE", help="a stream parameter for every call")
    start.add_argument("--agent", metavar="NAME", help="the agent that talks on every call "
                       "(its file's name; python -m phonebot.agents check lists them)")
    start.add_argument("--ivr-goal", metavar="TEXT", help="when a phone menu answers, what "
                       "to get through to, e.g. \"Reach a person in billing\"")
    start.add_argument("--window", type=_window, default=("09:00", "20:00"),
                       metavar="HH:MM-HH:MM", help="local time of each contact")
    start.add_argument("--days", type=_days, default=list(DAYS), help="e.g. mon,tue,wed")
    start.add_argument("--max-concurrent", type=int, default=5)
    start.add_argument("--calls-per-minute", type=int, default=10)
    start.add_argument("--attempts", type=int, default=3, help="calls per contact at most")
    start.add_argument("--retry-delay", type=int, default=3600, metavar="SECONDS")
    start.add_argument("--retry-on", default="busy,no-answer,failed,voicemail",
                       help="outcomes tried again: busy, no-answer, failed, voicemail, ivr_failed")
    detection = start.add_mutually_exclusive_group()
    detection.add_argument("--machine-detection", action="store_true",
                           help="Twilio's answering-machine detection (paid)")
    detection.add_argument("--bot-machine-detection", action="store_true",
                           help="the bot listens for voicemail itself")
    start.add_argument("--from", dest="from_", help="caller ID (default: the server's "
                       "TWILIO_PHONE_NUMBER)")
    start.add_argument("--start-at", type=parse_when, help="ISO date-time (UTC if no zone)")
    start.add_argument("--end-at", type=parse_when, help="ISO date-time (UTC if no zone)")


def campaign_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every field of `POST /campaigns` but the contacts: the upload's `campaign` part."""
    return {
        "name": args.name or args.contacts.stem,
        "parameters": dict(args.param),
        "agent": args.agent,
        "ivr_goal": args.ivr_goal,
        "window": {"start": args.window[0], "end": args.window[1], "days": args.days},
        "max_concurrent": args.max_concurrent,
        "calls_per_minute": args.calls_per_minute,
        "retry": {"attempts": args.attempts, "delay_s": args.retry_delay,
                  "on": [o.strip() for o in args.retry_on.split(",") if o.strip()]},
        "machine_detection": "bot" if args.bot_machine_detection else args.machine_detection,
        "from": args.from_,
        "start_at": args.start_at.isoformat() if args.start_at else None,
        "end_at": args.end_at.isoformat() if args.end_at else None,
    }


def call(client: httpx.Client, method: str, path: str, **options: Any) -> httpx.Response:
    """The API's answer; ApiRefused (its detail, line by line) for a 4xx or 5xx."""
    response = client.request(method, path, **options)
    if response.is_error:
        raise ApiRefused(problems(response))
    return response


def problems(response: httpx.Response) -> list[str]:
    """The API's `detail`: one line per problem of a 422 ("contacts.0.to: row 1: …")."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        return [_problem(item) for item in detail]
    if not detail:
        detail = f"HTTP {response.status_code} {response.reason_phrase}"
    if response.status_code == 401:
        detail = f"{detail} (pass the server's ADMIN_API_KEY: --api-key or ADMIN_API_KEY)"
    return [str(detail)]


def _problem(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(part) for part in item.get("loc", [])]
    field = ".".join(loc[1:] if loc[:1] == ["body"] else loc)
    return f"{field}: {item.get('msg')}" if field else str(item.get("msg"))


def start(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> None:
    """Upload the CSV as it is (the server reads and checks it) with the other fields."""
    upload = {"contacts": (args.contacts.name, args.contacts.read_bytes(), "text/csv")}
    form = {"campaign": json.dumps(campaign_options(args))}
    created = CampaignCreated.model_validate(
        call(client, "POST", "/campaigns", files=upload, data=form).json()
    )
    out.write(f"campaign {created.id}: {created.status}, {created.contacts} contacts\n")
    for duplicate in created.duplicates:
        out.write(f"  {duplicate['to']} given on rows {duplicate['rows']}: merged\n")


def list_campaigns(client: httpx.Client, out: TextIO) -> None:
    listed = CampaignList.model_validate(call(client, "GET", "/campaigns").json())
    for summary in listed.campaigns:
        counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
        out.write(f"{summary.created_at:%Y-%m-%d %H:%M}  {summary.id}  {summary.status:9}"
                  f"  {summary.name}  ({counts})\n")


def status(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> None:
    body = call(client, "GET", f"/campaigns/{_id(args)}").json()
    if args.json:
        out.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(describe(CampaignDetail.model_validate(body)))


def act(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> None:
    path = f"/campaigns/{_id(args)}/{args.command}"
    changed = CampaignStatusChange.model_validate(call(client, "POST", path).json())
    out.write(f"campaign {changed.id}: {changed.status}\n")


def results(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> None:
    """The API's results.csv as it is (formula cells already escaped by the server)."""
    text = call(client, "GET", f"/campaigns/{_id(args)}/results.csv").text
    if not args.output:
        out.write(text)
        return
    with open(args.output, "w", newline="", encoding="utf-8") as file:
        file.write(text)


def _id(args: argparse.Namespace) -> str:
    """The campaign id as one path segment (a "/" in it can't reach another route)."""
    return quote(args.campaign_id, safe="")


def run(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> None:
    if args.command == "start":
        start(client, args, out)
    elif args.command == "list":
        list_campaigns(client, out)
    elif args.command == "status":
        status(client, args, out)
    elif args.command in ("pause", "resume", "cancel"):
        act(client, args, out)
    else:
        results(client, args, out)


def describe(detail: CampaignDetail) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in detail.counts.items())
    agent = f"  agent {detail.agent}" if detail.agent else ""
    lines = [f"{detail.id}  {detail.name}: {detail.status}  ({counts}; {detail.total} contacts)"
             f"{agent}"]
    for c in detail.contacts:
        outcome = f"  {c.outcome}" if c.outcome else ""
        fields = f"  {json.dumps(c.outcomes)}" if c.outcomes else ""
        lines.append(f"  {c.row:4}  {c.to:16} {c.state:12} attempts {c.attempts}{outcome}"
                     f"{fields}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = args.api_key or default_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=args.server, headers=headers, timeout=TIMEOUT_S) as client:
            run(client, args, sys.stdout)
        return 0
    except ApiRefused as refused:
        for line in refused.lines:
            print(f"error: {line}", file=sys.stderr)
    except httpx.ConnectError as error:
        print(f"error: the server isn't reachable at {args.server} ({error}); start it "
              "(python server.py) or point --server or PHONEBOT_URL at it", file=sys.stderr)
    except httpx.HTTPError as error:
        print(f"error: the server at {args.server} did not answer: {error!r}", file=sys.stderr)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
    return 1
