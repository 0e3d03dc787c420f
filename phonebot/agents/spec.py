"""What an agent file may say: the pydantic schema of one YAML file in AGENTS_DIR.

Every field is checked when the file is loaded (phonebot.agents.loader), so a typo stops
the server at start with the file, the line and the field, never halfway through a call.
`extra="forbid"` everywhere: an unknown key is a misspelt one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The functions every call already has (phonebot.call.tools); a file's tool can't take
# their names.
BUILT_IN_TOOLS = frozenset(
    {"end_call", "transfer_call", "opt_out", "record_outcome", "search_knowledge"}
)
# OpenAI's rule for function names.
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
PYTHON_TARGET = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class _Strict(BaseModel):
    # Folded YAML text (`>`) ends with a newline: every string is stripped.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ToolSpec(_Strict):
    """A function the LLM may call that reaches the user's systems: an HTTP(S) endpoint
    (`url`, a signed POST) or a Python function (`python: package.module:function`)."""

    name: str = Field(pattern=TOOL_NAME)
    description: str = Field(min_length=1, max_length=1024)
    # JSON Schema of the arguments (an object). For a Python tool, left out: it is read
    # from the function's type hints and docstring.
    parameters: dict[str, Any] | None = None
    url: HttpUrl | None = None
    python: str | None = Field(default=None, pattern=PYTHON_TARGET)
    timeout_s: float = Field(default=5.0, gt=0, le=30)
    # Said once if the tool hasn't answered after about a second.
    filler: str | None = Field(default=None, max_length=300)

    @field_validator("name")
    @classmethod
    def _not_built_in(cls, name: str) -> str:
        if name in BUILT_IN_TOOLS:
            raise ValueError(f"{name!r} is a built-in function; choose another name")
        return name

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as error:
            raise ValueError(f"not a JSON Schema: {error.message}") from None
        if schema.get("type") != "object":
            raise ValueError('must be a JSON Schema of type "object"')
        return schema

    @model_validator(mode="after")
    def _one_target(self) -> ToolSpec:
        if (self.url is None) == (self.python is None):
            raise ValueError("give exactly one of url (an HTTP tool) or python (module:function)")
        if self.url is not None and self.parameters is None:
            raise ValueError("an HTTP tool needs `parameters` (a JSON Schema object)")
        return self

    @property
    def kind(self) -> Literal["http", "python"]:
        return "http" if self.url is not None else "python"


class OutcomeFieldSpec(_Strict):
    """One thing a call finds out (`record_outcome` during the call, or the analysis after
    it); `values` lists the allowed answers, none means free text."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    description: str = Field(min_length=1, max_length=500)
    values: tuple[str, ...] = ()


class KeywordAnswerSpec(_Strict):
    keywords: tuple[str, ...] = Field(min_length=1)
    answer: str = Field(min_length=1)


class OutcomeRuleSpec(_Strict):
    """Offline: when the callee says one of `keywords`, record `set` (first rule wins)."""

    keywords: tuple[str, ...] = Field(min_length=1)
    set: dict[str, str] = Field(min_length=1)
    answer: str | None = None


class OfflineSpec(_Strict):
    """What the offline responder (no LLM key) knows: keyword answers and outcome rules."""

    answers: tuple[KeywordAnswerSpec, ...] = ()
    outcome_rules: tuple[OutcomeRuleSpec, ...] = ()


class AnalysisSpec(_Strict):
    """Post-call analysis: one LLM request after the call ends (phonebot.agents.analysis)."""

    summary: bool = True
    # What success means for this agent, in words, e.g. "The customer agreed to get the
    # discount code". The LLM judges it; offline, `success_when` (outcome values) does.
    success: str | None = Field(default=None, max_length=1000)
    success_when: dict[str, str] = Field(default_factory=dict)
    fields: tuple[OutcomeFieldSpec, ...] = ()

    @field_validator("fields")
    @classmethod
    def _unique_fields(cls, fields: tuple[OutcomeFieldSpec, ...]) -> tuple[OutcomeFieldSpec, ...]:
        return _unique_names(fields, "fields")


