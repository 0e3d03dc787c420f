"""Graceful shutdown: SIGTERM takes no new calls, lets live ones finish within the grace
period, then says goodbye on the rest and exits 0; a second signal exits at once.

The drain logic is tested in-process (fast, exact); the signal handling, the goodbye and
the exit status against the real `python server.py` with an emulated call.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from defusedxml import ElementTree
from fastapi.testclient import TestClient

from phonebot.agents.agent import opening_line
from phonebot.config import Settings
from phonebot.emulator import CallEvent, Hangup, Pause, WaitForBot, WaitForHangup, dial_in
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import voice_webhook_form
from phonebot.state import CallAdmission, MemoryState
from phonebot.state.admission import STREAM_WAIT_S
from phonebot.twilio.twiml import BUSY_MESSAGE
from phonebot.web.app import create_app
from phonebot.web.services import app_services
from phonebot.web.shutdown import ActiveCalls, Drain
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer
from tests.test_abuse import (
    fake_pipeline,
    live_servers,
    minted_parameters,
    open_stream,
    signed_post,
    stream_token,
    twiml_children,
    webhook_form,
)
from tests.test_call_control import assert_hung_up_after_playout
from tests.test_calls import CALLER, OUR_NUMBER

SHUTDOWN_PHRASE = Settings.model_fields["shutdown_phrase"].default
GENERAL = shipped_agent("general")
OPENING = opening_line(GENERAL, {"caller_id": CALLER})


@pytest.fixture
def calls_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fake_pipeline(monkeypatch)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Callable]:
    async with live_servers(tmp_path) as start:
        yield start


# --- in-process: what draining refuses, and the drain's timing --------------------


def test_while_draining_new_calls_are_refused_but_answered_ones_connect(calls_run):
    app = create_app(make_settings())
    client = TestClient(app)
    answered, stranger = webhook_form(), webhook_form()
    token = stream_token(signed_post(client, "/", answered))

    app_services(app).admission.start_draining()

    busy = signed_post(client, "/", webhook_form())
    assert twiml_children(busy) == ["Say", "Hangup"]
    assert ElementTree.fromstring(busy.text).find("Say").text == BUSY_MESSAGE
    dialout = client.post("/dialout", json={"to": "+15551234567"},
                          headers={"Authorization": f"Bearer {DIALOUT_KEY}"})
    assert dialout.status_code == 503
    assert "shutting down" in dialout.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "draining" and health.json()["draining"] is True
    # A stream we never answered is refused; the call we answered before the signal connects.
    stranger_stream = minted_parameters(
        stranger["CallSid"], app_services(app).settings.stream_token_secret
    )
    assert open_stream(client, stranger["CallSid"], stranger_stream) == 1008
    assert open_stream(client, answered["CallSid"], token) == 1000
    assert calls_run == [answered["CallSid"]]


class FakeCall:
    """A live call that ends as soon as it is told to say goodbye."""

    def __init__(self, call_sid: str, admission: CallAdmission, calls: ActiveCalls):
        self.call_sid, self.admission, self.calls = call_sid, admission, calls
        self.told: list[tuple[str, float]] = []
        self._release: asyncio.Task | None = None

    async def start(self) -> FakeCall:
        assert await self.admission.admit_stream(self.call_sid) is None
        self.calls.add(self.call_sid, self)  # type: ignore[arg-type]
        return self

    def hang_up(self) -> None:
        self.calls.discard(self.call_sid)
        self._release = asyncio.create_task(self.admission.release(self.call_sid))

    async def end_for_shutdown(self, phrase: str, playout_timeout_s: float) -> None:
        self.told.append((phrase, playout_timeout_s))
        self.hang_up()


async def test_the_drain_says_goodbye_only_to_calls_still_up_after_the_grace_period():
    settings = make_settings(
        shutdown_grace_s=0.5, shutdown_phrase="Bye now.", shutdown_goodbye_timeout_s=2
    )
    admission, calls = CallAdmission(MemoryState(), settings), ActiveCalls()
    lingering = await FakeCall("CA" + "1" * 32, admission, calls).start()
    leaving = await FakeCall("CA" + "2" * 32, admission, calls).start()
    asyncio.get_running_loop().call_later(0.1, leaving.hang_up)

    started = time.monotonic()
    await Drain(settings, admission, calls).run()
    elapsed = time.monotonic() - started

    assert admission.draining
    assert lingering.told == [("Bye now.", 2)]
    assert leaving.told == []
    assert 0.5 <= elapsed < 2.0
    assert admission.in_use_here() == 0


async def test_the_drain_ends_as_soon_as_the_last_call_does():
    settings = make_settings(shutdown_grace_s=30)
    admission, calls = CallAdmission(MemoryState(), settings), ActiveCalls()
    call = await FakeCall("CA" + "1" * 32, admission, calls).start()
    asyncio.get_running_loop().call_later(0.2, call.hang_up)

    started = time.monotonic()
    await Drain(settings, admission, calls).run()

    assert time.monotonic() - started < 1.5
    assert call.told == []


async def test_the_drain_waits_for_an_answered_calls_stream_only_briefly():
    """A webhook answered just before the signal: its stream may still come, so the drain
    waits; one answered STREAM_WAIT_S ago, or reported over by Twilio, won't (the caller
    hung up): the restart does not wait out its reservation (CALL_RESERVATION_TTL_S)."""
    now = [1000.0]
    settings = make_settings(shutdown_grace_s=30, call_reservation_ttl_s=30)
    admission = CallAdmission(MemoryState(), settings, clock=lambda: now[0])
    assert await admission.reserve("CA" + "1" * 32) is None
    assert await admission.reserve("CA" + "2" * 32) is None
    admission.start_draining()
    assert not await admission.wait_idle(0.2)  # both may still stream
    await admission.call_over("CA" + "2" * 32)  # Twilio: that call is over
    assert admission.process_reserved == 1
    now[0] += STREAM_WAIT_S  # the other one's stream never came
    started = time.monotonic()
    assert await admission.wait_idle(5)
    assert time.monotonic() - started < 1


# --- the real server and a real (emulated) call ------------------------------------


async def start_call(server: LiveServer, twilio, script) -> tuple[asyncio.Task, asyncio.Event]:
    """Dial in and run `script`; the event is set once the bot's opening has been heard."""
    opened = asyncio.Event()

    def on_event(event: CallEvent) -> None:
        if event.kind == "bot_utterance":
            opened.set()

    dial = await dial_in(f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                         from_=CALLER, to=OUR_NUMBER)
    caller = dial.caller(on_event=on_event)
    twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
    call = asyncio.create_task(caller.run(script))
    await asyncio.wait_for(opened.wait(), timeout=40)
    return call, opened


