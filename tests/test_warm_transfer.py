"""Warm transfer: the caller holds with the bot while a person is called, briefed and asked.

End to end, the real server (TRANSFER_MODE=warm) takes a dial-in whose caller asks for a
person; the emulator plays the person the bot calls (phonebot.emulator.callees): one who
presses 1 (both calls end up in one conference, started), one who presses 2, and one who
never answers (Twilio's no-answer status callback is the verdict). In the last two the
caller comes back to the bot, which offers to take a message and goes on. The caller's
record holds the outcome and its timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.audio import HOLD_NOTES_HZ, hold_music
from phonebot.call.warm_transfer import (
    ACCEPTED,
    CALLER_LEFT,
    CONNECTING_PERSON_LINE,
    DECLINED,
    DECLINED_LINE,
    WarmTransfer,
    transfer_summary,
)
from phonebot.config import Settings
from phonebot.emulator import (
    CallResult,
    Pause,
    TwilioRestEmulator,
    WaitForBot,
    WaitForHangup,
    dial_in,
)
from phonebot.emulator.callees import CalleeBook
from phonebot.emulator.ids import new_call_sid
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import voice_webhook_form
from phonebot.records.call_log import CallLog
from phonebot.state import MemoryState, TransferVerdicts
from phonebot.state.verdicts import TransferVerdict
from phonebot.twilio.stream import CallSession
from phonebot.twilio.transfer import TRANSFER_OF_PARAMETER, TRANSFER_SUMMARY_PARAMETER
from phonebot.twilio.twiml import ParameterError
from phonebot.web.webhooks import server_parameters
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer, closed_record, free_port, records_server, twilio_for
from tests.test_calls import CALLER, OUR_NUMBER, call_in, dialin_opening, say, server_env

ADMIN_KEY = "test-admin-key-warm-transfer"
PERSON = "+15559990000"
ASK_FOR_A_PERSON = "can I speak to a real person please"
SETTINGS = Settings.model_fields
WARM_PHRASE = SETTINGS["warm_transfer_phrase"].default
CONNECTING = SETTINGS["transfer_connecting_phrase"].default
DECLINED_PHRASE = SETTINGS["transfer_declined_phrase"].default
RATE = 8000


# --- the pieces -----------------------------------------------------------------------------


def test_a_verdict_survives_the_shared_state_and_a_bare_word_reads_as_one():
    verdict = TransferVerdict(ACCEPTED, "CA" + "1" * 32, answered_at=10.0, at=12.5)
    assert TransferVerdict.decode(verdict.encode()) == verdict
    assert TransferVerdict.decode("no-answer").outcome == "no-answer"


def test_the_person_hears_the_llms_summary_else_what_the_caller_said_last_keys_aside():
    context = LLMContext(
        messages=[
            {"role": "user", "content": "my parcel never came"},
            {"role": "assistant", "content": "Sorry to hear that."},
            {"role": "user", "content": "The caller pressed 0"},
        ]
    )
    assert transfer_summary("  Ann, a lost parcel.  ", context) == "Ann, a lost parcel."
    assert transfer_summary(None, context) == 'The caller said: "my parcel never came"'
    assert len(transfer_summary("x" * 1000, context)) == 250


def test_only_our_own_outbound_url_may_make_a_call_a_transfers_briefing():
    query = {TRANSFER_OF_PARAMETER: "CA" + "2" * 32, TRANSFER_SUMMARY_PARAMETER: "hi"}
    custom, own = server_parameters(query, "outbound")
    assert custom == {} and own == query
    with pytest.raises(ParameterError, match="transfer_of"):
        server_parameters(query, "inbound")


def test_hold_music_is_its_notes():
    loop = np.frombuffer(hold_music(RATE), dtype=np.int16)
    assert hold_notes_heard(loop) == len(HOLD_NOTES_HZ)


def hold_notes_heard(samples: np.ndarray) -> int:
    """Half-second windows whose spectrum peaks on one of the hold music's notes, alone."""
    window = RATE // 2
    heard = 0
    for start in range(0, len(samples) - window + 1, window):
        chunk = samples[start : start + window].astype(np.float64)
        spectrum = np.abs(np.fft.rfft(chunk * np.hanning(window)))
        peak = int(np.argmax(spectrum))
        frequency = peak * RATE / window
        pure = spectrum[peak] > 0.5 * spectrum.sum() / 10
        if pure and any(abs(frequency - note) <= 4 for note in HOLD_NOTES_HZ):
            heard += 1
    return heard