class AgentSpec(_Strict):
    """One agent file."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    description: str | None = None
    # Call parameters that pick this agent (all must be equal), e.g. {session_type: orders}
    # or {direction: outbound, campaign_id: summer_sale}; `direction` is inbound/outbound.
    match: dict[str, str] = Field(default_factory=dict)
    # The agent for calls no other agent matches (exactly one agent has it).
    default: bool = False
    instructions: str = Field(min_length=1)
    greeting: str = Field(min_length=1)
    question: str = ""
    goodbye: str | None = None  # None: Agent's default
    voice: str | None = None
    language: str | None = None
    # Names and words the speech recogniser should expect ("Acme Outdoor", product names),
    # like the `hints` of Twilio's <Gather>: Whisper's hotwords offline, Deepgram's
    # keyterms, OpenAI's transcription prompt. A bias, not a limit.
    hints: tuple[Annotated[str, Field(min_length=1, max_length=100)], ...] = Field(
        default=(), max_length=50
    )
    # Server settings this agent changes for its calls, by name (docs/settings.md).
    settings: dict[str, Any] = Field(default_factory=dict)
    transfer_target: str | None = None
    voicemail_message: str | None = None
    # On dial-out: what to reach when a phone menu answers ("Reach a person in billing");
    # the dial's own `ivr_goal` comes first (docs/dialout.md "Phone menus").
    ivr_goal: str | None = Field(default=None, min_length=1, max_length=256)
    recording_notice: str | None = None
    opt_out_confirmation: str | None = None
    keypad: dict[str, Literal["transfer", "end"]] = Field(default_factory=dict)
    # Keypad menu: key -> the choice, in words ("opening hours"); answered at once.
    menu: dict[str, str] = Field(default_factory=dict)
    tools: tuple[ToolSpec, ...] = ()
    knowledge: tuple[str, ...] = ()
    outcome_fields: tuple[OutcomeFieldSpec, ...] = ()
    analysis: AnalysisSpec | None = None
    offline: OfflineSpec = Field(default_factory=OfflineSpec)

    @field_validator("keypad", "menu")
    @classmethod
    def _keys(cls, keypad: dict[str, str]) -> dict[str, str]:
        bad = [key for key in keypad if not re.fullmatch(r"[0-9*#]{1,8}", key)]
        if bad:
            raise ValueError(f"keypad keys must be digits, * or # (not {bad})")
        return keypad

    @field_validator("menu")
    @classmethod
    def _menu_apart_from_keypad(cls, menu: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """A key is a shortcut (`keypad`) or a menu choice, not both: the offline bot would
        answer the choice while an LLM is told to do both."""
        both = sorted(set(menu) & set(info.data.get("keypad") or {}))
        if both:
            raise ValueError(f"keys {both} are also in keypad: declare each key once")
        return menu

    @field_validator("match")
    @classmethod
    def _direction(cls, match: dict[str, str]) -> dict[str, str]:
        if match.get("direction", "inbound") not in ("inbound", "outbound"):
            raise ValueError("direction must be inbound or outbound")
        return match

    # Checks across fields are field validators on the later field (pydantic validates in
    # this order and hands the earlier ones in `info.data`), so a problem names its field.
    @field_validator("tools", "outcome_fields")
    @classmethod
    def _unique(cls, items: tuple, info: ValidationInfo) -> tuple:
        return _unique_names(items, str(info.field_name))

    @field_validator("analysis")
    @classmethod
    def _success_when_known(
        cls, analysis: AnalysisSpec | None, info: ValidationInfo
    ) -> AnalysisSpec | None:
        """`success_when` is judged on the outcomes recorded during the call: each pair
        must name an outcome field and one of its values."""
        if analysis is not None:
            _check_outcomes(analysis.success_when, info, "success_when")
        return analysis

    @field_validator("offline")
    @classmethod
    def _rules_set_known_fields(cls, offline: OfflineSpec, info: ValidationInfo) -> OfflineSpec:
        for rule in offline.outcome_rules:
            _check_outcomes(rule.set, info, "an outcome rule's `set`")
        return offline


def _unique_names(items: tuple, what: str) -> tuple:
    names = [item.name for item in items]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"two {what} share a name: {twice}")
    return items


def _check_outcomes(pairs: dict[str, str], info: ValidationInfo, what: str) -> None:
    """Each pair names one of the file's `outcome_fields`, with a value it allows."""
    known = {spec.name: spec for spec in info.data.get("outcome_fields", ())}
    for name, value in pairs.items():
        if name not in known:
            raise ValueError(f"{what} names {name!r}, not one of outcome_fields {sorted(known)}")
        if known[name].values and value not in known[name].values:
            raise ValueError(f"{what}: {name} must be one of {list(known[name].values)}")
