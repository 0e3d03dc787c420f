"""Post-call analysis: a summary, a success judgement against the agent's own criterion,
and structured fields, read from a call that has ended.

Pure (no network, no records): what the LLM is asked (`analysis_messages`), how its answer
is read and checked (`parse_analysis`), and the extractive analysis that stands in with no
LLM key, or when the LLM keeps failing (`extractive_analysis`). `phonebot.call.analysis`
sends the request once the call is over, retries it, and hands the result to the record.

Every analysis is one JSON object, the same with or without an LLM:

    {"method": "llm" | "extractive", "summary": str | null,
     "success": {"value": bool | null, "reason": str} | null,
     "fields": {name: str | null}, "error": str | null}

`success` is null when the agent states no criterion; its `value` is null when the
criterion can't be checked (offline, an agent with `success` in words but no
`success_when`). `error` says why the LLM's analysis was replaced by the extractive one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from phonebot.agents.spec import AnalysisSpec, OutcomeFieldSpec

LLM = "llm"
EXTRACTIVE = "extractive"
# A long call's transcript is cut in the middle to this many characters (its opening and
# its end say most about what was asked and how it ended); ~10k tokens.
MAX_TRANSCRIPT_CHARS = 40_000
# How much of the caller's first turn the extractive summary quotes.
MAX_ASKED_CHARS = 300
MAX_SUMMARY_CHARS = 4_000
MAX_REASON_CHARS = 1_000
MAX_FIELD_CHARS = 500
ROLES = ("user", "assistant", "tool")

SYSTEM_PROMPT = (
    "You analyse a phone call that has just ended, between an AI phone agent (\"Agent\") and "
    "a person (\"Caller\": the person who called, or who was called). Read the transcript and "
    "answer with one JSON object and nothing else, no prose and no code fence, of exactly "
    "this shape:\n{shape}\nUse only what the transcript and the recorded outcomes say; "
    "never guess. Write the summary for a colleague who did not hear the call."
)


@dataclass(frozen=True)
class CallFacts:
    """What the analysis is given about one finished call.

    `messages` are the call's LLM context without its system prompt (user, assistant and
    tool messages, as OpenAI's chat format has them); `outcomes` what the bot recorded
    during the call (`record_outcome`); `end_reason` and `duration_s` how it ended.
    """

    agent: str
    direction: str
    messages: tuple[dict[str, Any], ...]
    end_reason: str
    duration_s: float
    outcomes: Mapping[str, str] = field(default_factory=dict)


class AnalysisError(ValueError):
    """The LLM's answer is not the analysis asked for: not JSON, or a key missing or of
    the wrong kind. Worth another try: a model's answer varies."""


# --- the transcript ---------------------------------------------------------------------


