"""Dial-out through Twilio's REST API: the request, the checks and the status callbacks.

The one home of placing a call, for `POST /dialout`, the campaign scheduler and the
`dialout.py` command line alike.

The call is created with `url=` pointing at this server's signed `POST /outbound`
endpoint, carrying the campaign parameters in its query string. When the callee picks
up, Twilio fetches that URL with the new CallSid (signed with the auth token), and the
TwiML it gets back carries every parameter, `call_type=outbound` and a stream token bound
to that CallSid. No token has to be guessed or remembered before the CallSid exists.

With `machine_detection`, Twilio also listens for an answering machine and POSTs its
verdict to `/amd` (see `phonebot.call.voicemail`); the `/outbound` URL then carries `amd=1`,
set here after the caller's parameters are validated, so the bot waits for that verdict.

A dial may name its agent (`"agent": "sales"`, `--agent sales`): it travels as the call's
`agent` parameter, which picks the agent outright (phonebot.agents.selection), and is
checked against the agents in use first (`check_agent_named`: 422 naming `agent`).

Every call also carries `StatusCallback=<PUBLIC_URL>/status`: Twilio POSTs (signed) the
call's progress there, and its final CallStatus, so a dial-out that is busy, unanswered,
failed or canceled, and never reaches `/outbound`, still gets a record (`StatusCallback`
below, read by the server's `POST /status`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from phonebot.agents.agent import IVR_GOAL_PARAMETER
from phonebot.agents.selection import AGENT_PARAMETER, AgentSet
from phonebot.config import Settings
from phonebot.phone_numbers import E164
from phonebot.records.limits import check_call_parameters, check_fits
from phonebot.records.schema import CallRecord
from phonebot.twilio.amd import AMD_BY_BOT, AMD_CALLBACK_PATH, AMD_PARAMETER, AMD_REQUESTED
from phonebot.twilio.dial_guard import check_destination
from phonebot.twilio.ids import check_call_sid
from phonebot.twilio.rest import create_call
from phonebot.twilio.statuses import CALL_STATUSES, FINAL_STATUSES
from phonebot.twilio.twiml import ParameterError, validate_custom_parameters

STATUS_CALLBACK_PATH = "/status"
# Answering-machine detection takes a phone menu for a machine (Twilio's AMD hears a long
# automated greeting; the bot's listener, a greeting it should leave a message on).
MENUS_OR_MACHINES = "can't be combined with machine_detection (a phone menu is a machine to it)"


# Answering-machine detection for a dial-out: false; true or "twilio" (Twilio's AMD, paid);
# "bot" (the bot listens: phonebot.call.voicemail.GreetingCheck).
MachineDetection = bool | Literal["twilio", "bot"]


class DialoutRequest(BaseModel):
    """Body of `POST /dialout`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    to: str = Field(pattern=E164, description="Number to call, E.164 (+15551234567)")
    from_: str | None = Field(
        default=None, alias="from", pattern=E164, description="Caller ID; TWILIO_PHONE_NUMBER"
    )
    parameters: dict[str, str] = Field(
        default_factory=dict, description="Stream parameters, e.g. campaign_id, customer_id"
    )
    machine_detection: MachineDetection = Field(
        default=False,
        description="Leave the agent's voicemail message on a machine, talk to a person: "
        "true or \"twilio\" asks Twilio's answering-machine detection (paid, and the bot "
        "waits for its verdict); \"bot\" lets the bot listen and decide itself",
    )
    agent: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="The agent that talks (an agent file's name; GET /agents), whatever the "
        "parameters would pick; sent as the parameter `agent`",
    )  # fmt: skip
    ivr_goal: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="When a phone menu answers, what to get through to (\"Reach a person in "
        "billing\"): the bot presses keys until it reaches a person, else hangs up (`ivr "
        "failed`); sent as the parameter `ivr_goal`. The agent file's `ivr_goal` otherwise",
    )  # fmt: skip

    @field_validator("agent")
    @classmethod
    def _one_agent(cls, agent: str | None, info: ValidationInfo) -> str | None:
        return one_agent(agent, info.data.get("parameters", {}))

    @field_validator("machine_detection")
    @classmethod
    def _no_goal(cls, detection: bool | str, info: ValidationInfo) -> bool | str:
        return menus_or_machines(detection, info.data.get("parameters", {}).get(IVR_GOAL_PARAMETER))

    @field_validator("ivr_goal")
    @classmethod
    def _one_goal(cls, goal: str | None, info: ValidationInfo) -> str | None:
        menus_or_machines(info.data.get("machine_detection"), goal)
        return same_as_parameter(IVR_GOAL_PARAMETER, goal, info.data.get("parameters", {}))

    def call_parameters(self) -> dict[str, str]:
        """The parameters the call carries: the caller's, the agent and the goal it names."""
        named = {AGENT_PARAMETER: self.agent, IVR_GOAL_PARAMETER: self.ivr_goal}
        return {**self.parameters, **{k: v for k, v in named.items() if v is not None}}


class DialoutResponse(BaseModel):
    call_sid: str
    status: str
    to: str


def one_agent(agent: str | None, parameters: Mapping[str, str]) -> str | None:
    """A body's `agent`, unless its parameters name another (ValueError: say one)."""
    named = parameters.get(AGENT_PARAMETER)
    if agent is not None and named is not None and named != agent:
        raise ValueError(f"parameters.{AGENT_PARAMETER} names another agent ({named!r})")
    return agent


def menus_or_machines(detection: bool | str | None, goal: str | None) -> bool | str | None:
    """`machine_detection` unless a phone-menu goal comes with it (ValueError)."""
    if detection and goal:
        raise ValueError(MENUS_OR_MACHINES)
    return detection


