"""Voicemail on dial-out: AMD on the REST create, the signed `/amd` callback, the verdict
registry, the bot's answer to each verdict, and whole calls through the emulator.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient
from pipecat.frames.frames import (
    EndFrame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    KeypadEntry,
    TTSSpeakFrame,
)
from pipecat.tests.utils import run_test
from pydantic import ValidationError

from phonebot.agents.agent import opening_line
from phonebot.call.voicemail import AmdGate, AnsweringMachineScreen, amd_requested
from phonebot.emulator import (
    Hangup,
    MediaStreamCaller,
    Speak,
    TwilioRestEmulator,
    WaitForBot,
    WaitForHangup,
)
from phonebot.emulator.ids import new_call_sid
from phonebot.state import AmdVerdicts, MemoryState
from phonebot.twilio.amd import AMD_PARAMETER
from phonebot.twilio.dialout import DialoutRequest, place_call
from phonebot.twilio.twiml import ParameterError
from phonebot.web.app import create_app
from phonebot.web.services import app_services
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import free_port
from tests.test_call_control import assert_hung_up_after_playout, phone  # noqa: F401
from tests.test_calls import dialout, say
from tests.test_http import FORM, signed_post, stream_of

SUMMER_SALE = shipped_agent("summer_sale")
AMD_FORM = {
    "CallSid": "CA" + "2" * 32,
    "AccountSid": ACCOUNT_SID,
    "AnsweredBy": "machine_end_beep",
    "MachineDetectionDuration": "4200",
}
OUTBOUND = {"call_type": "outbound", AMD_PARAMETER: "1", "campaign_id": "summer_sale"}


@pytest.fixture
def client(settings) -> TestClient:
    return TestClient(create_app(settings))


def dialout_post(client: TestClient, body: dict):
    return client.post("/dialout", json=body, headers={"Authorization": f"Bearer {DIALOUT_KEY}"})


# --- the request and the REST create ------------------------------------------------


def test_machine_detection_is_off_unless_asked_and_must_be_a_boolean():
    assert DialoutRequest(to="+15551234567").machine_detection is False
    assert DialoutRequest(to="+15551234567", machine_detection=True).machine_detection is True
    with pytest.raises(ValidationError):
        DialoutRequest(to="+15551234567", machine_detection="maybe")


async def created_form(twilio: TwilioRestEmulator, request: DialoutRequest) -> dict[str, str]:
    """What `calls.create` sent, for a call placed through the REST emulator."""
    settings = make_settings(twilio_api_base_url=twilio.base_url)
    await place_call(request, settings, "https://bot.example.com")
    return (await twilio.wait_for_call()).form


@pytest.fixture
async def twilio_rest():
    # Nothing listens on `local_server_url`: the emulator's answer fails at once and
    # quietly, leaving only the recorded create to inspect.
    closed = f"http://127.0.0.1:{free_port()}"
    async with TwilioRestEmulator(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, local_server_url=closed
    ) as emulator:
        yield emulator


async def test_machine_detection_asks_twilio_for_async_amd_with_our_callback(twilio_rest):
    request = DialoutRequest(
        to="+15551234567", parameters={"campaign_id": "summer_sale"}, machine_detection=True
    )
    form = await created_form(twilio_rest, request)

    assert form["MachineDetection"] == "DetectMessageEnd"
    assert form["AsyncAmd"] == "true"
    assert form["AsyncAmdStatusCallback"] == "https://bot.example.com/amd"
    assert form["AsyncAmdStatusCallbackMethod"] == "POST"
    url = urlsplit(form["Url"])
    assert url.path == "/outbound"
    assert parse_qs(url.query) == {"campaign_id": ["summer_sale"], AMD_PARAMETER: ["1"]}


async def test_without_machine_detection_nothing_about_amd_is_sent(twilio_rest):
    form = await created_form(twilio_rest, DialoutRequest(to="+15551234567"))
    assert not [name for name in form if "Amd" in name or "MachineDetection" in name]
    assert form["Url"] == "https://bot.example.com/outbound"


async def test_every_dialout_asks_twilio_for_signed_status_callbacks(twilio_rest):
    """So a dial-out that is busy or unanswered, and never fetches /outbound, is recorded."""
    form = await created_form(twilio_rest, DialoutRequest(to="+15551234567"))
    assert form["StatusCallback"] == "https://bot.example.com/status"
    assert form["StatusCallbackMethod"] == "POST"
    create = next(r for r in twilio_rest.requests if r.path.endswith("/Calls.json"))
    events = create.form_lists["StatusCallbackEvent"]
    assert events == ["initiated", "ringing", "answered", "completed"]


def test_callers_cannot_set_the_amd_parameter_themselves(client):
    response = dialout_post(client, {"to": "+15551234567", "parameters": {AMD_PARAMETER: "1"}})
    assert response.status_code == 422
    assert response.json()["field"] == f"parameters.{AMD_PARAMETER}"


async def test_machine_detection_is_refused_when_the_bot_runs_on_pipecat_cloud():
    settings = make_settings(env="production", agent_name="bot", organization_name="acme")
    request = DialoutRequest(to="+15551234567", machine_detection=True)
    with pytest.raises(ParameterError) as error:
        await place_call(request, settings, "https://bot.example.com")
    assert error.value.field == "machine_detection"
    assert "REDIS_URL" in str(error.value)


async def test_machine_detection_on_pipecat_cloud_works_through_the_shared_state(monkeypatch):
    """With REDIS_URL the verdict /amd stores is read by the bot on Pipecat Cloud."""
    settings = make_settings(
        env="production",
        agent_name="bot",
        organization_name="acme",
        redis_url="redis://redis.internal:6379/0",
        twilio_phone_number="+15550001111",
    )
    created: dict = {}

    async def fake_create_call(settings, **call):
        created.update(call)
        return SimpleNamespace(sid=new_call_sid(), status="queued", to=call["to"])

    monkeypatch.setattr("phonebot.twilio.dialout.create_call", fake_create_call)
    request = DialoutRequest(to="+15551234567", machine_detection=True)
    await place_call(request, settings, "https://bot.example.com")
    assert created["amd_callback_url"] == "https://bot.example.com/amd"


# --- /outbound and /amd --------------------------------------------------------------


def test_outbound_passes_the_amd_parameter_to_the_stream(client):
    query = urlencode({"campaign_id": "summer_sale", AMD_PARAMETER: "1"})
    response = signed_post(client, f"http://testserver/outbound?{query}", FORM)
    assert response.status_code == 200, response.text
    parameters = stream_of(response.text)[1]
    assert parameters[AMD_PARAMETER] == "1"
    assert parameters["campaign_id"] == "summer_sale"
    assert amd_requested(parameters)


@pytest.mark.parametrize("path", ["/?amd=1", "/outbound?amd=yes"])
def test_the_amd_parameter_is_refused_anywhere_else(client, path):
    response = signed_post(client, f"http://testserver{path}", FORM)
    assert response.status_code == 422
    assert response.json()["field"] == f"query.{AMD_PARAMETER}"


def test_amd_callback_records_the_verdict_and_answers_204(client):
    form = {**AMD_FORM, "CallSid": new_call_sid()}
    response = signed_post(client, "http://testserver/amd", form)
    assert response.status_code == 204
    assert response.content == b""
    verdicts: AmdVerdicts = app_services(client.app).amd_verdicts
    assert asyncio.run(verdicts.get(form["CallSid"])) == "machine_end_beep"


@pytest.mark.parametrize("signature", [None, "d3Jvbmc="])
def test_amd_callback_needs_twilios_signature(client, signature):
    form = {**AMD_FORM, "CallSid": new_call_sid()}
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    response = client.post("/amd", data=form, headers=headers)
    assert response.status_code == 403
    assert asyncio.run(app_services(client.app).amd_verdicts.get(form["CallSid"])) is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"AnsweredBy": "robot"}, "AnsweredBy"),
        ({"AnsweredBy": ""}, "AnsweredBy"),
        ({"CallSid": ""}, "CallSid"),
        ({"CallSid": "CA-not-a-sid"}, "CallSid"),
    ],
)
def test_a_malformed_amd_callback_names_the_field(client, change, field):
    response = signed_post(client, "http://testserver/amd", {**AMD_FORM, **change})
    assert response.status_code == 422
    assert response.json()["field"] == field


# --- the verdict registry ------------------------------------------------------------


async def test_a_verdict_that_arrives_first_is_there_when_the_bot_asks():
    verdicts = AmdVerdicts(MemoryState())
    await verdicts.set("CA1", "human")
    assert await verdicts.wait("CA1", timeout=0.1) == "human"


async def test_a_waiting_bot_is_woken_by_the_verdict():
    verdicts = AmdVerdicts(MemoryState(), poll_s=60)  # woken by the announcement, not a poll
    waiter = asyncio.create_task(verdicts.wait("CA1", timeout=5))
    await asyncio.sleep(0.05)
    await verdicts.set("CA1", "machine_end_beep")
    assert await asyncio.wait_for(waiter, 1) == "machine_end_beep"


async def test_no_verdict_in_time_is_none():
    verdicts = AmdVerdicts(MemoryState())
    assert await verdicts.wait("CA1", timeout=0.05) is None


async def test_unclaimed_verdicts_expire_and_are_bounded():
    now = [0.0]
    shared = MemoryState(max_entries=3, clock=lambda: now[0])
    verdicts = AmdVerdicts(shared, ttl_s=60)
    await verdicts.set("CA1", "human")
    now[0] = 59
    assert await verdicts.get("CA1") == "human"
    now[0] = 61
    assert await verdicts.get("CA1") is None
    for sid in ("CA2", "CA3", "CA4", "CA5"):
        await verdicts.set(sid, "unknown")
    assert shared.size("amd") == 3
    assert await verdicts.get("CA2") is None  # the oldest made room
    assert await verdicts.get("CA5") == "unknown"


# --- the bot's side ------------------------------------------------------------------


def test_only_dialout_calls_marked_by_the_server_wait_for_a_verdict():
    assert amd_requested(OUTBOUND)
    assert not amd_requested({**OUTBOUND, AMD_PARAMETER: "0"})
    assert not amd_requested({**OUTBOUND, "call_type": "inbound"})
    assert not amd_requested({"call_type": "outbound"})


class FakeControl:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.reasons: list[str] = []

    async def end_call(self, closing_line: str, reason: str) -> None:
        self.ended.append((closing_line, reason))

    def note_end(self, reason: str) -> None:
        self.reasons.append(reason)


async def screened(answered_by: str | None, parameters=OUTBOUND) -> SimpleNamespace:
    """Run a screen against a verdict; what the bot did."""
    verdicts = AmdVerdicts(MemoryState())
    if answered_by:
        await verdicts.set("CA1", answered_by)
    screen = AnsweringMachineScreen("CA1", parameters, verdicts=verdicts, timeout_s=0.05)
    said, conversed, ended = [], [], []

    async def speak(text: str) -> None:
        said.append(text)

    async def end_pipeline(reason: str) -> None:
        ended.append(reason)

    async def converse() -> None:
        conversed.append(True)

    screen.gate.speak, screen.gate.end_pipeline = speak, end_pipeline
    control = FakeControl()
    muted_before = screen.gate.muted
    outcome = await screen.screen(control, SUMMER_SALE, converse)
    return SimpleNamespace(
        outcome=outcome,
        said=said,
        conversed=bool(conversed),
        control=control,
        ended=ended,
        muted_before=muted_before,
        muted_after=screen.gate.muted,
    )


@pytest.mark.parametrize(
    "answered_by", ["machine_end_beep", "machine_end_silence", "machine_end_other"]
)
async def test_a_machine_gets_the_campaign_voicemail_then_the_call_ends(answered_by):
    bot = await screened(answered_by)
    assert bot.outcome == "left message"
    assert bot.control.ended == [(SUMMER_SALE.voicemail, "voicemail")]
    assert bot.said == [] and not bot.conversed
    assert bot.muted_before and bot.muted_after  # the machine can't barge in on the message


@pytest.mark.parametrize("answered_by", ["human", "unknown", None])
async def test_a_human_or_no_verdict_is_greeted_at_once_and_heard(answered_by):
    bot = await screened(answered_by)
    assert bot.outcome == "conversation"
    assert bot.said == [opening_line(SUMMER_SALE, OUTBOUND)]
    assert bot.control.ended == []
    assert bot.muted_before and not bot.muted_after


async def test_a_fax_is_hung_up_on_without_a_word():
    bot = await screened("fax")
    assert bot.outcome == "hung up"
    assert bot.ended == ["fax"] and bot.control.reasons == ["fax"]
    assert bot.said == [] and bot.control.ended == []


async def test_calls_without_amd_open_as_before():
    bot = await screened(None, parameters={"call_type": "outbound"})
    assert bot.conversed and bot.said == [] and not bot.muted_before


async def test_the_muted_gate_passes_silence_and_marks_but_no_keys():
    audio = InputAudioRawFrame(audio=b"\x10\x20" * 160, sample_rate=8000, num_channels=1)
    mark = InputTransportMessageFrame(message={"event": "mark", "mark": {"name": "x"}})
    down, _ = await run_test(
        AmdGate(muted=True),
        frames_to_send=[audio, InputDTMFFrame(button=KeypadEntry.ONE), mark],
        expected_down_frames=[InputAudioRawFrame, InputTransportMessageFrame],
    )
    assert down[0].audio == bytes(320)


async def test_the_gate_speaks_downstream_and_ends_the_pipeline_upstream():
    gate = AmdGate(muted=True)

    async def fax_verdict() -> None:
        await asyncio.sleep(0.2)
        await gate.speak("hello")
        await gate.end_pipeline("fax")

    verdict = asyncio.create_task(fax_verdict())
    down, _ = await asyncio.wait_for(
        run_test(gate, frames_to_send=[], send_end_frame=False, expected_down_frames=None), 5
    )
    await verdict
    assert [type(f) for f in down][:1] == [TTSSpeakFrame]
    assert isinstance(down[-1], EndFrame) and down[-1].reason == "fax"


async def test_the_open_gate_changes_nothing():
    audio = InputAudioRawFrame(audio=b"\x10\x20" * 160, sample_rate=8000, num_channels=1)
    down, _ = await run_test(
        AmdGate(muted=False),
        frames_to_send=[audio, InputDTMFFrame(button=KeypadEntry.ONE)],
        expected_down_frames=[InputAudioRawFrame, InputDTMFFrame],
    )
    assert down[0].audio == audio.audio


# --- whole calls -------------------------------------------------------------------

GREETING = "Hi, you've reached Alex. Please leave a message after the beep."
BEEP_S = 0.5


async def place_screened_call(server, twilio, script) -> SimpleNamespace:
    """POST /dialout with machine detection; the callee plays `script`."""

    async def callee(call, caller: MediaStreamCaller):
        call.result = await caller.run(script)

    twilio.on_answer = callee
    body = {
        "to": "+15551234567",
        "parameters": {"campaign_id": "summer_sale"},
        "machine_detection": True,
    }
    response = await dialout(server, body)
    assert response.status_code == 201, response.text
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=60)
    assert call.exception is None, call.error
    return call


async def test_amd_machine_result_leaves_the_voicemail_message_then_hangs_up(phone):  # noqa: F811
    server, twilio = await phone()
    greeting = say(GREETING)
    beep = Speak.tone(BEEP_S, 1000)
    beep_ends = greeting.duration + BEEP_S
    twilio.answered_by = "machine_end_beep"
    twilio.amd_delay = beep_ends + 0.5  # Twilio hears the beep end, then calls back

    call = await place_screened_call(server, twilio, [greeting, beep, WaitForHangup(timeout=45)])
    result = call.result

    assert call.form["MachineDetection"] == "DetectMessageEnd"
    assert [cb.status for cb in twilio.status_callbacks if "AnsweredBy" in cb.form] == [204]
    # Nothing was said over the greeting: the one utterance is the message, after the beep.
    assert len(result.bot_utterances) == 1, [u.start for u in result.bot_utterances]
    assert result.bot_utterances[0].start >= beep_ends
    assert server.bot_lines(call.sid) == [SUMMER_SALE.voicemail]
    assert_hung_up_after_playout(result, twilio)
    assert server.wait_for_log(f"Call {call.sid} voicemail: machine_end_beep -> left message")
    assert server.wait_for_log(f"Call {call.sid} ended"), server.log_text()[-3000:]
    assert any(f"Call {call.sid} ended" in line and "(voicemail)" in line for line in server.logs)
    assert server.error_lines() == []


async def test_amd_human_result_gets_the_pitch_right_away(phone):  # noqa: F811
    server, twilio = await phone()
    hello = say("hello?")
    twilio.answered_by = "human"
    twilio.amd_delay = hello.duration + 1.2  # Twilio's default end-of-speech silence

    call = await place_screened_call(server, twilio, [hello, WaitForBot(timeout=20), Hangup()])
    result = call.result

    first = result.bot_utterances[0]
    assert twilio.amd_delay <= first.start < twilio.amd_delay + 3, first.start
    pitch = opening_line(SUMMER_SALE, call.twiml.stream.parameters)
    assert server.bot_lines(call.sid) == [pitch]
    assert server.wait_for_log(f"Call {call.sid} voicemail: human -> conversation")
