"""Phone menus on dial-out (`ivr_goal`): keys pressed as tones, a person reached, or give up.

End to end, the real server dials out through the Twilio emulator, whose scripted callee is
a phone menu (phonebot.emulator.callees `menu`, `menu-no-match`); the bot runs the offline
engines, and its offline responder answers Pipecat's `IVRNavigator` prompts. The emulator
decodes the keys the bot presses from the tones in its audio, as the menu at the far end
would (phonebot.emulator.keytones): the test checks which keys, and when.
"""

from __future__ import annotations

import asyncio
import json
import wave
from importlib.resources import files
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from pipecat.extensions.ivr.ivr_navigator import IVRNavigator, IVRStatus
from pipecat.frames.frames import LLMMessagesUpdateFrame
from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.agents.agent import IVR_GOAL_PARAMETER, ivr_goal, opening_line
from phonebot.ai.offline.menus import (
    classify,
    menu_options,
    navigate,
    only_navigation_tags,
    turns_since_action,
)
from phonebot.ai.offline.responder import OfflineResponder
from phonebot.audio import FRAME_SAMPLES, TWILIO_SAMPLE_RATE, tone, ulaw_decode, ulaw_encode
from phonebot.call.control import EndReason
from phonebot.call.ivr import (
    FAILED,
    HOLDING,
    LISTENING,
    NAVIGATING,
    TALKING,
    MenuNavigation,
    words_after_transfer,
)
from phonebot.call.phone_call import PhoneCall
from phonebot.campaigns.models import CampaignIn
from phonebot.campaigns.store import outcome_of
from phonebot.emulator import MediaStreamCaller, Menu, Speak, TwilioRestEmulator, keytones
from phonebot.emulator.callees import BILLING_PERSON, spoken
from phonebot.emulator.keytones import MIN_RMS, KeyToneListener, keys_in
from phonebot.emulator.media_stream import spoken_choice
from phonebot.emulator.timeline import Track
from phonebot.records.schema import CallRecord
from phonebot.twilio.dialout import DialoutRequest
from tests.conftest import DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer, closed_record, records_server, scripted_callees

ADMIN_KEY = "test-admin-key-ivr"
MENU = "+15551230101"
NO_MATCH = "+15551230102"
SAY_MENU = "+15551230103"
GOAL = "Reach a person in billing"
SALE = shipped_agent("summer_sale")
KEYS = "0123456789*#"


# --- the emulator hears keys as a menu does ------------------------------------------------


def pipecat_key_tones(keys: str) -> np.ndarray:
    """Pipecat's own DTMF audio (what `OutputDTMFFrame` plays), one file per key, in a row."""
    names = {"*": "star", "#": "pound"}
    pieces = []
    for key in keys:
        path = files("pipecat.audio.dtmf").joinpath(f"dtmf-{names.get(key, key)}.wav")
        with wave.open(str(path)) as recording:
            assert recording.getframerate() == TWILIO_SAMPLE_RATE
            pieces.append(np.frombuffer(recording.readframes(recording.getnframes()), np.int16))
    return np.concatenate(pieces)


def test_every_key_pipecat_plays_is_heard_through_mu_law_once_and_in_order():
    audio = np.concatenate([np.zeros(37, np.int16), pipecat_key_tones(KEYS + "55")])
    heard = keys_in(ulaw_decode(ulaw_encode(audio)), TWILIO_SAMPLE_RATE, FRAME_SAMPLES)
    assert "".join(key for _, key in heard) == KEYS + "55"  # a repeated key is two presses
    starts = [t for t, _ in heard]
    assert starts == pytest.approx([0.5 * i for i in range(len(KEYS) + 2)], abs=0.03)


def test_speech_and_single_tones_are_not_keys():
    from phonebot.emulator.callees import spoken

    menu = spoken("For sales, press 1. For billing, press 2. One two three star pound.")
    speech = np.frombuffer(menu.pcm, np.int16)
    assert keys_in(speech, TWILIO_SAMPLE_RATE, FRAME_SAMPLES) == []
    for frequency in (440.0, 697.0, 1209.0, 1000.0):
        single = np.frombuffer(tone(frequency, 1.0, TWILIO_SAMPLE_RATE), np.int16)
        assert keys_in(single, TWILIO_SAMPLE_RATE, FRAME_SAMPLES) == [], frequency