def same_as_parameter(name: str, value: str | None, parameters: Mapping[str, str]) -> str | None:
    """A body's field that travels as the parameter `name`, unless its parameters give
    that parameter another value (ValueError: say it once)."""
    given = parameters.get(name)
    if value is not None and given is not None and given != value:
        raise ValueError(f"parameters.{name} says otherwise ({given!r})")
    return value


def check_agent_named(
    parameters: Mapping[str, str], agents: AgentSet, *, field: str = AGENT_PARAMETER
) -> None:
    """ParameterError (naming `field`) when the parameters name an agent not in use: the call
    would otherwise fall back to the agent its other parameters pick, saying nothing."""
    name = parameters.get(AGENT_PARAMETER)
    if name is not None and agents.by_name(name) is None:
        known = ", ".join(agent.name for agent in agents.agents)
        raise ParameterError(field, f"no agent named {name!r} (the agents: {known})")


def validate_dial_parameters(
    parameters: Mapping[str, str], settings: Settings, *, where: str = "parameters"
) -> dict[str, str]:
    """A dial's custom parameters by /dialout's rules, for /dialout and campaigns alike:
    `validate_custom_parameters`, and `amd` is the server's own (set from machine_detection,
    checked again on /outbound), never the caller's. ParameterError names the field."""
    checked = validate_custom_parameters(parameters, settings, where=where)
    if AMD_PARAMETER in checked:
        raise ParameterError(f"{where}.{AMD_PARAMETER}", "is reserved; use machine_detection")
    check_call_parameters(checked, where=where)  # campaign_id, customer_id fit the record
    return checked


async def place_call(request: DialoutRequest, settings: Settings, base_url: str) -> DialoutResponse:
    """Check the destination and the parameters, and ask Twilio to place the call.

    Raises DialRefused (DIALOUT_ALLOWED_COUNTRIES, premium-rate or short number: HTTP 403),
    ParameterError (the caller's fault) or TwilioUnavailable (Twilio's answer). The
    do-not-call list needs the database: the server checks it before calling this.
    """
    if (refused := check_destination(request.to, settings)) is not None:
        raise refused  # toll-fraud guard: country, premium-rate, short numbers
    parameters = validate_dial_parameters(request.call_parameters(), settings)
    from_number = request.from_ or settings.twilio_phone_number
    if not from_number:
        raise ParameterError("from", "not given and TWILIO_PHONE_NUMBER is not set")
    amd_callback_url = None
    if request.machine_detection == "bot":
        # No AMD request: the bot listens itself (phonebot.call.voicemail.GreetingCheck).
        parameters[AMD_PARAMETER] = AMD_BY_BOT
    elif request.machine_detection:
        _check_amd_possible(settings)
        # Added after validation: the server's own parameter, not one of the caller's.
        parameters[AMD_PARAMETER] = AMD_REQUESTED
        amd_callback_url = f"{base_url}{AMD_CALLBACK_PATH}"
    query = f"?{urlencode(parameters)}" if parameters else ""
    created = await create_call(
        settings,
        to=request.to,
        from_=from_number,
        twiml_url=f"{base_url}/outbound{query}",
        amd_callback_url=amd_callback_url,
        status_callback_url=f"{base_url}{STATUS_CALLBACK_PATH}",
    )
    return DialoutResponse(call_sid=created.sid, status=created.status, to=created.to)


@dataclass(frozen=True)
class StatusCallback:
    """One of Twilio's call status callbacks (Twilio docs, "Call status callbacks":
    https://www.twilio.com/docs/voice/api/call-resource#statuscallback). Each POST
    carries the call's usual webhook parameters (CallSid, CallStatus, From, To,
    Direction, …) plus `Timestamp`, `SequenceNumber` (per call, from 0: callbacks may
    arrive out of order) and, on the final one, `CallDuration` in seconds."""

    call_sid: str
    status: str
    from_: str | None = None
    to: str | None = None
    direction: str | None = None
    duration_s: int | None = None
    sequence: int | None = None
    timestamp: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> StatusCallback:
        """The callback's fields; ParameterError names a missing or malformed one (a From
        or To longer than the record's column: no number or SIP URI is)."""
        call_sid = str(form.get("CallSid", ""))
        status = str(form.get("CallStatus", ""))
        check_call_sid(call_sid)
        if status not in CALL_STATUSES:
            raise ParameterError("CallStatus", f"must be one of {', '.join(sorted(CALL_STATUSES))}")
        check_fits("From", form.get("From"), CallRecord.from_number)
        check_fits("To", form.get("To"), CallRecord.to_number)
        return cls(
            call_sid=call_sid,
            status=status,
            from_=str(form.get("From", "")) or None,
            to=str(form.get("To", "")) or None,
            direction=str(form.get("Direction", "")) or None,
            duration_s=_int_or_none(form.get("CallDuration")),
            sequence=_int_or_none(form.get("SequenceNumber")),
            timestamp=str(form.get("Timestamp", "")) or None,
        )


def _int_or_none(value: object) -> int | None:
    text = str(value or "")
    return int(text) if text.isdigit() else None


def _check_amd_possible(settings: Settings) -> None:
    """Twilio posts the verdict to this server; a bot on Pipecat Cloud reads it only through
    the shared state (REDIS_URL, which its `bot()` then opens too), never from our memory."""
    if settings.env == "production" and not settings.redis_url:
        raise ParameterError(
            "machine_detection",
            "needs REDIS_URL with ENV=production: the AMD verdict reaches this server, and the "
            "bot on Pipecat Cloud can only read it from the shared state",
        )


def parse_param(text: str) -> tuple[str, str]:
    """One `--param NAME=VALUE` of a command line that dials (dialout.py, campaigns)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value
