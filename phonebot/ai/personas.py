"""Who the bot is on a call: every persona and campaign, as data, in one place.

A call's Stream parameters pick the persona (`select_persona`): a `campaign_id` names a
dial-out campaign script, a `session_type` names a dial-in persona, anything else gets the
general assistant. Adding a persona or campaign means adding an entry here, nothing else.
The keyword answers are what the offline responder says when no LLM is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from phonebot.twilio.caller_id import presented_caller_id

PHONE_STYLE = (
    "You are talking on a phone line: everything you write is spoken aloud. "
    "Use short sentences, ask one question at a time, never use lists, markdown, "
    "emojis or URLs, and write numbers the way you would say them."
)


@dataclass(frozen=True)
class KeywordAnswer:
    """An answer the offline responder gives when the caller says one of the keywords."""

    keywords: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class OutcomeField:
    """One thing a call finds out, recorded by the LLM's `record_outcome` function.

    `values` lists the allowed answers (e.g. yes/no); empty means free text (e.g. when to
    call back). The LLM sees `description` in the function's schema.
    """

    name: str
    description: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutcomeRule:
    """Offline: when the callee says one of `keywords`, record `fields` (first rule wins,
    so "not interested" goes before "interested")."""

    keywords: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]
    answer: str | None = None  # said once recorded (None: the persona's keyword answer)


@dataclass(frozen=True)
class Persona:
    """A role the bot plays: its instructions, how it opens and what it knows offline."""

    name: str
    instructions: str
    greeting: str
    question: str
    answers: tuple[KeywordAnswer, ...] = field(default_factory=tuple)
    goodbye: str = "Thanks for calling. Goodbye!"
    # What callers typically say to this persona; the offline STT listens for these words.
    caller_phrases: tuple[str, ...] = field(default_factory=tuple)
    # Settings this persona changes for its calls, by setting name, e.g.
    # {"tts_voice": "en-gb", "language": "en", "transfer_target": "+15551230000",
    #  "silence_timeout_s": 6, "max_call_duration_s": 300}. Checked against the settings.
    overrides: dict[str, object] = field(default_factory=dict)
    # Keypad shortcuts: digit -> action the bot takes at once ("transfer" is the one known).
    keypad: dict[str, str] = field(default_factory=dict)
    # Left on an answering machine when dial-out asked for machine detection.
    voicemail: str = (
        "Hi, this is Sam from Acme Outdoor. Sorry we missed you. We'll try again soon. Goodbye!"
    )

    # What a call with this persona finds out (`record_outcome`), stored on the call's
    # record (`outcomes`) and its campaign contact; the rules are the offline responder's.
    outcome_fields: tuple[OutcomeField, ...] = field(default_factory=tuple)
    outcome_rules: tuple[OutcomeRule, ...] = field(default_factory=tuple)
    # Said when the callee asks not to be called again (`opt_out`), before hanging up.
    opt_out_confirmation: str = (
        "I'm sorry to have bothered you. I've taken your number off our list, so you won't "
        "be called again. Goodbye!"
    )

    # Said right after the greeting when the call is recorded (RECORD_CALLS); None = the
    # persona does not announce recordings. Check your local law on announcing them.
    recording_notice: str | None = None

    def announcing_recording(self) -> Persona:
        """This persona with its recording notice in the greeting (for a recorded call)."""
        if not self.recording_notice:
            return self
        return replace(self, greeting=f"{self.greeting} {self.recording_notice}")

    def system_prompt(self) -> str:
        shortcuts = "".join(
            f" If the caller presses {digit}, call the {action}_call function."
            for digit, action in self.keypad.items()
        )
        return f"{self.instructions} {PHONE_STYLE}{shortcuts}"

    def offline_vocabulary(self) -> tuple[str, ...]:
        """The phrases the offline recogniser is limited to on a call with this persona."""
        keywords = tuple(k for entry in self.answers for k in entry.keywords)
        return COMMON_CALLER_PHRASES + self.caller_phrases + keywords


# Said on any call; with the persona's own phrases they make the offline STT's vocabulary.
COMMON_CALLER_PHRASES = (
    "hello",
    "hello who is this",
    "yes",
    "yes please",
    "no",
    "no thank you",
    "okay",
    "thank you",
    "thanks that's all goodbye",
    "goodbye",
    "bye",
    "wait I have a question",
    "can I speak to a person",
    "what are your opening hours",
    "sorry can you say that again",
)


# How callees ask not to be called again (the offline STT's vocabulary on dial-out calls;
# the offline responder's opt-out keywords are in phonebot.ai.offline.responder).
OPT_OUT_PHRASES = (
    "please stop calling me",
    "remove me from your list",
    "please stop calling me remove me from your list",
    "don't call me again",
)

# What dial-in personas say when the call is recorded.
DIALIN_RECORDING_NOTICE = "This call is recorded."

COMMON_ANSWERS = (
    KeywordAnswer(
        ("hours", "open", "opening", "close"),
        "We're open Monday to Friday, nine to six, and Saturday ten to two.",
    ),
)

DIALIN_PERSONAS: dict[str, Persona] = {
    "general": Persona(
        name="general",
        instructions=(
            "You are a friendly, helpful assistant for Acme Outdoor answering the phone. "
            "Help the caller with whatever they need and keep answers brief."
        ),
        greeting="Hello, thanks for calling Acme Outdoor.",
        question="How can I help you today?",
        answers=COMMON_ANSWERS,
        recording_notice=DIALIN_RECORDING_NOTICE,
    ),
    "support": Persona(
        name="support",
        keypad={"0": "transfer"},
        recording_notice=DIALIN_RECORDING_NOTICE,
        instructions=(
            "You are a patient customer support agent for Acme Outdoor. Find out what the "
            "problem is, ask for an order number when it helps, and offer clear next steps."
        ),
        greeting="Hello, you've reached Acme Outdoor support.",
        question="What can I help you with?",
        answers=(
            KeywordAnswer(
                ("order", "delivery", "arrived", "package", "shipping"),
                "I'm sorry about your order. Orders usually arrive within five working days. "
                "Could you tell me your order number?",
            ),
            KeywordAnswer(
                ("appointment", "book", "booking"),
                "I can book you an appointment. Which day works best for you?",
            ),
            KeywordAnswer(
                ("refund", "return"),
                "You can return any item within thirty days for a full refund.",
            ),
            *COMMON_ANSWERS,
        ),
        caller_phrases=(
            "my order has not arrived",
            "where is my package",
            "I'd like to book an appointment",
            "I want a refund",
            "I want to return an item",
            "my order number is one two three four",
        ),
    ),
    "sales": Persona(
        name="sales",
        recording_notice=DIALIN_RECORDING_NOTICE,
        instructions=(
            "You are an upbeat sales assistant for Acme Outdoor. Learn what the caller "
            "is looking for and recommend one product at a time."
        ),
        greeting="Hello, you've reached Acme Outdoor sales.",
        question="What are you shopping for today?",
        answers=(
            KeywordAnswer(
                ("tent", "tents", "camping"),
                "Our best seller is the Trailhead two person tent, on offer at one hundred "
                "and twenty dollars.",
            ),
            KeywordAnswer(("price", "cost", "discount"), "Everything is thirty percent off."),
            *COMMON_ANSWERS,
        ),
        caller_phrases=(
            "I'm looking for a tent",
            "I need camping gear",
            "how much does it cost",
            "is there a discount",
        ),
    ),
}

CAMPAIGNS: dict[str, Persona] = {
    "summer_sale": Persona(
        name="summer_sale",
        instructions=(
            "You are calling an existing Acme Outdoor customer about the summer sale: "
            "everything is thirty percent off until the end of August. Be polite, take no "
            "for an answer, and offer to send a discount code by text message."
        ),
        greeting=(
            "Hi, this is Sam from Acme Outdoor calling about our summer sale. "
            "Everything is thirty percent off until the end of August."
        ),
        question="Do you have a minute?",
        answers=(
            KeywordAnswer(
                ("yes", "sure", "okay", "minute"),
                "Great! I can text you a discount code for thirty percent off. Would you like "
                "that?",
            ),
            KeywordAnswer(
                ("no", "busy", "not interested"),
                "No problem at all. Thanks for your time, and enjoy your summer. Goodbye!",
            ),
        ),
        goodbye="Thanks for your time, and enjoy your summer. Goodbye!",
        # Sales calls are short; callers get a little less time to think.
        overrides={"max_call_duration_s": 300, "silence_timeout_s": 6},
        voicemail=(
            "Hi, this is Sam from Acme Outdoor. Our summer sale is on: everything is thirty "
            "percent off until the end of August. Call us back any time. Goodbye!"
        ),
        caller_phrases=(
            "hello who is calling",
            "sure I have a minute",
            "I'm busy right now",
            "I'm not interested",
            "yes send me the code",
            "yes I would like that",
            "no I don't want it",
            "call me back tomorrow",
            *OPT_OUT_PHRASES,
        ),
        outcome_fields=(
            OutcomeField(
                "interested", "Whether the customer wants the discount code.", ("yes", "no")
            ),
            OutcomeField(
                "callback_at",
                "When the customer asked to be called back, in their words, e.g. "
                "'tomorrow afternoon'. Leave it out unless they asked.",
            ),
        ),
        outcome_rules=(
            OutcomeRule(
                ("not interested", "no thanks", "no thank you", "don't want"),
                (("interested", "no"),),
                "No problem at all. Thanks for your time.",
            ),
            OutcomeRule(
                ("interested", "would like", "send me the code", "want the code"),
                (("interested", "yes"),),
                "Wonderful. I'll text you the discount code right after this call.",
            ),
            OutcomeRule(
                ("call me back", "tomorrow"),
                (("callback_at", "tomorrow"),),
                "Of course. I'll call you back tomorrow.",
            ),
        ),
    ),
}

OUTBOUND_DEFAULT = Persona(
    name="outbound",
    instructions=(
        "You are calling a customer on behalf of Acme Outdoor. Introduce yourself, say why "
        "you are calling, and keep it short."
    ),
    greeting="Hi, this is Sam from Acme Outdoor.",
    question="Do you have a minute?",
    caller_phrases=OPT_OUT_PHRASES,
)


def select_persona(parameters: Mapping[str, str]) -> Persona:
    """Pick the persona a call's Stream parameters ask for."""
    campaign_id = parameters.get("campaign_id")
    if campaign_id:
        return CAMPAIGNS.get(campaign_id, OUTBOUND_DEFAULT)
    if parameters.get("call_type") == "outbound":
        return OUTBOUND_DEFAULT
    return DIALIN_PERSONAS.get(parameters.get("session_type", ""), DIALIN_PERSONAS["general"])


