"""The offline responder: sits where the LLM sits when no LLM is configured.

It reads the same `LLMContext` the LLM would, so the pipeline is identical in both modes.
It opens with the agent's greeting, answers from the agent's keyword table, then from the
agent's knowledge (a sentence or two of the passage that holds most of what was asked:
`KnowledgeBase.best_match`), and otherwise says plainly that it is running offline and
takes a message. It never pretends to be an AI model. After a goodbye it ends the call
the way the LLM does: by calling the `end_call` function (see `phonebot.call.control`).
The same function-call path records a campaign's outcomes (`record_outcome`, from the
agent's keyword rules) and honours a callee who asks not to be called again (`opt_out`),
so a campaign works with no keys.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from pipecat.frames.frames import (
    Frame,
    FunctionCallFromLLM,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings

from phonebot.agents.agent import Agent, keyword_answer, outcome_rule, said_any
from phonebot.agents.analysis import message_text
from phonebot.ai.offline.menus import (
    CLASSIFY,
    classify,
    menu_mode,
    navigate,
    navigation_goal,
    only_navigation_tags,
    turns_since_action,
)
from phonebot.twilio.keypad import pressed_digits, spoken_digits

OFFLINE_FALLBACK = (
    "I'm running in offline mode, so I can't answer that myself. "
    "I can take a message for the team. What would you like me to pass on?"
)
NO_TRANSFER = "I'm sorry, I can't connect you to a person right now, but I can take a message."
GOODBYE_WORDS = ("goodbye", "bye", "that's all", "hang up")
# A callee asking not to be called again (checked before anything else they said).
OPT_OUT_WORDS = (
    "stop calling",
    "remove me",
    "take me off",
    "do not call",
    "don't call me",
    "unsubscribe",
)
NOTED = "Thank you, I've noted that."
# A phone's call-screening assistant asking who is calling and why (an automated line's
# words: a person's "who's calling?" gets the opening).
SCREENING_WORDS = (
    "screening service",
    "screening calls",
    "say your name",
    "state your name",
    "record your name",
    "why you're calling",
    "reason for your call",
    "reason for calling",
)


def _said_goodbye(utterance: str) -> bool:
    lowered = f" {utterance.lower()} "
    return any(f" {word}" in lowered for word in GOODBYE_WORDS)


class OfflineResponder(LLMService):
    """A scripted, keyword-driven stand-in for the LLM."""

    def __init__(self, *, agent: Agent, **kwargs):
        # Pipecat checks that every LLM setting is initialised; none applies to a script.
        unused = {f.name: None for f in fields(LLMSettings) if f.name != "extra"}
        unused["model"] = "offline-responder"
        unused["use_provider_thinking_default"] = False
        super().__init__(settings=LLMSettings(**unused), **kwargs)
        self._agent = agent

    def reply_to(self, context: LLMContext) -> Reply:
        """What to say to the current context, or which function to call instead."""
        messages = context.get_messages()
        user_turns = [
            message_text(m.get("content")) for m in messages if _message_role(m) == "user"
        ]
        last = user_turns[-1] if user_turns else ""
        if (mode := menu_mode(messages)) is not None:  # a phone menu (phonebot.call.ivr)
            if mode == CLASSIFY:
                return Reply(classify(last))
            goal, unanswered = navigation_goal(messages), turns_since_action(messages)
            return Reply(navigate(goal, user_turns, unanswered))
        if messages and _message_role(messages[-1]) == "tool":
            return self._after_function(_function_of(messages, messages[-1]), last)
        if _wants_opt_out(last):  # even before our opening: "who's this? stop calling me"
            return Reply("", "opt_out", {})
        if (opening := self._opening(messages, user_turns)) is not None:
            return opening
        if (rule := outcome_rule(self._agent, last)) is not None:
            # Recorded first; the function's result brings us back to answer (below).
            return Reply("", "record_outcome", dict(rule.fields))
        if _said_goodbye(last):
            return Reply("", "end_call", {"goodbye": self._agent.goodbye})
        digits = pressed_digits(last)
        if digits is not None and digits.rstrip("#") in self._agent.menu:
            last = self._agent.menu[digits.rstrip("#")]  # answered like the choice, said
        elif digits is not None:
            action = self._agent.keypad.get(digits.rstrip("#"))
            if action:
                return Reply("", f"{action}_call", {})
            return Reply(f"You pressed {spoken_digits(digits)}.")
        if keyword_answer(self._agent, last) is None and _wants_a_person(last):
            return Reply("", "transfer_call", {})
        return Reply(keyword_answer(self._agent, last) or self._known_answer(last))

    def _opening(self, messages: list, user_turns: list[str]) -> Reply | None:
        """Who we are and why, to a call-screening assistant (then wait for the person);
        the agent's opening when the callee has heard nothing of ours yet, or only what
        we told the screener; else None."""
        heard = [message_text(m.get("content")) for m in messages if _spoke(m)]
        if not heard and user_turns and _screening(user_turns[-1]):  # the first words only
            return Reply(self._agent.greeting)
        screened = any(_screening(turn) for turn in user_turns[:-1])
        greeting = _words(self._agent.greeting)
        # (The context may keep less of it: words timed after a held-back reply's end.)
        told_screener = all(greeting[: len(_words(line))] == _words(line) for line in heard)
        if not heard or (screened and told_screener):
            return Reply(f"{self._agent.greeting} {self._agent.question}")
        return None

    def _known_answer(self, utterance: str) -> str:
        """A sentence or two of the agent's best passage for what was said, when one holds
        most of it; otherwise the plain offline line (better than a confident non-answer)."""
        knowledge = self._agent.knowledge
        passage = knowledge.best_match(utterance) if knowledge is not None else None
        return passage.phone_answer() if passage is not None else OFFLINE_FALLBACK

    def _after_function(self, name: str | None, last: str) -> Reply:
        """A function's result asks the LLM to go on: after `record_outcome`, answer what
        the callee said; after a refused transfer (nobody to transfer to), say so instead
        of retrying."""
        if name == "record_outcome":
            if _said_goodbye(last):
                return Reply("", "end_call", {"goodbye": self._agent.goodbye})
            rule = outcome_rule(self._agent, last)
            answer = rule.answer if rule else None
            return Reply(answer or keyword_answer(self._agent, last) or NOTED)
        return Reply(NO_TRANSFER)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        reply = self.reply_to(frame.context)
        if reply.function:
            # The path an LLM takes: a function call, whose handler does the talking.
            await self.run_function_calls([reply.as_function_call(frame.context)])
            return
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(LLMTextFrame(reply.text))
        await self.push_frame(LLMFullResponseEndFrame())


@dataclass(frozen=True)
class Reply:
    """Text to speak, or a function (`end_call`, `transfer_call`, `record_outcome`,
    `opt_out`) to call instead."""

    text: str
    function: str | None = None
    arguments: dict = field(default_factory=dict)

    def as_function_call(self, context: LLMContext) -> FunctionCallFromLLM:
        return FunctionCallFromLLM(
            function_name=self.function or "",
            tool_call_id=f"offline-{uuid.uuid4().hex[:12]}",
            arguments=self.arguments,
            context=context,
        )


def _words(text: str) -> list[str]:
    """The words of a line, as the context keeps what was spoken (its spacing and
    punctuation may differ from the text given to the TTS)."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def _screening(utterance: str) -> bool:
    return said_any(SCREENING_WORDS, utterance)


