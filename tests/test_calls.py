"""Whole calls, end to end: the real server, the Twilio emulator, the offline engines.

Nothing in the pipeline is a test double: `python server.py` runs with no AI keys, so its
STT, responder and TTS are the offline engines. The emulator is Twilio: it rings the
webhook (signed), streams 20 ms μ-law frames in real time, answers marks, honours clears,
and plays the Twilio REST API on loopback for dial-out and hang-up. What the bot said is
read from the server's log: each text the bot handed to its TTS (`LiveServer.bot_lines`,
phonebot.call.bot_speech), exactly, while the audio checks say that speech reached the caller.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from phonebot.agents.agent import opening_line
from phonebot.emulator import (
    CallResult,
    Dtmf,
    Hangup,
    MediaStreamCaller,
    Pause,
    Speak,
    Step,
    TwilioRestEmulator,
    WaitForBot,
    dial_in,
)
from phonebot.emulator.caller_voice import caller_pcm
from phonebot.ops.cores import usable_cores
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, shipped_agent
from tests.live_server import (  # noqa: F401 (CALLER, OUR_NUMBER, server_env: re-exported)
    CALLER,
    OUR_NUMBER,
    LiveServer,
    free_port,
    server_env,
)


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(rest_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(server_env(rest_port), tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


@pytest.fixture
async def twilio(server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    emulator = TwilioRestEmulator(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        port=rest_port,
        local_server_url=server.base_url,
    )
    async with emulator:
        yield emulator


def say(text: str) -> Speak:
    """The caller says `text` in the emulator's caller voice (Piper's joe, deterministic)."""
    return Speak(caller_pcm(text, 8000), 8000, text)


def dialin_opening(persona: str) -> str:
    """What a dial-in persona greets CALLER with."""
    return opening_line(shipped_agent(persona), {"caller_id": CALLER})


def assert_real_phone_audio(result: CallResult) -> None:
    """Bot audio came as media for our streamSid, decoded to non-silent 8 kHz speech."""
    assert result.streamsid_mismatches == 0
    assert result.bot_audio_received > 1.0  # seconds of bot audio
    samples = np.frombuffer(result.bot_utterances[0].pcm, dtype=np.int16)
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300


async def call_in(server: LiveServer, twilio: TwilioRestEmulator, script, **query) -> CallResult:
    dial = await dial_in(
        f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, query=query,
        from_=CALLER, to=OUR_NUMBER,
    )
    caller: MediaStreamCaller = dial.caller()
    twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
    return await caller.run(script)


def assert_call_ended_cleanly(server: LiveServer, call_sid: str) -> None:
    assert server.wait_for_log(f"Call {call_sid} ended", timeout_s=10), server.log_text()[-3000:]
    assert server.error_lines() == []
    assert not [line for line in server.logs if "dangling" in line.lower()]
    assert AUTH_TOKEN not in server.log_text()
    assert not re.search(r"[0-9a-f]{64}", server.log_text()), "a full stream token was logged"


def test_with_no_keys_the_server_runs_offline_and_says_so(server):
    assert any("offline mode" in line and "STT=offline" in line for line in server.logs)
    assert server.health()["offline"] is True


def test_the_server_runs_on_uvloop(server):
    """uvicorn's C event loop (server.py): the asyncio one cost ~13 % more CPU at 40 calls."""
    assert any("Event loop: uvloop.Loop" in line for line in server.logs), server.log_text()


def test_the_server_says_how_many_cores_its_inference_pools_use(server):
    """Fewer than the machine's in a container with a CPU limit (phonebot.ops.cores)."""
    said = [re.search(r"Cores usable: (\d+) of the machine's (\d+)", line) for line in server.logs]
    found = [match.groups() for match in said if match]
    # The server is a child of this process: same affinity, same cgroup.
    assert found == [(str(usable_cores()), str(os.cpu_count()))], server.log_text()


async def test_dialin_support_greeting_is_spoken_to_the_right_stream(server, twilio):
    result = await call_in(server, twilio, [WaitForBot(), Hangup()], session_type="support")

    assert_real_phone_audio(result)
    assert server.bot_lines(result.call_sid) == [dialin_opening("support")]
    assert "calling from the number ending in 4 3 2 1" in dialin_opening("support")
    assert_call_ended_cleanly(server, result.call_sid)
    assert server.health()["active_streams"] == 0


async def test_a_question_from_the_keyword_table_gets_its_answer(server, twilio):
    support = shipped_agent("support")
    script = [WaitForBot(), say("my order has not arrived"), WaitForBot(timeout=15), Hangup()]
    result = await call_in(server, twilio, script, session_type="support")

    order = next(entry.answer for entry in support.answers if "order" in entry.keywords)
    assert len(result.bot_utterances) >= 2  # the greeting and the answer reached the caller
    assert server.bot_lines(result.call_sid) == [dialin_opening("support"), order]
    assert "order number" in order
    assert result.latencies and result.latencies[-1] is not None
    assert_call_ended_cleanly(server, result.call_sid)


async def test_keypad_digits_reach_the_bot(server, twilio):
    script = [WaitForBot(), Dtmf("42#"), WaitForBot(timeout=8), Hangup()]
    result = await call_in(server, twilio, script)

    assert len(result.bot_utterances) >= 2
    lines = server.bot_lines(result.call_sid)
    assert lines == [dialin_opening("general"), "You pressed 4 2 pound."]


def barge_in_script() -> list[Step]:
    """The caller talks over the bot's greeting, then waits for its answer."""
    return [
        WaitForBot(until="speech"),
        Pause(0.6),
        say("wait wait I have a question about my order"),
        WaitForBot(timeout=15),
        Hangup(),
    ]


