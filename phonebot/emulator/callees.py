"""The people a dial-out reaches, played by the REST emulator: scripted callees.

A campaign needs more than "the number answers": some people are interested, some are
not, some ask to be called back, some are busy or never pick up, some have voicemail, and
some ask to be taken off the list. `Callee` is one of those behaviours; `CalleeBook` says
which number behaves how, per number or by a rule (the default rule is keyed on the last
digit, so a 10-number list ending 0-9 shows every behaviour).

A callee who answers speaks its lines with the offline TTS into the media stream, each
after the bot has finished its turn, like `MediaStreamCaller` does for `phonebot.emulator.client`;
the offline bot hears them with its Whisper recogniser and answers by its keyword and
outcome rules (the summer sale's `offline.outcome_rules`, the responder's opt-out words).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from phonebot.audio import TWILIO_SAMPLE_RATE, tone
from phonebot.emulator.script import Dtmf, Hangup, Menu, Pause, Speak, WaitForBot, WaitForHangup

if TYPE_CHECKING:  # annotations only
    from phonebot.emulator.script import Step

# What an unanswered call ends as, Twilio's final CallStatus
# (https://www.twilio.com/docs/voice/api/call-resource#call-status-values).
UNANSWERED = ("busy", "no-answer", "failed")
# Twilio's AnsweredBy for a voicemail when MachineDetection=DetectMessageEnd heard the beep
# (https://www.twilio.com/docs/voice/answering-machine-detection#webhook-parameters).
MACHINE = "machine_end_beep"
HUMAN = "human"
HELLO = "Hello?"
GOODBYE = "goodbye"
VOICEMAIL_GREETING = "Hi, you've reached Alex. Please leave a message after the beep."
# The beep that ends a voicemail greeting: the recording starts after it.
BEEP_HZ, BEEP_S = 1000.0, 0.5
# A phone's call-screening assistant, then the person it rings once the bot has said who it
# is (`screening`).
SCREENING_PROMPT = (
    "Hi, the person you're calling is using a screening service. "
    "Please say your name and why you're calling."
)
SCREENED_PERSON = "Hello? This is Alex."
# What each answering callee says after the bot's opening, one line per bot turn; the last
# is followed by waiting for the bot to hang up.
CONVERSATIONS: dict[str, tuple[str, ...]] = {
    "interested": ("yes I would like that", GOODBYE),
    "not-interested": ("no I don't want it", GOODBYE),
    "callback": ("call me back tomorrow", GOODBYE),
    "opt-out": ("please stop calling me remove me from your list",),
}
# A business number answered by a phone menu (IVR), for dial-outs with an `ivr_goal`:
# "menu" leads to a person in billing (2, then 3); "menu-say" asks for its choice in words
# (say "billing"), then rings the same person; "menu-no-match" offers nothing that matches a
# billing goal, and hangs up after its third reading, as real menus do.
MENUS = ("menu", "menu-say", "menu-no-match")
MENU_GREETING = "Thank you for calling Acme Outdoor."
TRANSFERRING = "Please hold while I transfer you."
BILLING_PERSON = "Billing, this is Sam speaking."
HOLD_S = 3.0  # between "please hold" and the person: longer than a menu's 2 s turn silence
# The person a warm transfer rings: hears the bot's briefing, then presses 1 to take the
# call (the server moves them into the conference: the stream ends) or 2 to decline.
# "no-answer" plays the one who lets it ring.
TRANSFER_KEYS = {"transfer-accept": "1", "transfer-decline": "2"}
KINDS = (
    *CONVERSATIONS,
    "voicemail",
    "screening",
    "silent",
    *MENUS,
    *TRANSFER_KEYS,
    *UNANSWERED,
)
# The default rule: a number's last digit picks its behaviour.
LAST_DIGIT_RULE: dict[str, str] = {
    "0": "interested",
    "1": "interested",
    "2": "not-interested",
    "3": "callback",
    "4": "busy",
    "5": "no-answer",
    "6": "voicemail",
    "7": "opt-out",
    "8": "failed",
    "9": "interested",
}
# Twilio's AMD decides "human" after a short greeting followed by silence
# (https://www.twilio.com/docs/voice/answering-machine-detection: MachineDetectionSilenceTimeout
# and the speech thresholds); the stream connects a little after the answer, too.
HUMAN_SILENCE_S = 1.5
# Generous: a loaded machine (or a real LLM) may take a while to answer.
BOT_TURN_TIMEOUT_S = 30.0
HANGUP_TIMEOUT_S = 30.0
SILENT_CALL_S = 60.0


@lru_cache(maxsize=64)
def spoken(text: str) -> Speak:
    """`text` as caller speech from the offline TTS (cached: campaigns repeat lines); a
    tone of about the same length when the TTS is missing."""
    try:
        from phonebot.emulator.caller_voice import caller_pcm

        pcm = caller_pcm(text, TWILIO_SAMPLE_RATE)
    except Exception:  # no voice: still a callee, just not understood
        pcm = tone(440.0, min(4.0, 0.5 + 0.06 * len(text)), TWILIO_SAMPLE_RATE)
    return Speak(pcm, TWILIO_SAMPLE_RATE, text)


@dataclass(frozen=True)
class Callee:
    """One called person's behaviour: `kind` is one of `KINDS`."""

    kind: str
    greeting: str = VOICEMAIL_GREETING  # the voicemail's

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"callee must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def outcome(self) -> str:
        """What the number does when called: "answer", or busy / no-answer / failed."""
        return self.kind if self.kind in UNANSWERED else "answer"

    @property
    def answered_by(self) -> str:
        """Twilio's AMD verdict for this callee (when the call asked for detection)."""
        return MACHINE if self.kind == "voicemail" else HUMAN

    @property
    def amd_delay(self) -> float:
        """How long detection takes, from the answer: a voicemail's verdict comes after its
        greeting and beep (DetectMessageEnd); a person is recognised by the silence after
        a short "Hello?" (the bot, unmuted then, must not hear half of it and barge in)."""
        if self.kind == "voicemail":
            return spoken(self.greeting).duration + BEEP_S + 0.3
        return spoken(HELLO).duration + HUMAN_SILENCE_S

    def script(self) -> list[Step]:
        """What the callee does once the media stream is up."""
        if self.kind == "voicemail":
            return [
                spoken(self.greeting),
                Pause(0.3),
                Speak.tone(BEEP_S, BEEP_HZ, amplitude=0.5),
                WaitForHangup(timeout=HANGUP_TIMEOUT_S),  # recording
            ]
        if self.kind == "screening":
            return [
                spoken(SCREENING_PROMPT),
                WaitForBot(timeout=BOT_TURN_TIMEOUT_S),
                Pause(1.0),
                spoken(SCREENED_PERSON),
                WaitForBot(timeout=BOT_TURN_TIMEOUT_S),
                spoken(GOODBYE),
                WaitForHangup(timeout=HANGUP_TIMEOUT_S),
            ]
        if self.kind == "silent":
            return [Pause(SILENT_CALL_S)]
        if self.kind in MENUS:
            return [menu_script(self.kind)]
        if self.kind in TRANSFER_KEYS:
            return transfer_script(TRANSFER_KEYS[self.kind])
        steps: list[Step] = [spoken(HELLO), WaitForBot(timeout=BOT_TURN_TIMEOUT_S)]
        lines = CONVERSATIONS[self.kind]
        for line in lines[:-1]:
            steps += [spoken(line), WaitForBot(timeout=BOT_TURN_TIMEOUT_S, require=False)]
        return [*steps, spoken(lines[-1]), WaitForHangup(timeout=HANGUP_TIMEOUT_S)]


