"""The offline responder: the LLM's stand-in reads the same context the LLM would."""

from __future__ import annotations

from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.keypad import KEYPAD_PREFIX
from phonebot.offline.responder import OFFLINE_FALLBACK, OfflineResponder
from phonebot.personas import CAMPAIGNS, DIALIN_PERSONAS


def reply(persona, *messages: tuple[str, str]) -> tuple[str, bool]:
    context = LLMContext(messages=[{"role": "system", "content": "prompt"}])
    for role, content in messages:
        context.add_message({"role": role, "content": content})
    return OfflineResponder(persona=persona).reply_to(context)


def test_first_reply_is_the_persona_greeting():
    campaign = CAMPAIGNS["summer_sale"]
    text, end = reply(campaign, ("user", "Hello?"))
    assert text == f"{campaign.greeting} {campaign.question}"
    assert not end


def test_keyword_answers_come_from_the_persona_table():
    support = DIALIN_PERSONAS["support"]
    text, _ = reply(support, ("assistant", "hi"), ("user", "my package has not arrived"))
    assert text == support.answers[0].answer


def test_anything_else_is_an_honest_offline_message():
    text, end = reply(DIALIN_PERSONAS["general"], ("assistant", "hi"), ("user", "who won"))
    assert text == OFFLINE_FALLBACK
    assert "offline" in text and " AI" not in text and "model" not in text
    assert not end


def test_keypad_entries_are_read_back():
    text, _ = reply(
        DIALIN_PERSONAS["general"], ("assistant", "hi"), ("user", f"{KEYPAD_PREFIX}12#")
    )
    assert text == "You pressed 1 2 pound."


def test_goodbye_ends_the_call_after_the_persona_goodbye():
    campaign = CAMPAIGNS["summer_sale"]
    text, end = reply(campaign, ("assistant", "hi"), ("user", "okay goodbye"))
    assert text == campaign.goodbye
    assert end
