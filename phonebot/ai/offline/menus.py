"""The offline responder in a phone menu: Pipecat's `IVRNavigator` prompts, answered by keywords.

On a dial-out with a goal, the navigator (phonebot.call.ivr) replaces the context with one of
two prompts of its own and reads the reply's tags. An LLM follows the prompts; offline, the
responder recognises them (`menu_mode`) and answers with the same tags:

- the classifier prompt: `<mode>ivr</mode>` when the callee's words sound like a menu
  ("thank you for calling", "press 1", "your call is important"), else
  `<mode>conversation</mode>`;
- the navigation prompt, whose goal follows `YOUR NAVIGATION GOAL:`: the key of the option
  that shares the most words with the goal ("For billing, press 2" for "Reach a person in
  billing": `<dtmf>2</dtmf>`), the words of a "say …" choice, `<ivr>completed</ivr>` when
  the menu says it is putting us through (or a person speaks), `<ivr>stuck</ivr>` after the
  same options three times (or three menus with nothing near the goal), and
  `<ivr>wait</ivr>` when nothing fits yet.

Simple menus only, and said so in docs/dialout.md: the words must match (with a shared stem:
"bill" ~ "billing"; "someone" ~ "person"), numbers spoken as digits or words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipecat.extensions.ivr.ivr_navigator import IVRNavigator

from phonebot.agents.analysis import message_text

GOAL_MARKER = "YOUR NAVIGATION GOAL:"
WAIT = "<ivr>wait</ivr>"  # the navigator waiting for more of the menu: not an action
ONLY_WAITS = re.compile(rf"(?:\s*{re.escape(WAIT)})*\s*")
CLASSIFY, NAVIGATE = "classify", "navigate"
MENU_CUES = (
    "press",
    "thank you for calling",
    "welcome to",
    "your call is important",
    "para español",
    "main menu",
    "please hold",
    "menu options",
    "dial the extension",
)
TRANSFER_CUES = (
    "transfer",
    "connecting you",
    "connect you",
    "please hold",
    "one moment",
    "hold while",
)
PERSON_CUES = ("this is", "speaking", "how can i help", "how may i help", "can i help you")
SAME_MENU_LIMIT = 3  # Pipecat's navigation prompt: stuck after the same options 3+ times
KEY_WORDS = {
    "zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "star": "*", "pound": "#",
    "hash": "#",
}  # fmt: skip
KEY = r"([0-9*#]|zero|one|two|three|four|five|six|seven|eight|nine|star|pound|hash)"
# "For billing, press 2" / "To speak with someone, press 3" / "Press 2 for billing"
OPTION_BEFORE = re.compile(rf"\b(?:for|to|if)\s+([^.;:!?]+?),?\s+press\s+{KEY}\b")
OPTION_AFTER = re.compile(rf"\bpress\s+{KEY}\s+(?:for|to|if)\s+([^.;:!?,]+)")
SAY_OPTION = re.compile(r"\bsay\s+([a-z][a-z ]*?)(?=\s*(?:,|\.|\bor\b|$))")
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "to",
        "for",
        "of",
        "in",
        "on",
        "with",
        "and",
        "or",
        "your",
        "you",
        "my",
        "me",
        "i",
        "we",
        "our",
        "is",
        "are",
        "be",
        "please",
        "if",
        "would",
        "like",
        "want",
        "need",
        "speak",
        "talk",
        "reach",
        "get",
        "about",
        "this",
        "that",
        "it",
        "press",
        "say",
    ]
)
PERSON_WORDS = frozenset(
    [
        "person",
        "someone",
        "somebody",
        "agent",
        "representative",
        "operator",
        "human",
        "staff",
        "member",
        "people",
    ]
)


@dataclass(frozen=True)
class Option:
    """One choice a menu offers: the key to press (or None for a spoken choice) and its
    words."""

    key: str | None
    words: str


NAVIGATION_TAGS = re.compile(r"(?:\s*<(dtmf|ivr|mode)>[^<]*</\1>)+\s*")


def only_navigation_tags(text: str) -> bool:
    """Whether an assistant message is only the navigator's tags (`<dtmf>2</dtmf>`), which
    the context keeps but nobody heard as speech."""
    return bool(text) and NAVIGATION_TAGS.fullmatch(text) is not None


def menu_mode(messages: Sequence) -> str | None:
    """CLASSIFY or NAVIGATE when the context is one of the navigator's prompts, else None."""
    if not messages or not isinstance(messages[0], dict):
        return None
    first = messages[0].get("content")
    if not isinstance(first, str):
        return None
    if first == IVRNavigator.CLASSIFIER_PROMPT:
        return CLASSIFY
    if GOAL_MARKER in first:
        return NAVIGATE
    return None


def navigation_goal(messages: Sequence) -> str:
    """The goal in the navigation prompt (the line after GOAL_MARKER)."""
    prompt = str(messages[0].get("content", ""))
    after = prompt.split(GOAL_MARKER, 1)[1].strip()
    return after.split("\n", 1)[0].strip()


def classify(heard: str) -> str:
    """The classifier's answer to the callee's first words."""
    text = _plain(heard)
    return (
        "<mode>ivr</mode>" if any(cue in text for cue in MENU_CUES) else "<mode>conversation</mode>"
    )


