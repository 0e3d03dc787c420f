"""The campaign API's request and response bodies (typed, so /docs shows every field)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

from phonebot.agents.agent import IVR_GOAL_PARAMETER
from phonebot.agents.selection import AGENT_PARAMETER
from phonebot.campaigns.windows import DAYS, parse_hhmm
from phonebot.phone_numbers import E164
from phonebot.twilio.dialout import (
    MachineDetection,
    menus_or_machines,
    one_agent,
    same_as_parameter,
)

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Outcome = Literal["busy", "no-answer", "failed", "voicemail", "ivr_failed"]
CampaignStatus = Literal["scheduled", "running", "paused", "completed", "canceled"]
ContactState = Literal[
    "pending", "calling", "completed", "voicemail", "failed", "unknown", "opted_out",
    "do_not_call", "refused", "canceled", "expired",
]
# States a contact never leaves.
FINAL_STATES = frozenset(
    {"completed", "voicemail", "failed", "unknown", "opted_out", "do_not_call", "refused",
     "canceled", "expired"}
)
# States a campaign never leaves.
CLOSED = frozenset({"completed", "canceled"})


class WindowIn(BaseModel):
    """Hours during which a contact may be rung, in the contact's local time."""

    model_config = ConfigDict(extra="forbid")

    start: str = Field("09:00", description="HH:MM, local time of each contact")
    end: str = Field("20:00", description="HH:MM (exclusive), after start")
    days: list[Day] = Field(default_factory=lambda: list(DAYS), min_length=1)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        parse_hhmm(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> WindowIn:
        if parse_hhmm(self.end) <= parse_hhmm(self.start):
            raise ValueError("window.end must be after window.start (an empty or reversed window)")
        self.days = sorted(set(self.days), key=DAYS.index)
        return self


class RetryIn(BaseModel):
    """Which outcomes are tried again, how often and after how long."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(
        3, ge=1, le=10, description="Calls per contact at most, the first included"
    )
    delay_s: int = Field(3600, ge=0, le=7 * 86400, description="Seconds before trying again")
    on: list[Outcome] = Field(
        default_factory=lambda: ["busy", "no-answer", "failed", "voicemail"],
        description="Outcomes worth another attempt",
    )


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(description="E.164, e.g. +12025550123")
    customer_id: str | None = Field(None, max_length=128)
    parameters: dict[str, str] = Field(default_factory=dict)
    timezone: str | None = Field(None, description="IANA zone, e.g. America/New_York")


class CampaignIn(BaseModel):
    """Body of `POST /campaigns`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=255)
    parameters: dict[str, str] = Field(
        default_factory=dict, description="Stream parameters for every call, e.g. campaign_id"
    )
    agent: str | None = Field(
        None, min_length=1, max_length=64,
        description="The agent that talks on every call (an agent file's name; GET /agents), "
        "whatever the parameters would pick; kept as the parameter `agent`",
    )  # fmt: skip
    ivr_goal: str | None = Field(
        None, min_length=1, max_length=256,
        description="When a phone menu answers, what to get through to; kept as the "
        "parameter `ivr_goal` (the agent file's `ivr_goal` otherwise)",
    )  # fmt: skip
    contacts: list[ContactIn] = Field(min_length=1)
    window: WindowIn = Field(default_factory=WindowIn)
    max_concurrent: int = Field(5, ge=1, le=1000)
    calls_per_minute: int = Field(10, ge=1, le=6000)
    retry: RetryIn = Field(default_factory=RetryIn)
    machine_detection: MachineDetection = Field(
        False,
        description="true or \"twilio\": Twilio's answering-machine detection; \"bot\": the "
        "bot listens and decides itself (as POST /dialout's)",
    )
    from_: str | None = Field(None, alias="from", pattern=E164, description="Caller ID")
    start_at: datetime | None = Field(None, description="ISO 8601 with a zone offset")
    end_at: datetime | None = Field(None, description="ISO 8601 with a zone offset")

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        """A time without a zone is ambiguous (whose 09:00?) and can't be compared with
        the clock's aware now: refused, naming the field, rather than guessed."""
        if value is not None and value.utcoffset() is None:
            raise ValueError(
                "must include a time zone offset, e.g. 2026-11-25T09:00:00-05:00 or …Z"
            )
        return value

    @field_validator("agent")
    @classmethod
    def _one_agent(cls, agent: str | None, info: ValidationInfo) -> str | None:
        return one_agent(agent, info.data.get("parameters", {}))

    @model_validator(mode="after")
    def _period(self) -> CampaignIn:
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        return self

    @field_validator("ivr_goal")
    @classmethod
    def _one_goal(cls, goal: str | None, info: ValidationInfo) -> str | None:
        return same_as_parameter(IVR_GOAL_PARAMETER, goal, info.data.get("parameters", {}))

    @field_validator("machine_detection")
    @classmethod
    def _no_goal(cls, detection: MachineDetection, info: ValidationInfo) -> MachineDetection:
        """Not with a phone-menu goal: the campaign's, or any contact's own."""
        goals = [info.data.get("ivr_goal"), info.data.get("parameters", {}).get(IVR_GOAL_PARAMETER)]
        goals += [c.parameters.get(IVR_GOAL_PARAMETER) for c in info.data.get("contacts", [])]
        menus_or_machines(detection, next((goal for goal in goals if goal), None))
        return detection

    @model_validator(mode="after")
    def _agent_is_a_parameter(self) -> CampaignIn:
        """The named agent and the phone-menu goal travel with every call as its `agent`
        and `ivr_goal` parameters (the campaign's parameters are stored and dialed as they
        are: no column of their own)."""
        if self.agent is not None:
            self.parameters = {**self.parameters, AGENT_PARAMETER: self.agent}
        if self.ivr_goal is not None:
            self.parameters = {**self.parameters, IVR_GOAL_PARAMETER: self.ivr_goal}
        return self


class CampaignCreated(BaseModel):
    id: str
    status: CampaignStatus
    contacts: int
    duplicates: list[dict[str, Any]] = Field(
        default_factory=list, description='Numbers given more than once, merged: {"to", "rows"}'
    )


class CampaignStatusChange(BaseModel):
    """The answer to pause / resume / cancel: the campaign's status after it."""

    id: str
    status: CampaignStatus


class ContactOut(BaseModel):
    row: int
    to: str
    customer_id: str | None
    timezone: str
    state: ContactState
    attempts: int
    outcome: str | None
    outcomes: dict[str, Any] | None
    next_attempt_at: datetime | None
    call_sids: list[str]


class CampaignSummary(BaseModel):
    id: str
    name: str
    status: CampaignStatus
    created_at: datetime
    completed_at: datetime | None
    counts: dict[str, int] = Field(description="Contacts by state")
    total: int


class CampaignDetail(CampaignSummary):
    parameters: dict[str, Any]
    window: WindowIn
    max_concurrent: int
    calls_per_minute: int
    retry: RetryIn
    machine_detection: MachineDetection
    start_at: datetime | None
    end_at: datetime | None
    duplicates: list[dict[str, Any]]
    contacts: list[ContactOut]

    @computed_field(description="The agent named for every call (its `agent` parameter)")
    @property
    def agent(self) -> str | None:
        return self.parameters.get(AGENT_PARAMETER)


class CampaignList(BaseModel):
    campaigns: list[CampaignSummary]