def spoken_number_ending(number: str, digits: int = 4) -> str:
    """'+15551234567' -> '4 5 6 7': the tail of a number, spaced so TTS reads digits."""
    tail = [ch for ch in number if ch.isdigit()][-digits:]
    return " ".join(tail)


def opening_line(persona: Persona, parameters: Mapping[str, str]) -> str:
    """The persona's greeting, telling a dial-in caller which number we see them on.

    A withheld number (`phonebot.twilio.caller_id`) is no number: the line is left out.
    """
    sentences = [persona.greeting]
    ending = spoken_number_ending(presented_caller_id(parameters.get("caller_id")))
    if ending and parameters.get("call_type", "inbound") == "inbound":
        sentences.append(f"I see you're calling from the number ending in {ending}.")
    sentences.append(persona.question)
    return " ".join(sentences)


def keyword_answer(persona: Persona, utterance: str) -> str | None:
    """The first keyword answer whose keyword the caller said, if any."""
    words = set(utterance.lower().replace("'", " ").split())
    text = f" {utterance.lower()} "
    for entry in persona.answers:
        for keyword in entry.keywords:
            if (" " in keyword and f" {keyword} " in text) or keyword in words:
                return entry.answer
    return None


def outcome_rule(persona: Persona, utterance: str) -> OutcomeRule | None:
    """The first outcome rule whose keyword the callee said, if any."""
    for rule in persona.outcome_rules:
        if _said_any(rule.keywords, utterance):
            return rule
    return None


def outcome_problems(persona: Persona, fields: Mapping[str, object]) -> list[str]:
    """Why `fields` can't be recorded for this persona (unknown field, value not allowed,
    empty); empty list when they can. Told to the LLM so it can correct itself."""
    known = {f.name: f for f in persona.outcome_fields}
    problems = []
    for name, value in fields.items():
        spec = known.get(name)
        if spec is None:
            problems.append(f"unknown outcome field {name!r}; known: {sorted(known)}")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be a non-empty string")
        elif spec.values and value not in spec.values:
            problems.append(f"{name} must be one of {list(spec.values)}, not {value!r}")
    if not fields:
        problems.append("no outcome fields given")
    return problems


def _said_any(keywords: tuple[str, ...], utterance: str) -> bool:
    words = set(utterance.lower().replace("'", " ").split())
    text = f" {' '.join(utterance.lower().replace(',', ' ').split())} "
    return any((" " in k and f" {k} " in text) or k in words for k in keywords)