@pytest.fixture
async def rest() -> AsyncIterator[TwilioRestEmulator]:
    async with TwilioRestEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN) as twilio:
        yield twilio


def caller_side(twilio: TwilioRestEmulator, transfers: TransferVerdicts) -> WarmTransfer:
    """The caller's side of a warm transfer whose person is on the line (registered)."""
    settings = make_settings(twilio_api_base_url=twilio.base_url)
    session = CallSession(new_call_sid(), "MZ" + "0" * 32, {"call_type": "inbound"})
    warm = WarmTransfer(
        settings, session, shipped_agent("support"), transfers, "https://bot.example.com",
        CallLog(None, session.call_sid), mute=lambda muted: None,
    )  # fmt: skip
    warm.person_call_sid = twilio.register_call(new_call_sid(), to=PERSON, from_=OUR_NUMBER).sid
    return warm


def hang_ups(twilio: TwilioRestEmulator) -> list[str]:
    return [r.path for r in twilio.requests if r.form.get("Status") == "completed"]


@pytest.mark.parametrize(
    ("verdict", "connected", "person_hung_up", "told"),
    [
        (None, False, True, "caller hung up"),  # still ringing or being briefed
        (ACCEPTED, False, True, ACCEPTED),  # waiting in the room for a caller who is gone
        (DECLINED, False, False, DECLINED),  # their call ended itself
        (ACCEPTED, True, False, ACCEPTED),  # the caller joined: the conference goes on
    ],
)
async def test_a_caller_who_leaves_never_leaves_the_person_waiting(
    rest, verdict, connected, person_hung_up, told
):
    transfers = TransferVerdicts(MemoryState())
    warm = caller_side(rest, transfers)
    person = warm.person_call_sid
    if verdict is not None:
        await transfers.set(person, TransferVerdict(verdict, person).encode())
    warm.connected = connected

    await warm.abandon(CALLER_LEFT)

    assert bool(hang_ups(rest)) == person_hung_up
    assert TransferVerdict.decode(await transfers.get(person) or "").outcome == told


# --- end to end -----------------------------------------------------------------------------


rest_port, server = records_server(
    "warm-transfer",
    ADMIN_API_KEY=ADMIN_KEY,
    TRANSFER_TARGET=PERSON,
    TRANSFER_MODE="warm",
    TRANSFER_RING_TIMEOUT_S="5",
)


@pytest.fixture
def person(server: LiveServer, rest_port: int):
    """The emulator, with PERSON played by the callee kind a test names."""

    @asynccontextmanager
    async def emulator(kind: str) -> AsyncIterator[TwilioRestEmulator]:
        callees = CalleeBook({PERSON: kind}, rule=None)
        async with twilio_for(server, rest_port, callees=callees) as twilio:
            yield twilio

    return emulator


async def ask_for_a_person(
    server: LiveServer, twilio: TwilioRestEmulator, then: list
) -> CallResult:
    script = [WaitForBot(timeout=20), say(ASK_FOR_A_PERSON), *then]
    return await call_in(server, twilio, script, session_type="support")


def person_call(twilio: TwilioRestEmulator):
    calls = [c for c in twilio.calls.values() if c.to == PERSON]
    assert len(calls) == 1, [(c.to, c.status) for c in twilio.calls.values()]
    (call,) = calls
    return call


