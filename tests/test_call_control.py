"""Call control through the emulator: silence, the bot hanging up, limits, capacity.

Each test starts `python server.py` with the settings it exercises (short timeouts), so
the behaviour is the real server's, on real time, with the offline engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from defusedxml import ElementTree

from phonebot.config import Settings
from phonebot.emulator import (
    CallResult,
    Dtmf,
    Hangup,
    Pause,
    TwilioRestEmulator,
    WaitForBot,
    WaitForHangup,
)
from phonebot.emulator.ids import new_call_sid
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import voice_webhook_form
from phonebot.twilio.twiml import BUSY_MESSAGE
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, shipped_agent
from tests.live_server import LiveServer, free_port
from tests.test_calls import CALLER, OUR_NUMBER, call_in, dialin_opening, say, server_env


@pytest.fixture
async def phone(tmp_path: Path) -> AsyncIterator[Callable]:
    """Start servers with extra settings; each gets a Twilio REST emulator of its own."""
    started: list[tuple[LiveServer, TwilioRestEmulator]] = []

    async def start(**settings: str) -> tuple[LiveServer, TwilioRestEmulator]:
        rest_port = free_port()
        server = LiveServer(server_env(rest_port, **settings), tmp_path)
        twilio = TwilioRestEmulator(
            account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port,
            local_server_url=server.base_url,
        )
        await twilio.start()
        started.append((server, twilio))
        return server, twilio

    yield start
    for server, twilio in started:
        await twilio.stop()
        server.stop()


TRANSFER_PHRASE = Settings.model_fields["transfer_phrase"].default
TRANSFER_FAILED_PHRASE = Settings.model_fields["transfer_failed_phrase"].default


def hangups(twilio: TwilioRestEmulator, call_sid: str) -> list:
    return [
        r for r in twilio.requests
        if r.form.get("Status") == "completed" and r.path.endswith(f"/{call_sid}.json")
    ]


def assert_hung_up_after_playout(result: CallResult, twilio: TwilioRestEmulator) -> None:
    """The bot's last words were played before the line was closed, then REST hang-up."""
    assert len(hangups(twilio, result.call_sid)) == 1
    played = [m for m in result.marks if m.answered is not None]
    assert played, "the bot hung up without waiting for Twilio to confirm playback"
    last_words = result.bot_utterances[-1]
    assert played[-1].answered >= last_words.end
    assert result.close is not None and result.close.t >= played[-1].answered
    assert result.bot_audio_dropped == 0


async def test_silence_reprompts_twice_then_says_goodbye_and_hangs_up(phone):
    server, twilio = await phone(SILENCE_TIMEOUT_S="1.5", MAX_REPROMPTS="2")
    result = await call_in(server, twilio, [WaitForBot(), WaitForHangup(timeout=40)])

    general = shipped_agent("general")
    # greeting, the question repeated twice, goodbye
    assert len(result.bot_utterances) == 4, [u.start for u in result.bot_utterances]
    assert server.bot_lines(result.call_sid) == [
        dialin_opening("general"), general.question, general.question, general.goodbye
    ]
    assert_hung_up_after_playout(result, twilio)
    assert server.wait_for_log("(caller silent)")


async def test_a_spoken_goodbye_is_heard_in_full_before_the_hang_up(phone):
    server, twilio = await phone()
    script = [WaitForBot(), say("thanks that's all goodbye"), WaitForHangup(timeout=30)]
    result = await call_in(server, twilio, script)

    general = shipped_agent("general")
    assert len(result.bot_utterances) == 2, "the bot said more after its goodbye"
    assert server.bot_lines(result.call_sid) == [dialin_opening("general"), general.goodbye]
    assert_hung_up_after_playout(result, twilio)
    assert server.wait_for_log("(bot ended)")


async def test_the_duration_limit_ends_the_call_with_a_closing_line(phone):
    server, twilio = await phone(MAX_CALL_DURATION_S="4", SILENCE_TIMEOUT_S="30")
    result = await call_in(server, twilio, [WaitForHangup(timeout=30)])

    assert_hung_up_after_playout(result, twilio)
    assert server.wait_for_log("(duration limit)")


async def test_above_the_concurrency_cap_callers_hear_busy_and_dialout_gets_429(phone):
    server, twilio = await phone(MAX_CONCURRENT_CALLS="1")
    call = asyncio.create_task(call_in(server, twilio, [WaitForBot(timeout=15), Hangup()]))
    for _ in range(100):
        if server.health()["active_streams"] == 1:
            break
        await asyncio.sleep(0.1)

    form = voice_webhook_form(
        call_sid=new_call_sid(), from_=CALLER, to=OUR_NUMBER, account_sid=ACCOUNT_SID
    )
    url = f"{server.base_url}/"
    async with httpx.AsyncClient() as client:
        webhook = await client.post(url, data=form, headers=signed_headers(AUTH_TOKEN, url, form))
        dialout = await client.post(
            f"{server.base_url}/dialout",
            json={"to": "+15551234567"},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
    await call

    root = ElementTree.fromstring(webhook.text)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root.find("Say").text == BUSY_MESSAGE
    assert dialout.status_code == 429
    assert "MAX_CONCURRENT_CALLS" in dialout.json()["detail"]


async def test_transfer_dials_the_target_and_leaves_the_caller_connected(phone):
    server, twilio = await phone(TRANSFER_TARGET="+15559990000")
    script = [WaitForBot(), Dtmf("0"), WaitForHangup(timeout=30)]
    result = await call_in(server, twilio, script, session_type="support")

    updates = [r for r in twilio.requests if r.path.endswith(f"/{result.call_sid}.json")]
    assert [r.form.get("Status") for r in updates] == [None], "the caller was hung up"
    dial = ElementTree.fromstring(updates[0].form["Twiml"]).find("./Dial/Number")
    assert dial is not None and dial.text == "+15559990000"
    assert twilio.calls[result.call_sid].dialed == ["+15559990000"]
    assert server.bot_lines(result.call_sid) == [dialin_opening("support"), TRANSFER_PHRASE]
    assert server.wait_for_log("(transferred)")
    assert not hangups(twilio, result.call_sid)


async def test_a_failed_transfer_is_apologised_for_and_the_call_goes_on(phone):
    server, twilio = await phone(TRANSFER_TARGET="sip:desk@pbx.example.com")
    # Every try fails (TWILIO_REST_ATTEMPTS, 3): a transfer is retried on a 5xx. The
    # retries' backoff (about 1 s) is a pause between the hand-off line and the apology.
    twilio.inject_fault(500, code=20500, message="Internal Server Error", count=3, on="update")
    script = [WaitForBot(), Dtmf("0"), WaitForBot(timeout=20, quiet=2.5), Pause(2.5), Hangup()]
    result = await call_in(server, twilio, script, session_type="support")

    assert server.bot_lines(result.call_sid) == [
        dialin_opening("support"), TRANSFER_PHRASE, TRANSFER_FAILED_PHRASE
    ]
    assert result.ended_by == "caller"
    assert server.wait_for_log("Transfer of")


async def test_an_idle_pipeline_ends_the_call(phone):
    # No re-prompts within the test, so nothing is said after the greeting.
    server, twilio = await phone(PIPELINE_IDLE_TIMEOUT_S="3", SILENCE_TIMEOUT_S="60")
    result = await call_in(server, twilio, [WaitForBot(), WaitForHangup(timeout=20)])

    assert len(hangups(twilio, result.call_sid)) == 1
    assert server.wait_for_log(f"Call {result.call_sid} ended after")
    assert server.wait_for_log("(idle pipeline)")