async def test_talking_over_the_bot_clears_twilio_playback(server, twilio):
    script = barge_in_script()
    result = await call_in(server, twilio, script)

    # The clear that answered the caller's speech (earlier ones, if any, came before it).
    barge = next((c for c in result.clears if c.caller_onset is not None), None)
    assert barge is not None, f"no clear after the caller spoke over the bot: {result.clears}"
    greeting = result.bot_utterances[0]
    assert greeting.start < barge.caller_onset < barge.t
    # The bot was audibly talking, Twilio's buffer held its reply, and the clear emptied it:
    # the caller hears nothing of the bot from the clear until the caller's speech ends.
    assert bot_rms(result, barge.t - 0.2, barge.t) > 300, "the bot was not talking"
    assert barge.dropped > 0.02, f"no queued bot audio was dropped: {barge}"
    speech_end = next(end for start, end in result.caller_segments if start <= barge.t < end)
    assert bot_rms(result, barge.t, speech_end) < 50, "the caller heard the bot after clear"
    # Nothing of the interrupted reply after the clear (Twilio would play it) ...
    assert barge.late_media == 0, f"{barge.late_audio:.2f} s of bot audio came after clear"
    # ... and the clear within 250 ms of the caller's onset (Pipecat's defaults: ~0.39 s).
    assert barge.delay is not None and barge.delay <= 0.25, f"clear {barge.delay:.3f} s late"
    assert len(result.bot_utterances) >= 2, "the bot did not answer after the barge-in"


def bot_rms(result: CallResult, start: float, end: float) -> float:
    """RMS of the bot's audio as the caller heard it (after clears) in [start, end) s."""
    samples = result.bot_audio[int(start * 8000) : int(end * 8000)].astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def test_stop_ends_the_pipeline_with_nothing_left_running(server, twilio):
    result = await call_in(server, twilio, [WaitForBot(until="speech"), Hangup(send_stop=True)])
    assert_call_ended_cleanly(server, result.call_sid)
    assert server.health()["active_streams"] == 0
    # The call's end event: CallSid, duration, reason, direction, parameters sans token.
    end = re.compile(
        rf"Call {result.call_sid} ended after \d+\.\d s \(caller hung up\): inbound, "
        r"parameters=\{'caller_id': '\+15557654321', 'called_number': '\+15550001111', "
        r"'call_type': 'inbound'\}$"
    )
    assert any(end.search(line) for line in server.logs), server.log_text()[-2000:]


async def dialout(server: LiveServer, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(
            f"{server.base_url}/dialout",
            json=body,
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )


async def test_dialout_carries_the_campaign_and_opens_with_its_pitch(server, twilio):
    async def callee(call, caller: MediaStreamCaller):
        call.result = await caller.run([say("hello?"), WaitForBot(timeout=15), Hangup()])

    twilio.on_answer = callee
    campaign = {"campaign_id": "summer_sale", "customer_id": "c-42"}
    response = await dialout(server, {"to": "+15551234567", "parameters": campaign})

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["to"] == "+15551234567"
    call = await twilio.wait_for_call()
    assert call.sid == created["call_sid"]
    await call.wait_finished(timeout=40)
    assert call.exception is None
    parameters = call.twiml.stream.parameters
    assert parameters["campaign_id"] == "summer_sale"
    assert parameters["customer_id"] == "c-42"
    assert parameters["call_type"] == "outbound"
    assert parameters["token"]
    pitch = opening_line(shipped_agent("summer_sale"), parameters)
    assert call.result.bot_utterances
    assert server.bot_lines(call.sid) == [pitch]
    assert_call_ended_cleanly(server, call.sid)


async def test_dialout_opens_anyway_when_the_callee_stays_silent(server, twilio):
    async def callee(call, caller: MediaStreamCaller):
        call.result = await caller.run([WaitForBot(timeout=10), Hangup()])

    twilio.on_answer = callee
    campaign = {"campaign_id": "summer_sale"}
    response = await dialout(server, {"to": "+15551234567", "parameters": campaign})
    assert response.status_code == 201
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=30)
    first = call.result.bot_utterances[0]
    assert 2.5 < first.start < 6.0, f"bot opened at {first.start:.2f} s"
    pitch = opening_line(shipped_agent("summer_sale"), call.twiml.stream.parameters)
    assert server.bot_lines(call.sid) == [pitch]


async def test_a_twilio_rest_error_comes_back_as_502_with_its_code(server, twilio):
    twilio.inject_fault(400, code=21211, message="Invalid 'To' Phone Number", on="create")
    response = await dialout(server, {"to": "+15551234567"})
    assert response.status_code == 502
    assert response.json()["code"] == 21211
    assert "Invalid 'To' Phone Number" in response.json()["message"]
    assert "Traceback" not in response.text


async def test_save_recording(tmp_path: Path, server, twilio):
    result = await call_in(server, twilio, [WaitForBot(until="speech"), Pause(1), Hangup()])
    path = result.save_wav(tmp_path / "call.wav")
    assert path.stat().st_size > 8000


async def test_two_calls_at_once_each_get_their_own_persona(server, twilio):
    support, sales = await asyncio.gather(
        call_in(server, twilio, [WaitForBot(), Hangup()], session_type="support"),
        call_in(server, twilio, [WaitForBot(), Hangup()], session_type="sales"),
    )
    assert support.bot_utterances and sales.bot_utterances
    assert server.bot_lines(support.call_sid) == [dialin_opening("support")]
    assert server.bot_lines(sales.call_sid) == [dialin_opening("sales")]
