"""Who answered a dial-out, offline: a voicemail greeting or a person, from keywords.

Pipecat's `VoicemailDetector` asks any classifier one question (`VOICEMAIL_QUESTION`:
"conversation" or "voicemail") about the transcript so far; with an LLM it is Pipecat's
`LLMClassifier`. With no LLM this one answers from the words a voicemail greeting or a
carrier message says ("you've reached", "leave a message", "after the beep", "not
available"). A call-screening assistant ("please say your name and why you're calling")
expects a reply: it is a conversation, which the agent answers with who it is and why
(phonebot.ai.offline.responder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipecat.classifiers.base_classifier import (
    BaseClassifier,
    ChoiceQuestion,
    ChoiceResult,
    ClassifierImage,
    ClassifierQuestion,
    ClassifierResult,
)
from pipecat.metrics.metrics import LLMTokenUsage

from phonebot.agents.agent import said_any

VOICEMAIL_CUES = (
    "you've reached",
    "you have reached",
    "leave a message",
    "leave your message",
    "after the beep",
    "after the tone",
    "not available",
    "unavailable",
    "can't take your call",
    "cannot take your call",
    "can't come to the phone",
    "voicemail",
    "mailbox",
    "record your message",
    "not in service",
    "all circuits are busy",
)
CONVERSATION, VOICEMAIL = "conversation", "voicemail"


def sounds_like_voicemail(transcript: str) -> bool:
    return said_any(VOICEMAIL_CUES, transcript)


class KeywordGreetingClassifier(BaseClassifier):
    """Answers Pipecat's choice questions of conversation / voicemail from keywords."""

    async def _ask(
        self,
        state: str | dict[str, Any] | list[Any],
        questions: Mapping[str, ClassifierQuestion],
        images: Sequence[ClassifierImage] = (),
    ) -> tuple[dict[str, ClassifierResult], LLMTokenUsage | None]:
        machine = sounds_like_voicemail(str(state))
        results: dict[str, ClassifierResult] = {}
        for name, question in questions.items():
            if not isinstance(question, ChoiceQuestion) or set(question.options) != {
                CONVERSATION,
                VOICEMAIL,
            }:
                raise ValueError(f"{name}: only the voicemail question is answered offline")
            choice = VOICEMAIL if machine else CONVERSATION
            results[name] = ChoiceResult(
                choice=choice,
                probabilities={choice: 1.0, (CONVERSATION if machine else VOICEMAIL): 0.0},
                confidence=1.0,
            )
        return results, None