def test_a_frame_the_caller_knows_is_quiet_is_no_key_without_decoding_it(monkeypatch):
    speech = np.frombuffer(spoken("Press one.").pcm, np.int16)
    quiet = np.zeros(TWILIO_SAMPLE_RATE // 2, np.int16)
    audio = np.concatenate([quiet, pipecat_key_tones("1#"), speech, pipecat_key_tones("5")])
    # As the emulated caller scans the bot's track: each frame's view and the RMS it has
    # for its own VAD (`Track.rms`), up to a frame past the written end, which ends
    # mid-frame: the same presses as decoding every frame.
    track = Track()
    track.write(0, audio[: len(audio) - FRAME_SAMPLES // 2])
    listener = KeyToneListener(TWILIO_SAMPLE_RATE)
    presses = []
    for start in range(0, track.length + FRAME_SAMPLES, FRAME_SAMPLES):
        end = start + FRAME_SAMPLES
        presses.append(listener.feed(track.view(start, end), start, track.rms(start, end)))
    heard = [press for press in presses if press is not None]
    played = track.view(0, track.length + FRAME_SAMPLES)
    assert heard == keys_in(played, TWILIO_SAMPLE_RATE, FRAME_SAMPLES)
    assert "".join(key for _, key in heard) == "1#5"

    # A frame below the keypad's level is not decoded at all (every bot frame of every
    # emulated call comes through here, in the load generator's CPU). The check is that
    # the decoder is never called: one frame alone never confirms a press anyway.
    def decode(frame, rate):
        raise AssertionError("a quiet frame was decoded")

    monkeypatch.setattr(keytones, "key_in_frame", decode)
    tone_frame = pipecat_key_tones("1")[:FRAME_SAMPLES]
    KeyToneListener(TWILIO_SAMPLE_RATE).feed(tone_frame, 0, MIN_RMS / 2)


# --- the offline responder answers the navigator's prompts ---------------------------------


def navigator_context(prompt: str, *heard: str) -> LLMContext:
    messages = [{"role": "developer", "content": prompt}]
    messages += [{"role": "user", "content": text} for text in heard]
    return LLMContext(messages=messages)


def navigation_prompt(goal: str) -> str:
    return IVRNavigator.IVR_NAVIGATION_BASE.format(goal=goal)


def test_the_offline_classifier_tells_a_menu_from_a_person():
    assert classify("Thank you for calling Acme Outdoor.") == "<mode>ivr</mode>"
    assert classify("For sales, press 1.") == "<mode>ivr</mode>"
    assert classify("Hello?") == "<mode>conversation</mode>"
    assert classify("Hi, this is Sam.") == "<mode>conversation</mode>"


@pytest.mark.parametrize(
    ("heard", "expected"),
    [
        (["Thank you for calling. For sales, press 1. For billing, press 2."], "<dtmf>2</dtmf>"),
        (["Press 2 for billing, press 1 for sales."], "<dtmf>2</dtmf>"),
        (["To pay a bill, press one. To speak to someone in billing, press 3."], "<dtmf>3</dtmf>"),
        (["Please hold while I transfer you."], "<ivr>completed</ivr>"),
        (["Billing, this is Sam speaking."], "<ivr>completed</ivr>"),
        (["Thank you for calling Acme Outdoor."], "<ivr>wait</ivr>"),
        (["For store hours, press 1. For directions, press 2."], "<ivr>wait</ivr>"),
        (["For store hours, press 1. For directions, press 2."] * 3, "<ivr>stuck</ivr>"),
        (  # the same menu, heard three ways (a first reading cut short): still stuck
            [
                "Thank you for calling. For store hours, press 1.",
                "For store hours, press 1. For directions, press 2.",
                "For store hours press one, for directions press two.",
            ],
            "<ivr>stuck</ivr>",
        ),
        (["Which department? Say billing, sales or support."], "Billing."),
    ],
)
def test_the_offline_navigator_presses_the_key_that_fits_the_goal(heard, expected):
    assert navigate(GOAL, heard) == expected
    responder = OfflineResponder(agent=SALE)
    assert responder.reply_to(navigator_context(navigation_prompt(GOAL), *heard)).text == expected


def test_a_menu_cut_between_two_turns_is_read_across_them_until_the_bot_acts():
    """Under load the turn may end between two of the recogniser's segments ("… for
    billing" | "press 2"): the navigator waited on the first, so it reads both, as an LLM
    reads its context. Turns before its last key belong to the menu it left."""
    cut = "Thank you for calling Acme Outdoor for sales press 1 for billing"
    waited = [
        {"role": "user", "content": cut},
        {"role": "assistant", "content": "<ivr>wait</ivr>"},
        {"role": "user", "content": "Press 2"},
    ]
    assert turns_since_action(waited) == 2
    assert navigate(GOAL, [cut, "Press 2"], unanswered=2) == "<dtmf>2</dtmf>"
    responder = OfflineResponder(agent=SALE)
    context = LLMContext(messages=[{"role": "developer", "content": navigation_prompt(GOAL)}])
    context.add_messages(waited)
    assert responder.reply_to(context).text == "<dtmf>2</dtmf>"
    pressed = [
        {"role": "user", "content": "For billing, press 2."},
        {"role": "assistant", "content": "<dtmf>2</dtmf>"},
        {"role": "user", "content": "Please enter your account number."},
    ]
    assert turns_since_action(pressed) == 1
    context = LLMContext(messages=[{"role": "developer", "content": navigation_prompt(GOAL)}])
    context.add_messages(pressed)
    assert responder.reply_to(context).text == "<ivr>wait</ivr>"  # not 2 again
    # Only the unfinished words carry over: each turn keeps its own way of saying options,
    # and an option cut in two is read whole even when "please hold" follows it.
    assert navigate(GOAL, ["Press 1 for sales.", "For billing, press 2."], 2) == "<dtmf>2</dtmf>"
    held = "press 2. For everything else, please hold."
    assert navigate(GOAL, ["For sales press 1 for billing", held], 2) == "<dtmf>2</dtmf>"
    assert navigate(GOAL, [cut, "Please hold while I transfer you."], 2) == "<ivr>completed</ivr>"
    assert navigate(GOAL, [cut, "Press 2"], unanswered=0) == "<ivr>wait</ivr>"  # nothing new
    assert turns_since_action([*waited, {"role": "assistant", "content": "<dtmf>2</dtmf>"}]) == 0
    function_call = {"role": "assistant", "content": None, "tool_calls": []}
    assert turns_since_action([waited[0], function_call, waited[2]]) == 2


def test_options_are_read_in_the_order_said_with_spoken_keys():
    options = menu_options("for sales, press one. for billing, press 2. for all else, press 0.")
    assert [(o.key, o.words) for o in options] == [
        ("1", "sales"), ("2", "billing"), ("0", "all else")
    ]  # fmt: skip


def test_after_a_menu_the_agent_still_opens_when_the_person_speaks():
    """The navigator's key presses stay in the context as assistant messages; nobody heard
    them, so the agent's opening is still to come."""
    assert only_navigation_tags("<dtmf>2</dtmf><dtmf>3</dtmf>")
    assert not only_navigation_tags("Press <dtmf>2</dtmf>")
    context = LLMContext(
        messages=[
            {"role": "system", "content": "You are the agent."},
            {"role": "assistant", "content": "<dtmf>3</dtmf>"},
            {"role": "assistant", "content": "<ivr>completed</ivr>"},
            {"role": "user", "content": BILLING_PERSON},
        ]
    )
    opening = f"{SALE.greeting} {SALE.question}"
    assert OfflineResponder(agent=SALE).reply_to(context).text == opening


# --- where the goal comes from ------------------------------------------------------------


def test_the_dials_goal_comes_first_then_the_agents_and_never_on_a_dial_in():
    agent = SALE.__class__(**{**SALE.__dict__, "ivr_goal": "Reach sales"})
    outbound = {"call_type": "outbound"}
    assert ivr_goal(agent, outbound) == "Reach sales"
    assert ivr_goal(agent, {**outbound, IVR_GOAL_PARAMETER: GOAL}) == GOAL
    assert ivr_goal(SALE, outbound) is None
    assert ivr_goal(agent, {"call_type": "inbound", IVR_GOAL_PARAMETER: GOAL}) is None


def test_the_goal_travels_as_a_parameter_from_the_api_and_campaigns():
    request = DialoutRequest(to=MENU, ivr_goal=GOAL, parameters={"campaign_id": "x"})
    assert request.call_parameters() == {"campaign_id": "x", IVR_GOAL_PARAMETER: GOAL}
    with pytest.raises(ValueError, match="parameters.ivr_goal says otherwise"):
        DialoutRequest(to=MENU, ivr_goal=GOAL, parameters={IVR_GOAL_PARAMETER: "Reach sales"})
    with pytest.raises(ValueError, match="ivr_goal"):
        DialoutRequest(to=MENU, ivr_goal="x" * 257)
    campaign = CampaignIn(name="c", contacts=[{"to": MENU}], ivr_goal=GOAL)
    assert campaign.parameters == {IVR_GOAL_PARAMETER: GOAL}


def test_a_campaign_reads_ivr_failed_as_its_own_outcome():
    record = CallRecord(
        call_sid="CA" + "0" * 32, end_reason=EndReason.IVR_FAILED, twilio_status="completed"
    )
    assert outcome_of(record) == "ivr_failed"
    CampaignIn(name="c", contacts=[{"to": MENU}], retry={"on": ["ivr_failed"]})  # accepted


class FakeControl:
    def __init__(self) -> None:
        self.hung_up: list[str] = []

    async def hang_up(self, reason: str) -> None:
        self.hung_up.append(reason)


class FakeWorker:
    def __init__(self) -> None:
        self.queued: list = []

    async def queue_frames(self, frames) -> None:
        self.queued += list(frames)


def navigation_with(*heard: str) -> tuple[MenuNavigation, FakeWorker, FakeControl]:
    """A navigation with a goal, bound to fakes; `heard` is the context's user turns."""
    llm = OfflineResponder(agent=SALE)
    system = {"role": "system", "content": "You are the agent."}
    navigation = MenuNavigation("CA1", GOAL, llm, make_settings(ivr_timeout_s=0.3), system)
    worker, control = FakeWorker(), FakeControl()
    context = LLMContext(messages=[system, *({"role": "user", "content": h} for h in heard)])
    navigation.bind(worker, control, context)  # type: ignore[arg-type]
    return navigation, worker, control


async def test_a_menu_that_leads_nowhere_in_ivr_timeout_s_is_hung_up_on():
    navigation, _, control = navigation_with()
    navigation.start()
    await asyncio.sleep(0.6)
    assert control.hung_up == [EndReason.IVR_FAILED]
    assert navigation.state == FAILED and not navigation.navigating


async def put_through(*heard: str) -> tuple[MenuNavigation, FakeWorker, FakeControl]:
    navigation, worker, control = navigation_with(*heard)
    navigation.start()
    navigation.state = NAVIGATING
    await navigation.on_status(None, IVRStatus.COMPLETED)  # type: ignore[arg-type]
    return navigation, worker, control


async def test_put_through_the_agent_holds_silent_and_the_time_limit_still_runs():
    navigation, worker, control = await put_through("Please hold while I transfer you.")
    assert navigation.state == HOLDING and navigation.navigating
    update = next(f for f in worker.queued if isinstance(f, LLMMessagesUpdateFrame))
    assert [m["role"] for m in update.messages] == ["system"] and not update.run_llm
    navigation.callee_said("")  # hold music, heard as nothing: still holding
    await asyncio.sleep(0.6)
    assert control.hung_up == [EndReason.IVR_FAILED]  # no person within IVR_TIMEOUT_S


async def test_the_persons_first_words_end_the_hold_and_the_time_limit():
    navigation, _, control = await put_through("Please hold while I transfer you.")
    navigation.callee_said("Hello, billing.")
    assert navigation.state == TALKING
    await asyncio.sleep(0.6)
    assert control.hung_up == []


async def test_a_person_heard_in_the_same_turn_as_please_hold_is_answered_at_once():
    heard = "Please hold while I transfer you. Billing, this is Sam speaking."
    assert words_after_transfer(heard) == "Billing, this is Sam speaking."
    assert words_after_transfer("One moment please. Please hold while I transfer you.") == ""
    assert words_after_transfer("Please hold while I transfer you. This call is recorded.") == ""
    navigation, worker, _ = navigation_with(heard)
    navigation.state = NAVIGATING
    await navigation.on_status(None, IVRStatus.COMPLETED)  # type: ignore[arg-type]
    update = next(f for f in worker.queued if isinstance(f, LLMMessagesUpdateFrame))
    assert update.run_llm and update.messages[-1] == {"role": "user", "content": heard}
    assert navigation.state == TALKING


def test_without_a_goal_the_llm_is_the_stage():
    llm = OfflineResponder(agent=SALE)
    navigation = MenuNavigation("CA1", None, llm, make_settings(), {"role": "system"})
    assert navigation.stage is llm and not navigation.navigating


def test_a_goal_and_machine_detection_are_refused_together():
    with pytest.raises(ValueError, match="ivr_goal"):
        DialoutRequest(to=MENU, ivr_goal=GOAL, machine_detection=True)
    with pytest.raises(ValueError, match="machine_detection"):
        DialoutRequest(to=MENU, parameters={IVR_GOAL_PARAMETER: GOAL}, machine_detection="bot")
    with pytest.raises(ValueError, match="machine_detection"):
        CampaignIn(name="c", contacts=[{"to": MENU}], ivr_goal=GOAL, machine_detection=True)
    with pytest.raises(ValueError, match="machine_detection"):  # a contact's own goal too
        contact = {"to": MENU, "parameters": {IVR_GOAL_PARAMETER: GOAL}}
        CampaignIn(name="c", contacts=[contact], machine_detection=True)
    agent = SALE.__class__(**{**SALE.__dict__, "ivr_goal": "Reach sales"})
    assert ivr_goal(agent, {"call_type": "outbound", "amd": "1"}) is None  # the file's gives way


def test_a_speech_menu_takes_a_choice_said_in_any_case_among_other_words():
    choices = {"sales": [], "billing": [], "store hours": []}
    assert spoken_choice("Billing.", choices) == "billing"
    assert spoken_choice("I'd like the store hours, please", choices) == "store hours"
    assert spoken_choice("hours of the store?", choices) == "store hours"
    assert spoken_choice("bill me", choices) is None  # a word, not a part of one
    assert spoken_choice("", choices) is None


@pytest.mark.parametrize(
    ("state", "re_prompted"),
    [(LISTENING, True), (NAVIGATING, False), (HOLDING, False), (TALKING, True)],
)
async def test_a_phone_menu_is_never_re_prompted_a_silent_callee_is(state, re_prompted):
    """A menu may take longer than SILENCE_TIMEOUT_S to answer (a speech menu deciding, a
    hold; IVR_TIMEOUT_S bounds it); a callee who picked up and says nothing, or the person
    reached, is re-prompted as on any call."""
    prompted: list[str] = []

    async def on_caller_silent() -> None:
        prompted.append("re-prompt")

    navigation = MenuNavigation("CA1", GOAL, OfflineResponder(agent=SALE), make_settings(), {})
    navigation.state = state
    call = SimpleNamespace(
        navigation=navigation, control=SimpleNamespace(on_caller_silent=on_caller_silent)
    )
    await PhoneCall.on_user_turn_idle(call, None)  # type: ignore[arg-type]
    assert prompted == (["re-prompt"] if re_prompted else [])


def test_a_speech_menu_choice_needs_words():
    with pytest.raises(ValueError, match="need words"):
        Menu(Speak(b"\0\0", 8000, "Say billing."), {}, spoken={"?": []})
    assert spoken_choice("anything at all", {"": [], "?!": []}) is None


async def test_a_recogniser_that_fails_is_a_menu_that_did_not_understand():
    async def broken(pcm: bytes, choices) -> str:
        raise RuntimeError("no model here")

    caller = MediaStreamCaller("ws://127.0.0.1:9/ws", hear=broken)
    hearing = asyncio.create_task(broken(b"\0\0", ("billing",)))
    await asyncio.wait({hearing})
    menu = Menu(Speak(b"\0\0", 8000, "Say billing."), {}, spoken={"billing": []})
    assert caller._heard_choice(hearing, menu) is None  # the menu plays again, as unheard
    (heard,) = caller.result.events_of("menu_heard")
    assert "no model here" in heard.data["error"]


# --- end to end ---------------------------------------------------------------------------


rest_port, server = records_server("ivr", ADMIN_API_KEY=ADMIN_KEY)


twilio = scripted_callees({MENU: "menu", NO_MATCH: "menu-no-match", SAY_MENU: "menu-say"})


async def dial(server: LiveServer, twilio: TwilioRestEmulator, to: str, goal: str):
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(
            f"{server.base_url}/dialout",
            json={"to": to, "parameters": {"campaign_id": "summer_sale"}, "ivr_goal": goal},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
    assert response.status_code == 201, response.text
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=120)
    assert call.result is not None, call.error
    return response.json()["call_sid"], call.result


async def record_of(server: LiveServer, call_sid: str) -> dict:
    return await closed_record(server, call_sid, ADMIN_KEY)


async def test_the_bot_presses_through_nested_menus_to_a_person_then_talks_as_the_agent(
    server: LiveServer, twilio: TwilioRestEmulator
):
    call_sid, result = await dial(server, twilio, MENU, GOAL)

    assert result.error is None, result.error
    assert [key for _, key in result.bot_dtmf] == ["2", "3"], result.bot_dtmf
    # Each key after its own menu's options were said (the menu took the key it heard).
    menus = result.events_of("menu")
    choices = [event.data["key"] for event in result.events_of("menu_choice")]
    menu_trace = [(round(e.t, 2), e.kind, e.data) for e in result.events if "menu" in e.kind]
    assert choices == ["2", "3"] and len(menus) == 2, menu_trace
    prompts = [e for e in result.events_of("caller_speech") if "press" in e.data["text"]]
    for (pressed_at, _), prompt in zip(result.bot_dtmf, prompts, strict=True):
        assert pressed_at > prompt.t + prompt.data["duration"]  # once the options were said
    # The bot said nothing in the menus; the person heard the agent's opening, then goodbye.
    said = server.bot_lines(call_sid)
    assert said[0] == opening_line(SALE, {"call_type": "outbound"}), said
    speech = [u for u in result.bot_utterances if u.start > result.bot_dtmf[-1][0] + 0.5]
    assert speech, "no bot speech after the last key"
    record = await record_of(server, call_sid)
    callee_lines = [e["text"] for e in record["transcript"] if e["kind"] == "caller"]
    assert any("Sam" in line for line in callee_lines), json.dumps(record["transcript"])
    assert record["end_reason"] == EndReason.BOT_ENDED  # after the person's goodbye
    assert server.wait_for_log(f"Call {call_sid}: reached a person after the menu")


async def test_a_menu_that_asks_for_words_hears_the_bot_say_its_choice(
    server: LiveServer, twilio: TwilioRestEmulator
):
    call_sid, result = await dial(server, twilio, SAY_MENU, GOAL)

    assert result.error is None, result.error
    assert result.bot_dtmf == []  # said, not pressed
    assert len(result.events_of("menu")) == 1  # and understood the first time
    (choice,) = result.events_of("menu_choice")  # heard by the menu's own recogniser
    assert choice.data["word"] == "billing", choice.data
    said = server.bot_lines(call_sid)
    assert said[0] == "Billing.", said  # the choice, then the agent once a person answers
    assert said[1] == opening_line(SALE, {"call_type": "outbound"}), said
    record = await record_of(server, call_sid)
    callee_lines = [e["text"] for e in record["transcript"] if e["kind"] == "caller"]
    assert any("Sam" in line for line in callee_lines), json.dumps(record["transcript"])
    assert record["end_reason"] == EndReason.BOT_ENDED


async def test_a_menu_without_the_goal_is_hung_up_on_as_ivr_failed(
    server: LiveServer, twilio: TwilioRestEmulator
):
    call_sid, result = await dial(server, twilio, NO_MATCH, GOAL)

    assert result.bot_dtmf == []  # no key fits "billing": none pressed
    assert len(result.events_of("menu")) == 3  # heard three times, then given up on
    assert result.ended_by in ("server", "rest"), result.ended_by
    record = await record_of(server, call_sid)
    assert record["end_reason"] == EndReason.IVR_FAILED == "ivr failed"
    assert server.bot_lines(call_sid) == []  # not a word to a machine
    assert server.error_lines() == []
