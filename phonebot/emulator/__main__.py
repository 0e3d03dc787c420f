"""`python -m phonebot.emulator twilio`: a standalone offline "Twilio" for dial-outs.

It serves Twilio's REST calls API on loopback (`TwilioRestEmulator`) and plays the called
numbers with scripted callees (phonebot.emulator.callees), so a server started with
`TWILIO_API_BASE_URL=http://127.0.0.1:8099` can run a whole campaign with no phone and no
keys:

    python -m phonebot.emulator twilio --port 8099 --callees rules --server http://127.0.0.1:8000

It signs its webhooks and status callbacks with `TWILIO_AUTH_TOKEN` (from the environment
or `.env`, as the server reads it) and prints one line per call as it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from phonebot.emulator.callees import KINDS, CalleeBook
from phonebot.emulator.calls import EmulatedCall
from phonebot.emulator.client import Env, quiet_logs
from phonebot.emulator.errors import EmulatorError
from phonebot.emulator.rest import TwilioRestEmulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phonebot.emulator",
        description="Offline Twilio: the REST calls API with scripted callees.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    twilio = commands.add_parser("twilio", help="serve Twilio's REST calls API on loopback")
    twilio.add_argument("--host", default="127.0.0.1")
    twilio.add_argument("--port", type=int, default=8099)
    twilio.add_argument(
        "--server",
        default="http://127.0.0.1:8000",
        help="where the phonebot server runs (webhooks and streams go there)",
    )
    twilio.add_argument(
        "--callees",
        default="rules",
        choices=("rules", *KINDS),
        help="how called numbers behave: 'rules' (by last digit) or one behaviour for all",
    )
    twilio.add_argument(
        "--callee",
        action="append",
        default=[],
        metavar="NUMBER=KIND",
        help="one number's behaviour (repeatable), e.g. +15551230007=opt-out",
    )
    twilio.add_argument(
        "--no-answer-after",
        type=float,
        default=5.0,
        metavar="S",
        help="how long an unanswered number rings (default 5 s; Twilio's is the call's Timeout)",
    )
    return parser


def describe_call(call: EmulatedCall, kind: str) -> str:
    """One line about a finished call: who, what they were, how it ended."""
    duration = call.to_json()["duration"] or "0"
    verdict = f", answered by {call.answered_by}" if call.answered_by else ""
    error = f" ({call.error})" if call.error else ""
    return f"{call.sid} → {call.to} [{kind}]: {call.status}, {duration} s{verdict}{error}"


async def report(twilio: TwilioRestEmulator, call: EmulatedCall) -> None:
    callee = twilio.callees.callee(call.to) if twilio.callees else None
    kind = callee.kind if callee else "answer"
    print(f"{call.sid} → {call.to} [{kind}]: calling", flush=True)
    with contextlib.suppress(TimeoutError):
        await call.wait_finished(timeout=600)
    print(describe_call(call, kind), flush=True)


async def serve(args: argparse.Namespace) -> int:
    env = Env.load()  # the same environment / .env reading as `python -m phonebot.call`
    try:
        callees = CalleeBook.parse(args.callees, args.callee)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    twilio = TwilioRestEmulator(
        account_sid=env.account_sid,
        auth_token=env.auth_token,
        host=args.host,
        port=args.port,
        local_server_url=args.server,
        callees=callees,
        no_answer_after=args.no_answer_after,
    )
    try:
        await twilio.start()
    except EmulatorError as error:
        print(f"cannot start: {error}", file=sys.stderr)
        return 1
    print(f"Twilio REST emulator on {twilio.base_url}, calling back {args.server}", flush=True)
    print(f"callees:\n{callees.describe()}", flush=True)
    if not env.auth_token:
        print("warning: TWILIO_AUTH_TOKEN is not set: webhooks go unsigned", flush=True)
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            with contextlib.suppress(EmulatorError):
                call = await twilio.wait_for_call(timeout=3600)
                task = asyncio.create_task(report(twilio, call))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        await twilio.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs(verbose=False)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