def transfer_script(key: str) -> list[Step]:
    """The person a warm transfer rings: "Hello?", the bot's briefing, `key`, and then the
    end of the stream: the server moves the call into the conference (a REST redirect,
    which ends the wait as a hang-up) or hangs up."""
    return [
        spoken(HELLO),
        WaitForBot(timeout=BOT_TURN_TIMEOUT_S),
        Dtmf(key),
        WaitForHangup(timeout=HANGUP_TIMEOUT_S),
    ]


def menu_script(kind: str) -> Menu:
    """The phone menus a dial-out with a goal meets (`MENUS`): nested and pressed, or said."""
    person: list[Step] = [
        spoken(TRANSFERRING),
        Pause(HOLD_S),
        spoken(BILLING_PERSON),
        WaitForBot(timeout=BOT_TURN_TIMEOUT_S),
        spoken(GOODBYE),
        WaitForHangup(timeout=HANGUP_TIMEOUT_S),
    ]
    goodbye: list[Step] = [spoken("Goodbye."), Hangup()]
    if kind == "menu-say":
        return Menu(
            spoken(f"{MENU_GREETING} For sales, say sales. For billing, say billing."),
            {},
            spoken={"sales": goodbye, "billing": person},
            otherwise=goodbye,
        )
    if kind == "menu-no-match":
        return Menu(
            spoken(f"{MENU_GREETING} For store hours, press 1. For directions, press 2."),
            {"1": [spoken("We are open nine to five."), Hangup()], "2": goodbye},
            otherwise=goodbye,
        )
    billing = Menu(
        spoken("Billing. To pay a bill, press 1. To speak with someone in billing, press 3."),
        {"1": [spoken("Please enter your account number."), Pause(5.0), *goodbye], "3": person},
        otherwise=goodbye,
    )
    return Menu(
        spoken(f"{MENU_GREETING} For sales, press 1. For billing, press 2."),
        {"1": goodbye, "2": [billing]},
        otherwise=goodbye,
    )


