"""`python -m phonebot.records`: the call log from a terminal.

    python -m phonebot.records list [--direction outbound] [--status busy] [--limit 20]
    python -m phonebot.records show CA0123…
    python -m phonebot.records export --since 2026-11-01 --format csv > calls.csv
    python -m phonebot.records migrate

Reads DATABASE_URL from the environment or ./.env, like the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TextIO

from sqlalchemy.ext.asyncio import async_sessionmaker

from phonebot.config import get_settings
from phonebot.csv_cells import SafeDictWriter
from phonebot.db.engine import create_engine, safe_url, sessionmaker
from phonebot.db.migrate import migrate
from phonebot.records.models import CallDetail, CallSummary, as_json
from phonebot.records.store import CallFilter, CallStore

CSV_COLUMNS = [
    name if name != "from_" else "from"
    for name in CallDetail.model_fields
    if name != "transcript"
]


def parse_when(text: str) -> datetime:
    """ISO 8601 date or date-time; without a zone, UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def parse_bool(text: str) -> bool:
    """true/false (also yes/no, 1/0), as the API's ?success= takes them."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.strip().lower() not in value:
        raise argparse.ArgumentTypeError(f"not true or false: {text!r}")
    return value[text.strip().lower()]


def database_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a terminal tool on the records database (`python -m phonebot.records`;
    the campaigns' tool goes through the server's API instead): its docstring as help, and
    `--database-url`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: DATABASE_URL")
    return parser


@asynccontextmanager
async def migrated_database(url: str) -> AsyncIterator[async_sessionmaker]:
    """Sessions on the database at `url`, migrated first (a terminal tool may be the first
    to touch it), the engine disposed on exit."""
    engine = create_engine(url)
    try:
        await migrate(url, engine)
        yield sessionmaker(engine)
    finally:
        await engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = database_parser("python -m phonebot.records", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the newest calls, one line each")
    _filters(listing)
    listing.add_argument("--limit", type=int, default=20)
    show = commands.add_parser("show", help="one call with its transcript")
    show.add_argument("call_sid")
    show.add_argument("--json", action="store_true", help="the record as JSON")
    export = commands.add_parser("export", help="calls as CSV (one row each) or JSON lines")
    _filters(export)
    export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    migrate_command = commands.add_parser(
        "migrate", help="bring the schema up to date (the server does it at start-up too)"
    )
    # Also after the command, as `python -m phonebot.records migrate --database-url URL`.
    migrate_command.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="default: DATABASE_URL"
    )
    return parser


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--direction", choices=["inbound", "outbound"])
    parser.add_argument("--persona")
    parser.add_argument("--campaign-id")
    parser.add_argument("--end-reason")
    parser.add_argument("--status", help="Twilio's final status, e.g. busy")
    parser.add_argument("--number", help="the caller's or the called number")
    parser.add_argument(
        "--success", type=parse_bool, help="true or false: the post-call analysis's judgement"
    )
    parser.add_argument("--since", type=parse_when, help="ISO date or date-time (UTC)")
    parser.add_argument("--until", type=parse_when, help="ISO date or date-time (UTC)")


def _where(args: argparse.Namespace) -> CallFilter:
    return CallFilter(
        direction=args.direction, persona=args.persona, campaign_id=args.campaign_id,
        end_reason=args.end_reason, status=args.status, number=args.number,
        success=args.success, since=args.since, until=args.until,
    )


async def run(args: argparse.Namespace, out: TextIO) -> int:
    url = args.database_url or get_settings().database_url.get_secret_value()
    if args.command == "migrate":  # for deploys that migrate before starting the server
        print(f"{safe_url(url)}: schema at revision {await migrate(url)}", file=out)
        return 0
    async with migrated_database(url) as sessions:
        store = CallStore(sessions)
        if args.command == "list":
            page = await store.list(_where(args), args.limit)
            print_list(page.calls, out)
        elif args.command == "show":
            call = await store.get(args.call_sid)
            if call is None:
                print(f"no record of call {args.call_sid}", file=sys.stderr)
                return 1
            if args.json:
                out.write(json.dumps(as_json(call), indent=2) + "\n")
            else:
                print_call(call, out)
        else:
            await export(store, _where(args), args.format, out)
    return 0


def print_list(calls: Sequence[CallSummary], out: TextIO) -> None:
    if not calls:
        out.write("no calls recorded\n")
        return
    for call in calls:
        outcome = call.end_reason or call.twilio_status or "in progress"
        duration = f"{call.duration_s:6.1f}s" if call.duration_s is not None else "      -"
        judged = "" if call.success is None else "  success" if call.success else "  no success"
        out.write(
            f"{call.created_at:%Y-%m-%d %H:%M:%S}  {call.call_sid}  {call.direction or '-':8}"
            f"  {call.from_ or '-'} → {call.to or '-'}  {call.persona or '-'}  {duration}"
            f"  {outcome}{judged}\n"
        )


def print_call(call: CallDetail, out: TextIO) -> None:
    facts = as_json(call)
    facts.pop("transcript")
    analysis = facts.pop("analysis")
    for name, value in facts.items():
        if value not in (None, {}, False):
            out.write(f"{name:22} {value}\n")
    if analysis is not None:
        print_analysis(analysis, out)
    out.write("transcript:\n")
    for entry in call.transcript:
        at = f"[{entry.at_s:7.2f}s]" if entry.at_s is not None else "[       ]"
        out.write(f"  {at} {describe(entry)}\n")


def print_analysis(analysis: dict, out: TextIO) -> None:
    """The post-call analysis: how it was made, the summary, success and fields."""
    how = analysis["method"] + (f" ({analysis['error']})" if analysis.get("error") else "")
    out.write(f"analysis:              {how}\n")
    if analysis.get("summary"):
        out.write(f"  summary              {analysis['summary']}\n")
    if (success := analysis.get("success")) is not None:
        out.write(f"  success              {success['value']}: {success['reason']}\n")
    for name, value in (analysis.get("fields") or {}).items():
        out.write(f"  {name:20} {value}\n")


def describe(entry) -> str:
    """One transcript entry as a line of a conversation."""
    if entry.kind == "keypad":
        return f"caller pressed {entry.text}"
    if entry.kind == "transfer":
        return f"warm transfer: {entry.text}{_transfer_timings(entry.data or {})}"
    if entry.kind == "function":
        data = entry.data or {}
        return (
            f"bot called {data.get('name')}({json.dumps(data.get('arguments'))})"
            f" → {json.dumps(data.get('result'))}"
        )
    # Records from before cut-off turns kept their text may hold a bot turn with none.
    line = f"{entry.speaker}: {entry.text if entry.text is not None else '…'}"
    if entry.kind == "reprompt":
        line += "  (re-prompt)"
    if entry.reply_latency_s is not None:
        line += f"  ({entry.reply_latency_s:.2f}s)"
    if entry.interrupted:
        line += _cut_off(entry.data or {})
    return line


def _transfer_timings(data: dict) -> str:
    """ "  (answered after 4.1s, decided after 9.8s)" from a transfer entry's timings."""
    parts = [
        f"{label} after {data[key]:.1f}s"
        for key, label in (("answered_after_s", "answered"), ("decided_after_s", "decided"))
        if isinstance(data.get(key), int | float)
    ]
    return f"  ({', '.join(parts)})" if parts else ""


def _cut_off(data: dict) -> str:
    """The mark of a cut-off bot turn, with what the caller heard of it when known."""
    if "heard_s" not in data:
        return "  [interrupted]"
    heard = data.get("heard_text") or ""
    return f'  [interrupted after {data["heard_s"]:.1f}s: heard "{heard}"]'


async def export(store: CallStore, where: CallFilter, fmt: str, out: TextIO) -> None:
    # Cells a spreadsheet would run as formulas are prefixed with ' (`phonebot.csv_cells`).
    writer = SafeDictWriter(out, CSV_COLUMNS, extrasaction="ignore") if fmt == "csv" else None
    if writer:
        writer.writeheader()
    async for call in store.iterate(where):
        row = as_json(call)
        if writer is None:
            out.write(json.dumps(row) + "\n")
            continue
        for name in ("parameters", "provider_errors", "analysis"):
            row[name] = json.dumps(row[name]) if row[name] is not None else ""
        writer.writerow(row)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export" and args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            return asyncio.run(run(args, out))
    return asyncio.run(run(args, sys.stdout))