async def test_a_person_who_presses_1_is_briefed_then_joined_with_the_caller(server, person):
    async with person("transfer-accept") as twilio:
        result = await ask_for_a_person(server, twilio, [WaitForHangup(timeout=90)])
        callee = person_call(twilio)
        await callee.wait_finished(timeout=30)
        caller_sid = result.call_sid
        # Both calls are live in the room, the conference started; when the person hangs
        # up, it ends for the caller too (endConferenceOnExit), nobody is left on hold.
        room = twilio.conferences[f"transfer-{caller_sid}"]
        assert set(room.participants) == {caller_sid, callee.sid} and room.started_at
        assert twilio.calls[caller_sid].status == callee.status == "in-progress"
        twilio.hang_up(callee.sid)
        assert room.ended and twilio.calls[caller_sid].status == "completed"

    # The person was called through our webhook, naming the caller, and briefed with what
    # the caller said; they pressed 1 and their call went into the room.
    query = parse_qs(urlsplit(callee.form["Url"]).query)
    assert query[TRANSFER_OF_PARAMETER] == [caller_sid]
    assert callee.form["Timeout"] == "5"
    briefing = server.bot_lines(callee.sid)
    assert "real person" in briefing[0] and "Press 1" in briefing[0], briefing  # as heard
    assert briefing[-1] == CONNECTING_PERSON_LINE
    # The caller heard the bot say it would look for someone, hold music, then "connecting".
    assert server.bot_lines(caller_sid) == [dialin_opening("support"), WARM_PHRASE, CONNECTING]
    assert hold_notes_heard(result.bot_audio) >= 4, "no hold music while the person was called"
    record = await closed_record(server, caller_sid, ADMIN_KEY)
    assert record["transfer_target"] == PERSON and record["transfer_result"] == ACCEPTED
    (entry,) = [line for line in record["transcript"] if line["kind"] == "transfer"]
    timings = entry["data"]
    assert entry["text"] == ACCEPTED and timings["person_call_sid"] == callee.sid
    assert 0 < timings["answered_after_s"] < timings["decided_after_s"] < 60, timings


async def test_a_person_who_presses_2_sends_the_caller_back_to_the_bot_to_leave_a_message(
    server, person
):
    async with person("transfer-decline") as twilio:
        then = [
            WaitForBot(timeout=30, until="speech"),  # "… Please hold …", then the music
            Pause(9.0),
            say("hello are you still there"),  # on hold: no reply, no re-prompt
            WaitForBot(timeout=90, quiet=2.5),  # the music, then the apology after a gap
            say("no thanks goodbye"),
            WaitForHangup(timeout=30),
        ]
        result = await ask_for_a_person(server, twilio, then)
        callee = person_call(twilio)
        await callee.wait_finished(timeout=30)

    caller_sid = result.call_sid
    assert server.bot_lines(callee.sid)[-1] == DECLINED_LINE
    lines = server.bot_lines(caller_sid)
    assert lines[:3] == [dialin_opening("support"), WARM_PHRASE, DECLINED_PHRASE], lines
    assert lines[-1] == shipped_agent("support").goodbye  # the conversation went on
    assert not twilio.conferences.get(f"transfer-{caller_sid}")  # never moved
    record = await closed_record(server, caller_sid, ADMIN_KEY)
    assert record["transfer_result"] == DECLINED and record["end_reason"] == "bot ended"


async def test_a_person_who_never_answers_is_given_up_on_after_the_ring_time(server, person):
    async with person("no-answer") as twilio:
        # 2.5 s of quiet: the hold line, the music and the apology are one wait, even where
        # a loaded machine leaves a second of silence between them (a caller answering in
        # such a gap speaks on hold, muted, and the bot never hears a goodbye).
        then = [WaitForBot(timeout=60, quiet=2.5), say("no thanks goodbye"),
                WaitForHangup(timeout=30)]  # fmt: skip
        result = await ask_for_a_person(server, twilio, then)
        callee = person_call(twilio)

    assert callee.status == "no-answer"
    lines = server.bot_lines(result.call_sid)
    assert lines[:3] == [dialin_opening("support"), WARM_PHRASE, DECLINED_PHRASE], lines
    record = await closed_record(server, result.call_sid, ADMIN_KEY)
    assert record["transfer_result"] == "no-answer"
    (entry,) = [line for line in record["transcript"] if line["kind"] == "transfer"]
    assert entry["data"]["answered_after_s"] is None
    assert 5 <= entry["data"]["decided_after_s"] < 25  # the ring time, not our 55 s wait