def _wants_a_person(utterance: str) -> bool:
    return said_any(("person", "human", "agent", "representative", "operator"), utterance)


def _wants_opt_out(utterance: str) -> bool:
    text = f" {' '.join(utterance.lower().replace(',', ' ').split())} "
    return any(f" {phrase}" in text for phrase in OPT_OUT_WORDS)


def _function_of(messages: list, tool_message) -> str | None:
    """The name of the function whose result `tool_message` is (from the assistant's
    `tool_calls` with the same id)."""
    call_id = tool_message.get("tool_call_id") if isinstance(tool_message, dict) else None
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and call.get("id") == call_id:
                return (call.get("function") or {}).get("name")
    return None


def _spoke(message) -> bool:
    """An assistant message the callee heard (not a menu's key press or status tag)."""
    if _message_role(message) != "assistant":
        return False
    heard = not only_navigation_tags(message_text(message.get("content")))
    return bool(message.get("tool_calls")) or heard


def _message_role(message) -> str:
    return message.get("role", "") if isinstance(message, dict) else ""


def offline_bot_phrases(agents: Iterable[Agent]) -> list[str]:
    """Every line the offline bot can say with these agents, for transcribing it reliably
    (emulator, tests)."""
    lines = [OFFLINE_FALLBACK, NOTED, "You pressed 1 2 3 4 5 6 7 8 9 0 star pound."]
    for agent in agents:
        lines += agent.spoken_lines()
    lines.append("I see you're calling from the number ending in")
    return lines