def by_last_digit(number: str) -> Callee:
    """The default rule (`LAST_DIGIT_RULE`): +1555…7 asks to be removed, and so on."""
    digits = [ch for ch in number if ch.isdigit()]
    return Callee(LAST_DIGIT_RULE[digits[-1]] if digits else "interested")


class CalleeBook:
    """Who answers which number: `numbers` first, then `rule` (None: numbers not listed
    are left to the emulator's defaults)."""

    def __init__(
        self,
        numbers: Mapping[str, Callee | str] | None = None,
        rule: Callable[[str], Callee] | None = by_last_digit,
    ) -> None:
        self.numbers = {
            number: c if isinstance(c, Callee) else Callee(c)
            for number, c in (numbers or {}).items()
        }
        self.rule = rule

    @classmethod
    def parse(cls, default: str, overrides: list[str] | None = None) -> CalleeBook:
        """From the command line: `default` is "rules" (the last-digit rule) or one kind
        for every number; `overrides` are "NUMBER=KIND"."""
        rule = by_last_digit if default == "rules" else _everyone(Callee(default))
        numbers = {}
        for item in overrides or []:
            number, sep, kind = item.partition("=")
            if not sep or not number.strip():
                raise ValueError(f"--callee must be NUMBER=KIND, not {item!r}")
            numbers[number.strip()] = Callee(kind.strip())
        return cls(numbers, rule)

    def callee(self, number: str) -> Callee | None:
        if number in self.numbers:
            return self.numbers[number]
        return self.rule(number) if self.rule else None

    def describe(self) -> str:
        """One line per rule and number, for the emulator's start-up banner."""
        lines = [f"  {number}: {callee.kind}" for number, callee in self.numbers.items()]
        if self.rule is by_last_digit:
            lines += [f"  numbers ending in {d}: {kind}" for d, kind in LAST_DIGIT_RULE.items()]
        elif self.rule is not None:
            lines.append(f"  every other number: {self.rule('+0').kind}")
        return "\n".join(lines)


def _everyone(callee: Callee) -> Callable[[str], Callee]:
    return lambda _number: callee
