"""`machine_detection: "bot"`: the bot tells a person, a voicemail greeting and a screener apart.

No AMD request goes to Twilio; Pipecat's `VoicemailDetector` listens (keywords offline,
phonebot.ai.offline.greetings) while its gate holds the bot's words back. End to end, the
real server dials the emulator's scripted callees: a voicemail greeting with a beep (the
bot never talks over it, leaves the agent's message once after the beep, and hangs up), and
a call-screening assistant followed by the person (the bot says who it is and why, waits,
then talks as the agent).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pipecat.extensions.voicemail.voicemail_detector import VOICEMAIL_QUESTION
from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.ai.offline.greetings import KeywordGreetingClassifier
from phonebot.ai.offline.responder import OfflineResponder
from phonebot.call.control import EndReason
from phonebot.call.voicemail import BOT_HUMAN_VERDICT, BOT_MACHINE_VERDICT, GreetingCheck
from phonebot.emulator import TwilioRestEmulator
from phonebot.emulator.callees import (
    BEEP_S,
    SCREENED_PERSON,
    SCREENING_PROMPT,
    VOICEMAIL_GREETING,
    spoken,
)
from phonebot.pipecat_compat import assume_conversation
from phonebot.twilio.amd import AMD_BY_BOT, AMD_PARAMETER
from phonebot.twilio.dialout import DialoutRequest
from tests.conftest import DIALOUT_KEY, shipped_agent
from tests.live_server import LiveServer, closed_record, records_server, scripted_callees
from tests.test_voicemail import created_form, twilio_rest  # noqa: F401  (fixture)

ADMIN_KEY = "test-admin-key-voicemail-bot"
VOICEMAIL = "+15551230201"
SCREENED = "+15551230202"
SALE = shipped_agent("summer_sale")


# --- deciding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heard", "expected"),
    [
        (VOICEMAIL_GREETING, "voicemail"),
        ("The number you have dialed is not in service.", "voicemail"),
        ("Sorry, I can't take your call right now.", "voicemail"),
        ("Hello?", "conversation"),
        ("Yeah, this is Alex.", "conversation"),
        (SCREENING_PROMPT, "conversation"),  # it waits for an answer: talk to it
    ],
)
async def test_offline_the_greeting_is_told_from_a_person_by_its_words(heard, expected):
    answer = await KeywordGreetingClassifier().choice(heard, {"voicemail": VOICEMAIL_QUESTION})
    assert answer["voicemail"].choice == expected


def test_a_screener_hears_who_is_calling_and_why_and_the_person_then_hears_the_opening():
    responder = OfflineResponder(agent=SALE)
    system = {"role": "system", "content": "You are the agent."}
    to_screener = responder.reply_to(
        LLMContext(messages=[system, {"role": "user", "content": SCREENING_PROMPT}])
    )
    assert to_screener.text == SALE.greeting
    to_person = responder.reply_to(
        LLMContext(
            messages=[
                system,
                {"role": "user", "content": SCREENING_PROMPT},
                {"role": "assistant", "content": SALE.greeting},
                {"role": "user", "content": SCREENED_PERSON},
            ]
        )
    )
    assert to_person.text == f"{SALE.greeting} {SALE.question}"
    # The context may keep only the start of what the screener heard (words timed after a
    # held-back reply's end): still not for the person.
    cut = SALE.greeting.rsplit(" ", 1)[0]
    messages = [
        system,
        {"role": "user", "content": SCREENING_PROMPT},
        {"role": "assistant", "content": cut},
        {"role": "user", "content": "Hello?"},
    ]
    assert responder.reply_to(LLMContext(messages=messages)).text.endswith(SALE.question)


def test_only_a_dial_out_that_asks_gets_the_check():
    asked = {"call_type": "outbound", AMD_PARAMETER: AMD_BY_BOT}
    assert GreetingCheck("CA1", asked, KeywordGreetingClassifier, 3.0).detector is not None
    for parameters in ({"call_type": "outbound"}, {"call_type": "inbound", AMD_PARAMETER: "bot"}):
        check = GreetingCheck("CA1", parameters, KeywordGreetingClassifier, 3.0)
        assert check.detector is None and check.gate is None


async def test_bot_detection_sends_no_amd_request_to_twilio(twilio_rest):  # noqa: F811
    request = DialoutRequest(to="+15551234567", machine_detection="bot")
    form = await created_form(twilio_rest, request)
    assert not [name for name in form if "Amd" in name or "MachineDetection" in name]
    assert parse_qs(urlsplit(form["Url"]).query) == {AMD_PARAMETER: [AMD_BY_BOT]}


async def test_machine_detection_takes_true_twilio_or_bot(twilio_rest):  # noqa: F811
    for twilios in (True, "twilio"):
        request = DialoutRequest(to="+15551234567", machine_detection=twilios)
        form = await created_form(twilio_rest, request)
        assert form["MachineDetection"] == "DetectMessageEnd"
    assert DialoutRequest(to="+15551234567", machine_detection="bot").machine_detection == "bot"
    with pytest.raises(ValueError, match="machine_detection"):
        DialoutRequest(to="+15551234567", machine_detection="maybe")


async def test_a_callee_who_says_nothing_is_taken_for_a_person_waiting_for_us():
    asked = {"call_type": "outbound", AMD_PARAMETER: AMD_BY_BOT}
    check = GreetingCheck("CA1", asked, KeywordGreetingClassifier, silent_after_s=0.05)
    decided: list[str] = []

    async def decide(label: str) -> None:
        decided.append(label)

    check.detector._decide = decide  # type: ignore[union-attr,method-assign]
    check.start()
    await asyncio.sleep(0.2)
    assert decided == ["conversation"]  # the gate opens: the opening plays
    check.detector._transcript.append("Hi, you've reached")  # type: ignore[union-attr]
    assert not await assume_conversation(check.detector)  # type: ignore[arg-type]
    assert decided == ["conversation"]  # something was heard: the classifier decides
    talking = GreetingCheck("CA2", asked, KeywordGreetingClassifier, silent_after_s=0.05)
    talking.detector._decide = decide  # type: ignore[union-attr,method-assign]
    talking.start()
    talking.callee_spoke()  # a greeting under way, not transcribed yet
    await asyncio.sleep(0.2)
    assert decided == ["conversation"]  # not assumed a second time


# --- end to end ----------------------------------------------------------------------------


rest_port, server = records_server("voicemail-bot", ADMIN_API_KEY=ADMIN_KEY)


twilio = scripted_callees({VOICEMAIL: "voicemail", SCREENED: "screening"})


def utterances_as_sent(result) -> list[tuple[float, float]]:
    """The bot's utterances as the caller heard them (start, end), joined where the silence
    between two held late audio (a `bot_underrun_spans` span: the caller's playout ran dry
    waiting for it). The voicemail message's pause after "Hi," is ~0.3 s, under the
    caller's 0.4 s split; a chunk 0.1 s late on a loaded machine stretched it past that
    and split the one message in two."""
    joined: list[tuple[float, float]] = []
    for utterance in result.bot_utterances:
        if joined and any(
            start < utterance.start and end > joined[-1][1]
            for start, end in result.bot_underrun_spans
        ):
            joined[-1] = (joined[-1][0], utterance.end)
        else:
            joined.append((utterance.start, utterance.end))
    return joined


def test_a_pause_stretched_by_late_audio_is_not_a_second_utterance():
    def heard(spans, late):
        utterances = [SimpleNamespace(start=start, end=end) for start, end in spans]
        return SimpleNamespace(bot_utterances=utterances, bot_underrun_spans=late)

    split = [(7.92, 8.2), (8.6, 17.1)]
    assert utterances_as_sent(heard(split, [(8.3, 8.45)])) == [(7.92, 17.1)]
    assert utterances_as_sent(heard(split, [])) == split  # a real second utterance
    assert utterances_as_sent(heard(split, [(5.0, 6.0), (17.5, 18.0)])) == split


async def dial_with_bot_detection(server: LiveServer, twilio: TwilioRestEmulator, to: str):
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(
            f"{server.base_url}/dialout",
            json={"to": to, "parameters": {"campaign_id": "summer_sale"},
                  "machine_detection": "bot"},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )  # fmt: skip
    assert response.status_code == 201, response.text
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=120)
    assert call.result is not None, call.error
    assert not [r for r in twilio.requests if "MachineDetection" in r.form]  # no AMD asked
    call_sid = response.json()["call_sid"]
    return call_sid, call.result, await closed_record(server, call_sid, ADMIN_KEY)


async def test_on_voicemail_the_bot_waits_out_the_greeting_and_beep_leaves_its_message_and_hangs_up(
    server: LiveServer, twilio: TwilioRestEmulator
):
    call_sid, result, record = await dial_with_bot_detection(server, twilio, VOICEMAIL)

    greeting_ends = spoken(VOICEMAIL_GREETING).duration + 0.3 + BEEP_S
    # Not a sample of bot audio (not even one cut short by a `clear`) before the message,
    # which waits for MESSAGE_AFTER_SILENCE_S (2 s) after the greeting's last word.
    assert result.first_bot_audio is not None, "no message was left"
    assert result.first_bot_audio > greeting_ends + 1.0, (result.first_bot_audio, greeting_ends)
    assert len(utterances_as_sent(result)) == 1, (
        [(round(u.start, 2), round(u.end, 2)) for u in result.bot_utterances],
        result.bot_underrun_spans,
    )
    assert server.bot_lines(call_sid)[-1] == SALE.voicemail
    assert sum(SALE.voicemail == line for line in server.bot_lines(call_sid)) == 1
    assert result.ended_by in ("server", "rest")
    assert record["end_reason"] == EndReason.VOICEMAIL
    assert record["amd_verdict"] == BOT_MACHINE_VERDICT
    assert server.error_lines() == []


async def test_a_screener_hears_the_bots_name_and_purpose_then_the_person_the_opening(
    server: LiveServer, twilio: TwilioRestEmulator
):
    call_sid, result, record = await dial_with_bot_detection(server, twilio, SCREENED)

    said = server.bot_lines(call_sid)
    assert said[0] == SALE.greeting, said  # to the screener: who and why, no question
    assert f"{SALE.greeting} {SALE.question}" in said, said  # to the person
    assert record["amd_verdict"] == BOT_HUMAN_VERDICT
    assert record["end_reason"] == EndReason.BOT_ENDED  # after the person's goodbye
    assert result.error is None, result.error
