"""The offline responder: the LLM's stand-in reads the same context the LLM would."""

from __future__ import annotations

from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.ai.offline.responder import NO_TRANSFER, OFFLINE_FALLBACK, OfflineResponder, Reply
from phonebot.twilio.keypad import KEYPAD_PREFIX
from tests.conftest import shipped_agent


def reply(persona, *messages: tuple[str, str]) -> Reply:
    context = LLMContext(messages=[{"role": "system", "content": "prompt"}])
    for role, content in messages:
        context.add_message({"role": role, "content": content})
    return OfflineResponder(agent=persona).reply_to(context)


def test_first_reply_is_the_persona_greeting():
    campaign = shipped_agent("summer_sale")
    answer = reply(campaign, ("user", "Hello?"))
    assert answer == Reply(f"{campaign.greeting} {campaign.question}")


def test_keyword_answers_come_from_the_persona_table():
    support = shipped_agent("support")
    answer = reply(support, ("assistant", "hi"), ("user", "my package has not arrived"))
    assert answer == Reply(support.answers[0].answer)


def test_anything_else_is_an_honest_offline_message():
    answer = reply(shipped_agent("general"), ("assistant", "hi"), ("user", "who won"))
    assert answer == Reply(OFFLINE_FALLBACK)
    assert "offline" in answer.text and " AI" not in answer.text and "model" not in answer.text


def test_keypad_entries_are_read_back():
    answer = reply(
        shipped_agent("general"), ("assistant", "hi"), ("user", f"{KEYPAD_PREFIX}12#")
    )
    assert answer == Reply("You pressed 1 2 pound.")


def test_goodbye_ends_the_call_after_the_persona_goodbye():
    campaign = shipped_agent("summer_sale")
    answer = reply(campaign, ("assistant", "hi"), ("user", "okay goodbye"))
    assert answer == Reply("", "end_call", {"goodbye": campaign.goodbye})


def test_asking_for_a_person_or_a_keypad_shortcut_calls_transfer():
    support = shipped_agent("support")
    assert support.keypad == {"0": "transfer"}
    by_voice = reply(support, ("assistant", "hi"), ("user", "can I speak to a person"))
    by_key = reply(support, ("assistant", "hi"), ("user", f"{KEYPAD_PREFIX}0"))
    assert by_voice == by_key == Reply("", "transfer_call", {})


def test_a_refused_transfer_is_answered_not_retried():
    context = LLMContext(messages=[{"role": "assistant", "content": "hi"}])
    context.add_message({"role": "user", "content": "a person please"})
    context.add_message({"role": "tool", "tool_call_id": "t1", "content": '{"error": "none"}'})
    answer = OfflineResponder(agent=shipped_agent("general")).reply_to(context)
    assert answer == Reply(NO_TRANSFER)
