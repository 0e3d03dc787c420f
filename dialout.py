"""Place an outbound call from the command line, through `phonebot.twilio.dialout`.

    python dialout.py +15551234567 --param campaign_id=summer_sale --param customer_id=c-42
    python dialout.py +15551234567 --agent sales

`--agent NAME` picks the agent that talks (an agent file's name), checked against AGENTS_DIR
here: run it beside the server, with the same files.

It exits 0 once Twilio accepted the call, 1 when the call was not placed (bad input, Twilio
refused or could not be reached), 2 without PUBLIC_URL, and 3 when Twilio failed in a way
that may have placed the call (check the Twilio console before trying again).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from phonebot.agents.loader import load_agents
from phonebot.agents.selection import AGENT_PARAMETER
from phonebot.config import Settings, get_settings
from phonebot.twilio.dialout import DialoutRequest, check_agent_named, parse_param, place_call
from phonebot.twilio.rest import TwilioUnavailable

# Exit status of the command line when Twilio failed in a way that may have placed the call.
EXIT_MAYBE_PLACED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Place an outbound call with the phone bot.")
    parser.add_argument("to", help="number to call, E.164, e.g. +15551234567")
    parser.add_argument("--from", dest="from_", help="caller ID (default TWILIO_PHONE_NUMBER)")
    parser.add_argument(
        "--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE"
    )
    detection = parser.add_mutually_exclusive_group()
    detection.add_argument(
        "--machine-detection",
        action="store_const",
        const=True,
        help="Twilio's answering-machine detection: leave the voicemail message on a "
        "machine, talk to a person",
    )
    detection.add_argument(
        "--bot-machine-detection",
        dest="machine_detection",
        action="store_const",
        const="bot",
        help="the same, decided by the bot listening itself (no AMD request to Twilio)",
    )
    parser.add_argument("--agent", metavar="NAME", help="the agent that talks (its file's name)")
    parser.add_argument(
        "--ivr-goal",
        metavar="TEXT",
        help='when a phone menu answers, what to get through to, e.g. "Reach a person in billing"',
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if not settings.public_url:
        message = "PUBLIC_URL must be set: Twilio fetches the call's TwiML from it"
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        request = DialoutRequest(
            to=args.to,
            from_=args.from_,
            parameters=dict(args.param),
            machine_detection=args.machine_detection or False,
            agent=args.agent,
            ivr_goal=args.ivr_goal,
        )
        check_agent(request, settings)
        response = asyncio.run(place_call(request, settings, settings.public_url))
    except ValueError as error:  # pydantic's ValidationError and ParameterError included
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TwilioUnavailable as error:
        return twilio_failure(error)
    print(f"call {response.call_sid} to {response.to}: {response.status}")
    return 0


def check_agent(request: DialoutRequest, settings: Settings) -> None:
    """A named agent must be in AGENTS_DIR (ValueError: AgentFileError or ParameterError)."""
    parameters = request.call_parameters()
    if AGENT_PARAMETER in parameters:
        agents = load_agents(Path(settings.agents_dir), settings)
        check_agent_named(parameters, agents, field="--agent" if request.agent else "agent")


def twilio_failure(error: TwilioUnavailable) -> int:
    """Say what Twilio did and whether the call may exist; exit 3 if it may, else 1.

    A script that retries on 1 can't ring anyone twice; 3 needs a look at the console.
    """
    said = f" Twilio said: {error.message}" if error.message not in error.detail else ""
    print(f"error: {error.detail}.{said}", file=sys.stderr)
    return EXIT_MAYBE_PLACED if error.uncertain else 1


if __name__ == "__main__":
    sys.exit(main())