def conversation(messages: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    """The messages an analysis reads: the caller's, the agent's and the functions' (no
    system prompt, nothing provider-specific)."""
    return tuple(
        dict(message)
        for message in messages
        if isinstance(message, Mapping) and message.get("role") in ROLES
    )


def message_text(content: Any) -> str:
    """An LLM context message's text: a string, or the text parts of a multi-part content
    list, whitespace collapsed (the analysis and the offline responder read turns alike)."""
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return " ".join(content.split()) if isinstance(content, str) else ""


def transcript_lines(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per turn: "Caller: …", "Agent: …", "Agent called f({…})", "Result: …"."""
    lines = []
    for message in messages:
        role, text = message.get("role"), message_text(message.get("content"))
        if role == "user" and text:
            lines.append(f"Caller: {text}")
        elif role == "assistant":
            if text:
                lines.append(f"Agent: {text}")
            for call in message.get("tool_calls") or []:
                function = (call.get("function") or {}) if isinstance(call, Mapping) else {}
                arguments = " ".join(str(function.get("arguments") or "{}").split())
                lines.append(f"Agent called {function.get('name')}({arguments})")
        elif role == "tool":
            lines.append(f"Result: {text}")
    return lines


def transcript_text(
    messages: Iterable[Mapping[str, Any]], limit: int = MAX_TRANSCRIPT_CHARS
) -> str:
    """The transcript as text, its middle left out when it is longer than `limit`."""
    text = "\n".join(transcript_lines(messages)) or "(nothing was said)"
    if len(text) <= limit:
        return text
    half = limit // 2
    left_out = len(text) - 2 * half
    return f"{text[:half]}\n[… {left_out} characters left out …]\n{text[-half:]}"


def first_caller_turn(messages: Iterable[Mapping[str, Any]]) -> str | None:
    for message in messages:
        if message.get("role") == "user" and (text := message_text(message.get("content"))):
            return text
    return None


# --- the request ------------------------------------------------------------------------


def _field_shape(spec: OutcomeFieldSpec) -> str:
    if spec.values:
        return " or ".join(json.dumps(v) for v in spec.values) + " or null"
    return "a short string or null"


def answer_shape(spec: AnalysisSpec) -> str:
    """The JSON object the LLM must answer with, for this agent's analysis."""
    parts = []
    if spec.summary:
        parts.append('"summary": "<two or three sentences>"')
    if spec.success:
        parts.append('"success": {"value": <true or false>, "reason": "<one sentence>"}')
    if spec.fields:
        inner = ", ".join(f'"{f.name}": {_field_shape(f)}' for f in spec.fields)
        parts.append(f'"fields": {{{inner}}}')
    return "{" + ", ".join(parts) + "}"


def _facts_text(spec: AnalysisSpec, facts: CallFacts) -> str:
    placed = "the agent placed this call" if facts.direction == "outbound" else "a dial-in call"
    outcomes = ", ".join(f"{k}={v}" for k, v in facts.outcomes.items()) or "none"
    lines = [
        f"Agent: {facts.agent} ({placed}).",
        f"How the call ended: {facts.end_reason}, after {facts.duration_s:.0f} seconds.",
        f"Outcomes the agent recorded during the call: {outcomes}.",
    ]
    if spec.success:
        lines.append(f"Success criterion (judge \"success\" against it): {spec.success}")
    for spec_field in spec.fields:
        allowed = f" Allowed values: {', '.join(spec_field.values)}." if spec_field.values else ""
        lines.append(f"Field \"{spec_field.name}\": {spec_field.description}{allowed}")
    return "\n".join(lines)


def analysis_messages(spec: AnalysisSpec, facts: CallFacts) -> list[dict[str, str]]:
    """The chat messages of the one request for this call's analysis: what to answer (a
    JSON object of `answer_shape`), the criterion, the fields, and the transcript."""
    user = (
        f"{_facts_text(spec, facts)}\n\nTranscript:\n{transcript_text(facts.messages)}\n\n"
        f"Answer with the JSON object only."
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(shape=answer_shape(spec))},
        {"role": "user", "content": user},
    ]


# --- reading the answer -------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    """The answer's JSON object; a ```json fence around it is tolerated."""
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        answer = json.loads(stripped)
    except ValueError as error:
        raise AnalysisError(f"not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(answer, dict):
        raise AnalysisError("not a JSON object")
    return answer


def _summary(answer: Mapping[str, Any]) -> str:
    summary = answer.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise AnalysisError('"summary" must be a non-empty string')
    return summary.strip()[:MAX_SUMMARY_CHARS]


def _success(answer: Mapping[str, Any]) -> dict[str, Any]:
    success = answer.get("success")
    if not isinstance(success, Mapping) or not isinstance(success.get("value"), bool):
        raise AnalysisError('"success" must be {"value": true or false, "reason": "..."}')
    reason = success.get("reason")
    reason = reason.strip()[:MAX_REASON_CHARS] if isinstance(reason, str) else ""
    return {"value": success["value"], "reason": reason}


def _field_value(spec: OutcomeFieldSpec, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        value = "yes" if value else "no"
    if not isinstance(value, str | int | float):
        raise AnalysisError(f'field "{spec.name}" must be a string or null')
    text = str(value).strip()[:MAX_FIELD_CHARS]
    if not spec.values:
        return text or None
    for allowed in spec.values:  # "Order" is "order"
        if allowed.lower() == text.lower():
            return allowed
    raise AnalysisError(f'field "{spec.name}" must be one of {list(spec.values)} or null')


def _fields(spec: AnalysisSpec, answer: Mapping[str, Any]) -> dict[str, str | None]:
    given = answer.get("fields", {})
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise AnalysisError('"fields" must be an object')
    return {f.name: _field_value(f, given.get(f.name)) for f in spec.fields}


def parse_analysis(text: str, spec: AnalysisSpec, facts: CallFacts) -> dict[str, Any]:
    """The LLM's answer as the call's analysis; AnalysisError when it isn't one.

    Only what the agent asked for is read (unknown keys and fields are ignored); a field
    with `values` takes one of them (any case) or null. Success is the LLM's judgement of
    the agent's words; an agent with only `success_when` is judged on its outcomes.
    """
    answer = _json_object(text)
    success = _success(answer) if spec.success else offline_success(spec, facts.outcomes)
    return {
        "method": LLM,
        "summary": _summary(answer) if spec.summary else None,
        "success": success,
        "fields": _fields(spec, answer),
        "error": None,
    }


# --- without an LLM -----------------------------------------------------------------------


def offline_success(spec: AnalysisSpec, outcomes: Mapping[str, str]) -> dict[str, Any] | None:
    """Success from `success_when` against the recorded outcomes (every pair must hold);
    null when the agent states no criterion, a null value when it can't be checked here."""
    if not spec.success_when:
        if not spec.success:
            return None
        return {"value": None, "reason": "no success_when to check without an LLM"}
    for name, wanted in spec.success_when.items():
        got = outcomes.get(name)
        if got is None:
            return {"value": False, "reason": f"{name} was not recorded (wanted {wanted})"}
        if got.strip().lower() != wanted.strip().lower():
            return {"value": False, "reason": f"{name} is {got}, not {wanted}"}
    met = ", ".join(f"{k}={v}" for k, v in spec.success_when.items())
    return {"value": True, "reason": f"recorded {met}"}


def _extractive_summary(facts: CallFacts) -> str:
    """What the caller asked (their first turn), the outcomes, how the call ended."""
    asked = first_caller_turn(facts.messages)
    who = "Callee" if facts.direction == "outbound" else "Caller"
    if asked is None:
        parts = [f"{who} said nothing."]
    else:
        quoted = asked if len(asked) <= MAX_ASKED_CHARS else asked[: MAX_ASKED_CHARS - 1] + "…"
        verb = "said" if facts.direction == "outbound" else "asked"
        parts = [f"{who} {verb}: {quoted.rstrip('.?! ')}."]
    if facts.outcomes:
        parts.append(f"Outcomes: {', '.join(f'{k}={v}' for k, v in facts.outcomes.items())}.")
    parts.append(f"Ended: {facts.end_reason} after {facts.duration_s:.0f} s.")
    return " ".join(parts)


def _outcome_field(spec: OutcomeFieldSpec, outcomes: Mapping[str, str]) -> str | None:
    value = outcomes.get(spec.name)
    if value is None or (spec.values and value not in spec.values):
        return None
    return value


def extractive_analysis(
    spec: AnalysisSpec, facts: CallFacts, error: str | None = None
) -> dict[str, Any]:
    """The analysis without an LLM: the summary from the transcript's first caller turn,
    the outcomes and the end; success from `success_when`; fields from the outcomes of
    the same name. `error` says why the LLM's analysis isn't there, when it was tried."""
    return {
        "method": EXTRACTIVE,
        "summary": _extractive_summary(facts) if spec.summary else None,
        "success": offline_success(spec, facts.outcomes),
        "fields": {f.name: _outcome_field(f, facts.outcomes) for f in spec.fields},
        "error": error,
    }


def success_value(analysis: Mapping[str, Any] | None) -> bool | None:
    """The analysis's success as a boolean (the records' `success` column), or None."""
    success = (analysis or {}).get("success")
    value = success.get("value") if isinstance(success, Mapping) else None
    return value if isinstance(value, bool) else None