async def test_a_caller_who_hangs_up_on_hold_stops_the_persons_phone_ringing(server, person):
    async with person("no-answer") as twilio:
        dial = await dial_in(
            f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
            query={"session_type": "support"}, from_=CALLER, to=OUR_NUMBER,
        )  # fmt: skip
        caller = dial.caller()
        twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
        script = [WaitForBot(timeout=20), say(ASK_FOR_A_PERSON), WaitForHangup(timeout=60)]
        on_hold = asyncio.create_task(caller.run(script, check=False))
        callee = await twilio.wait_for_call(timeout=30)  # the person's phone rings
        caller.request_hangup("the caller hung up on hold", "caller")
        await on_hold
        await callee.wait_ended(timeout=10)

    # Hung up by the server (Status=completed) before Twilio's 5 s ring time gave up on it.
    assert callee.to == PERSON and callee.status == "completed"
    assert [r.form.get("Status") for r in twilio.requests if callee.sid in r.path] == ["completed"]
    record = await closed_record(server, dial.call_sid, ADMIN_KEY)
    assert record["transfer_result"] == "caller hung up"
    assert record["end_reason"] == "caller hung up"


async def test_the_transfer_parameters_are_the_servers_own(server):
    sid = "CA" + "3" * 32
    async with httpx.AsyncClient(timeout=10) as client:
        dialout = await client.post(
            f"{server.base_url}/dialout",
            json={"to": "+15551234567", "parameters": {TRANSFER_OF_PARAMETER: sid}},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
        url = f"{server.base_url}/?{TRANSFER_OF_PARAMETER}={sid}"
        form = voice_webhook_form(call_sid=new_call_sid(), from_=CALLER, to=OUR_NUMBER,
                                  account_sid=ACCOUNT_SID)  # fmt: skip
        dial_in = await client.post(url, data=form, headers=signed_headers(AUTH_TOKEN, url, form))
        url = f"{server.base_url}/status?{TRANSFER_OF_PARAMETER}=not-a-sid"
        status = {"CallSid": "CA" + "4" * 32, "CallStatus": "no-answer"}
        signed = signed_headers(AUTH_TOKEN, url, status)
        callback = await client.post(url, data=status, headers=signed)
    assert dialout.status_code == 422
    assert dialout.json()["field"] == f"parameters.{TRANSFER_OF_PARAMETER}"
    assert dial_in.status_code == 422
    assert dial_in.json()["field"] == f"query.{TRANSFER_OF_PARAMETER}"
    assert callback.status_code == 422
    assert callback.json()["field"] == f"query.{TRANSFER_OF_PARAMETER}"


async def test_the_duration_limit_on_hold_calls_the_transfer_off(tmp_path):
    """The limit is reached while the caller holds: the music stops, the person's phone
    stops ringing, the caller hears the limit's closing line and the call ends."""
    rest_port = free_port()
    env = server_env(
        rest_port, ADMIN_API_KEY=ADMIN_KEY, DATABASE_URL=f"sqlite:///{tmp_path / 'calls.db'}",
        TRANSFER_TARGET=PERSON, TRANSFER_MODE="warm", TRANSFER_RING_TIMEOUT_S="60",
        MAX_CALL_DURATION_S="20",
    )  # fmt: skip
    live = LiveServer(env, tmp_path)
    try:
        callees = CalleeBook({PERSON: "no-answer"}, rule=None)
        async with twilio_for(live, rest_port, callees=callees) as twilio:
            result = await ask_for_a_person(live, twilio, [WaitForHangup(timeout=60)])
            callee = person_call(twilio)
            await callee.wait_ended(timeout=10)
            caller = twilio.calls[result.call_sid]
        record = await closed_record(live, result.call_sid, ADMIN_KEY)
        lines = live.bot_lines(result.call_sid)
    finally:
        live.stop()

    assert callee.status == "completed"  # hung up by us, long before its 60 s ring time
    # ... before the closing line, not once the call is over
    assert caller.end_time is not None and callee.end_time is not None
    assert (caller.end_time - callee.end_time).total_seconds() > 1.0
    assert lines[-2:] == [WARM_PHRASE, SETTINGS["duration_limit_phrase"].default], lines
    assert record["end_reason"] == "duration limit"
    assert record["transfer_result"] == "call ended"