async def probe_while_draining(server: LiveServer) -> tuple[httpx.Response, ...]:
    """A new caller's webhook, a dial-out and /health, sent during the grace period."""
    url = f"{server.base_url}/"
    form = voice_webhook_form(call_sid="CA" + "9" * 32, account_sid=ACCOUNT_SID, from_=CALLER,
                              to=OUR_NUMBER)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        webhook = await client.post(url, data=form, headers=signed_headers(AUTH_TOKEN, url, form))
        dialout = await client.post(f"{server.base_url}/dialout", json={"to": "+15551234567"},
                                    headers={"Authorization": f"Bearer {DIALOUT_KEY}"})
        health = await client.get(f"{server.base_url}/health")
    return webhook, dialout, health


async def test_sigterm_lets_the_call_run_its_grace_period_then_says_goodbye(live):
    server, twilio = await live(SHUTDOWN_GRACE_S="2", SILENCE_TIMEOUT_S="30")
    call, _ = await start_call(server, twilio, [WaitForBot(timeout=30), WaitForHangup(timeout=40)])

    server.send_signal(signal.SIGTERM)
    signalled = time.time()
    assert server.wait_for_log("SIGTERM: draining")
    webhook, dialout, health = await probe_while_draining(server)
    result = await call
    status = await asyncio.to_thread(server.wait_exit, 30)
    exited = time.time()

    assert twiml_children(webhook) == ["Say", "Hangup"]
    assert dialout.status_code == 503
    assert health.status_code == 503 and health.json()["active_calls"] == 1
    assert server.bot_lines(result.call_sid) == [OPENING, SHUTDOWN_PHRASE]
    # The goodbye is two sentences, synthesised one by one: on a busy machine a pause
    # between them can split it into two heard utterances, so it is what starts after the
    # signal, and nothing may start in the grace period.
    starts = [round(result.started_at + u.start - signalled, 2) for u in result.bot_utterances]
    after_signal = [start for start in starts if start > 0]
    assert after_signal, f"no goodbye was heard (utterances start at {starts} s from SIGTERM)"
    assert after_signal[0] >= 2 - 0.3, f"the goodbye came in the grace period: {starts}"
    assert_hung_up_after_playout(result, twilio)
    assert status == 0
    assert exited - signalled < 2 + 10 + 8
    for line in ("grace period over; saying goodbye on 1 call(s)", "(server shutdown)",
                 "Finished server process"):
        assert server.wait_for_log(line), line
    assert server.error_lines() == []


async def test_a_call_that_ends_during_the_grace_period_lets_the_server_exit_early(live):
    server, twilio = await live(SHUTDOWN_GRACE_S="30", SILENCE_TIMEOUT_S="30")
    call, _ = await start_call(server, twilio, [WaitForBot(timeout=30), Pause(1.0), Hangup()])

    server.send_signal(signal.SIGTERM)
    signalled = time.time()
    result = await call
    status = await asyncio.to_thread(server.wait_exit, 20)

    assert status == 0
    assert time.time() - signalled < 10, "the server waited for the grace period anyway"
    assert len(result.bot_utterances) == 1, "a goodbye was said to a call that ended itself"
    assert server.bot_lines(result.call_sid) == [OPENING]
    assert server.wait_for_log("(caller hung up)")
    assert server.wait_for_log("Shutdown: no calls left")
    assert not any("saying goodbye" in line for line in server.logs)
    assert server.error_lines() == []


async def test_a_second_signal_exits_at_once(live):
    server, twilio = await live(SHUTDOWN_GRACE_S="60", SILENCE_TIMEOUT_S="30")
    call, _ = await start_call(server, twilio, [WaitForHangup(timeout=60)])

    server.send_signal(signal.SIGTERM)
    assert server.wait_for_log("SIGTERM: draining")
    server.send_signal(signal.SIGTERM)
    signalled = time.time()
    status = await asyncio.to_thread(server.wait_exit, 15)
    result = await call

    assert status == 1
    assert time.time() - signalled < 5
    assert server.wait_for_log("SIGTERM again: exiting now, cutting off 1 call(s)")
    assert result.close is not None and result.close.by == "server"
    assert len(result.bot_utterances) == 1, "no goodbye: the second signal cuts calls off"