def navigate(goal: str, heard: Sequence[str], unanswered: int = 1) -> str:
    """The navigator's answer to the menu's latest words, given all it said (`heard`).

    The menu is read over the last `unanswered` turns, those the navigator has not acted
    on yet (it waited; 0: nothing new, so it waits): the recogniser may cut an option in
    two when the callee's turn ends between its segments ("… for sales press 1 for
    billing" | "press 2"), and an LLM reads the two together in its context, so the
    offline navigator does too (`menu_reading`)."""
    if unanswered <= 0 or not heard:
        return WAIT
    options, latest, latest_options = menu_reading(heard[-unanswered:])
    if not latest_options and any(cue in latest for cue in TRANSFER_CUES + PERSON_CUES):
        return "<ivr>completed</ivr>"
    if not options:
        return WAIT
    offers = [o for o in (menu_options(_plain(text)) for text in heard) if o]
    if latest_options and sum(offer == latest_options for offer in offers) >= SAME_MENU_LIMIT:
        return "<ivr>stuck</ivr>"
    best = best_option(goal, options)
    if best is None:
        # The same menu may come back transcribed a little differently: three readings of
        # options with nothing near the goal are as stuck as three identical ones.
        recent = offers[-SAME_MENU_LIMIT:]  # the latest menus: earlier progress counts
        missed = len(recent) == SAME_MENU_LIMIT and all(
            best_option(goal, o) is None for o in recent
        )
        return "<ivr>stuck</ivr>" if missed else WAIT
    if best.key is None:
        return f"{best.words.capitalize()}."
    return f"<dtmf>{best.key}</dtmf>"


def menu_reading(turns: Sequence[str]) -> tuple[list[Option], str, list[Option]]:
    """The options of one menu said over `turns`, its last turn as read, and that turn's
    own options.

    Each turn is read on its own (its own way of saying options wins, `menu_options`),
    after the words its predecessor left unfinished ("… for billing"): an option cut
    where the recogniser's segments ended is read whole, and nothing else carries over.
    """
    options: list[Option] = []
    unfinished = read = ""
    found: list[Option] = []
    for turn in turns:
        read = f"{unfinished} {_plain(turn)}".strip()
        spans = _option_spans(read)
        found = [option for _, _, option in spans]
        options += found
        unfinished = _unfinished(read, spans)
    return list(dict.fromkeys(options)), read, found  # a repeated option once, in order


def _unfinished(text: str, spans: Sequence[tuple[int, int, Option]]) -> str:
    """The words after a turn's last option (`spans`: its options, `_option_spans`) and
    last sentence end: the start of an option the turn was cut in, or ""."""
    tail = text[spans[-1][1] :] if spans else text
    return re.split(r"[.;:!?]", tail)[-1].strip()


def turns_since_action(messages: Sequence) -> int:
    """How many of the callee's latest turns (user messages) came after the navigator's
    last action: a key, a spoken choice or "completed". Its `<ivr>wait</ivr>`s are none,
    nor is an assistant message without text (a function call)."""
    turns = 0
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            turns += 1
        elif role == "assistant" and not ONLY_WAITS.fullmatch(message_text(message.get("content"))):
            break
    return turns


def menu_options(text: str) -> list[Option]:
    """The choices in a menu's words, in the order said. A menu says them one way ("for
    billing, press 2" or "press 2 for billing"): the way its first choice is said wins, so
    "press 2 for billing, press 1 for sales" is not also read as "billing, press 1"."""
    return [option for _, _, option in _option_spans(text)]


def _option_spans(text: str) -> list[tuple[int, int, Option]]:
    """`menu_options` with where each choice starts and ends in `text`."""
    before = [
        (m.start(), m.end(), Option(_key(m.group(2)), m.group(1).strip()))
        for m in OPTION_BEFORE.finditer(text)
    ]
    after = [
        (m.start(), m.end(), Option(_key(m.group(1)), m.group(2).strip()))
        for m in OPTION_AFTER.finditer(text)
    ]
    found = before if before and (not after or before[0][0] < after[0][0]) else after
    if not found:
        found = [
            (m.start(), m.end(), Option(None, m.group(1).strip()))
            for m in SAY_OPTION.finditer(text)
        ]
    return found


def best_option(goal: str, options: Sequence[Option]) -> Option | None:
    """The option sharing the most with the goal; None when none shares anything, or two
    share the most (the menu may say more: wait)."""
    scored = sorted(((_overlap(goal, o.words), o) for o in options), key=lambda s: -s[0])
    if not scored or scored[0][0] == 0:
        return None
    if len(scored) > 1 and scored[1][0] == scored[0][0]:
        return None
    return scored[0][1]


def _overlap(goal: str, words: str) -> int:
    """2 per goal word the option says, 1 per shared stem (4 letters: "bill" ~ "billing")."""
    theirs = _content_words(words)
    score = 0
    for word in _content_words(goal):
        if word in theirs:
            score += 2
        elif len(word) >= 4 and any(len(w) >= 4 and w[:4] == word[:4] for w in theirs):
            score += 1
    return score


def _content_words(text: str) -> set[str]:
    words = set(_plain(text).split()) - STOP_WORDS
    return {"<person>" if word in PERSON_WORDS else word for word in words}


def _key(said: str) -> str:
    return KEY_WORDS.get(said, said)


def _plain(text: str) -> str:
    """Lower case, with the recogniser's punctuation kept only where menus need it."""
    lowered = text.lower().replace("’", "'")
    return " ".join(re.sub(r"[^a-z0-9*#'.,;:!? ]", " ", lowered).split())
