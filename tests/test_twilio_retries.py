"""Twilio REST failures on dial-out, transfer and hang-up, against the real `twilio` client
and the REST emulator's injected faults (5xx, 429 with Retry-After, stalls, dropped
connections) or a port nothing answers on.

Hang-up and transfer are safe to repeat and are retried within a bound; a dial-out is
retried only when Twilio was never reached, and otherwise fails at once with a 502 that
says whether the call may have been placed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from defusedxml import ElementTree
from pipecat.frames.frames import EndFrame
from pipecat.serializers.twilio import TwilioFrameSerializer

import dialout
from phonebot.config import get_settings
from phonebot.emulator import TwilioRestEmulator, WaitForBot, WaitForHangup
from phonebot.emulator.ids import new_call_sid
from phonebot.twilio.rest import (
    RetryPolicy,
    TwilioAccount,
    TwilioUnavailable,
    hang_up_call,
    update_call_twiml,
)
from phonebot.twilio.stream import TwilioMarkSerializer
from phonebot.twilio.transfer import dial_twiml
from phonebot.web.app import create_app
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings
from tests.live_server import free_port
from tests.test_call_control import hangups, phone  # noqa: F401
from tests.test_calls import CALLER, OUR_NUMBER, call_in

# Real attempts and timeouts, tiny waits between them: the tests stay fast.
FAST = RetryPolicy(attempts=3, timeout_s=2.0, base_delay_s=0.01, max_delay_s=0.05)
TO = "+15551234567"


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioRestEmulator]:
    # Nothing listens on `local_server_url`: a created call's answer fails at once and
    # quietly, leaving the recorded requests to inspect.
    closed = f"http://127.0.0.1:{free_port()}"
    async with TwilioRestEmulator(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, local_server_url=closed
    ) as emulator:
        yield emulator


def live_call(twilio: TwilioRestEmulator) -> str:
    """A call in progress that the emulator knows, as after a dial-in."""
    call_sid = new_call_sid()
    twilio.register_call(call_sid, to=OUR_NUMBER, from_=CALLER)
    return call_sid


def account(twilio: TwilioRestEmulator) -> TwilioAccount:
    return TwilioAccount(ACCOUNT_SID, AUTH_TOKEN, twilio.base_url)


def requests_on(twilio: TwilioRestEmulator, call_sid: str) -> list:
    return [r for r in twilio.requests if r.path.endswith(f"/Calls/{call_sid}.json")]


def creates(twilio: TwilioRestEmulator) -> list:
    return [r for r in twilio.requests if r.path.endswith("/Calls.json") and r.method == "POST"]


def retries(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("WARNING") and "retrying in" in line]


# --- the policy -------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_with_jitter_around_it():
    steady = RetryPolicy(base_delay_s=0.25, max_delay_s=2.0, jitter=0)
    assert [steady.backoff(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    jittery = RetryPolicy(base_delay_s=0.25, max_delay_s=2.0, jitter=0.5)
    delays = [jittery.backoff(2) for _ in range(200)]
    assert all(0.25 <= d <= 0.75 for d in delays)
    assert len(set(delays)) > 100, "no jitter: calls that failed together retry in step"


def test_retry_settings_reach_the_policy():
    policy = RetryPolicy.from_settings(
        make_settings(twilio_rest_attempts=5, twilio_rest_timeout_s=4)
    )
    assert (policy.attempts, policy.timeout_s, policy.connect_timeout_s) == (5, 4, 2)


# --- hang-up ------------------------------------------------------------------------------


async def test_hang_up_goes_through_on_the_third_attempt_after_two_503s(twilio, logs):
    call_sid = live_call(twilio)
    twilio.inject_fault(503, count=2, on="update")

    assert await hang_up_call(account(twilio), call_sid, policy=FAST) is True

    attempts = requests_on(twilio, call_sid)
    assert [(r.form["Status"], r.status) for r in attempts] == [
        ("completed", 503), ("completed", 503), ("completed", 200)
    ]
    assert twilio.calls[call_sid].status == "completed"
    warnings = retries(logs)
    assert len(warnings) == 2
    assert "hang-up of call …" in warnings[0] and "attempt 1/3" in warnings[0]
    assert "HTTP 503" in warnings[0] and "attempt 2/3" in warnings[1]
    assert not [line for line in logs if call_sid in line], "the CallSid was logged unmasked"
    assert not [line for line in logs if AUTH_TOKEN in line]


async def test_hang_up_gives_up_after_its_bound_and_says_so(twilio, logs):
    call_sid = live_call(twilio)
    stalling = RetryPolicy(attempts=3, timeout_s=0.3, base_delay_s=0.01, max_retry_after_s=0)
    twilio.inject_fault(500, delay=1.0, on="update")  # the first attempt times out
    twilio.inject_fault(500, count=10, on="update")

    started = time.monotonic()
    assert await hang_up_call(account(twilio), call_sid, policy=stalling) is False
    assert time.monotonic() - started < stalling.worst_case_s

    assert len(requests_on(twilio, call_sid)) == stalling.attempts
    errors = [line for line in logs if line.startswith("ERROR")]
    assert len(errors) == 1
    assert "hang-up of call …" in errors[0] and "after 3 attempts" in errors[0]
    assert twilio.calls[call_sid].status == "in-progress"


async def test_hang_up_of_a_call_that_already_ended_is_done_at_once(twilio, logs):
    gone = new_call_sid()  # unknown to Twilio: 404, code 20404

    assert await hang_up_call(account(twilio), gone, policy=FAST) is True

    assert [r.status for r in requests_on(twilio, gone)] == [404]
    assert not retries(logs)
    assert not [line for line in logs if line.startswith("ERROR")]


async def test_hang_up_is_retried_after_a_dropped_connection_and_a_stall(twilio):
    call_sid = live_call(twilio)
    twilio.inject_fault(None, reset=True, on="update")
    twilio.inject_fault(503, delay=1.0, on="update")  # answered after the client gave up
    stalling = RetryPolicy(attempts=3, timeout_s=0.4, base_delay_s=0.01)

    assert await hang_up_call(account(twilio), call_sid, policy=stalling) is True

    # 0: dropped without an answer; the stalled one is recorded once it is answered.
    await asyncio.sleep(0.8)
    assert sorted(r.status for r in requests_on(twilio, call_sid)) == [0, 200, 503]
    assert twilio.calls[call_sid].status == "completed"


async def test_a_429_retry_after_is_honoured_and_a_long_one_ends_the_retries(twilio):
    call_sid = live_call(twilio)
    twilio.inject_fault(429, retry_after=0.6, on="update")
    started = time.monotonic()
    assert await hang_up_call(account(twilio), call_sid, policy=FAST) is True
    assert time.monotonic() - started >= 0.6  # not FAST's 0.01 s

    other = live_call(twilio)
    twilio.inject_fault(429, retry_after=60, count=3, on="update")
    assert await hang_up_call(account(twilio), other, policy=FAST) is False
    assert len(requests_on(twilio, other)) == 1


async def test_the_serializer_hangs_up_through_the_retry_path(twilio):
    """The end-of-call hang-up (the pipeline's EndFrame) survives a Twilio 500."""
    call_sid = live_call(twilio)
    serializer = TwilioMarkSerializer(
        stream_sid="MZ" + "0" * 32,
        call_sid=call_sid,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        base_url=twilio.base_url,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=True),
    )
    serializer.rest_policy = FAST
    twilio.inject_fault(500, on="update")

    assert await serializer.serialize(EndFrame()) is None

    assert [r.status for r in requests_on(twilio, call_sid)] == [500, 200]
    assert twilio.calls[call_sid].status == "completed"


async def test_a_failing_hang_up_does_not_leave_the_caller_on_the_line(phone):  # noqa: F811
    """The real server: its REST hang-up keeps failing, the call still ends on time.

    TWILIO_REST_ATTEMPTS reaches the serializer: exactly that many hang-up requests.
    """
    server, twilio = await phone(
        PIPELINE_IDLE_TIMEOUT_S="3", SILENCE_TIMEOUT_S="60", TWILIO_REST_ATTEMPTS="2"
    )
    twilio.inject_fault(503, count=10, on="update")
    result = await call_in(server, twilio, [WaitForBot(), WaitForHangup(timeout=20)])

    assert result.ended_by == "server"
    assert await asyncio.to_thread(server.wait_for_log, f"Call {result.call_sid} ended")
    assert await asyncio.to_thread(server.wait_for_log, "after 2 attempts")
    assert len(hangups(twilio, result.call_sid)) == 2
    assert AUTH_TOKEN not in server.log_text()


# --- transfer -------------------------------------------------------------------------------


async def test_a_transfer_is_retried_on_5xx(twilio):
    call_sid = live_call(twilio)
    twilio.inject_fault(502, count=2, on="update")
    settings = make_settings(twilio_api_base_url=twilio.base_url)

    await update_call_twiml(settings, call_sid, dial_twiml("+15559990000"), policy=FAST)

    attempts = requests_on(twilio, call_sid)
    assert [r.status for r in attempts] == [502, 502, 200]
    dial = ElementTree.fromstring(attempts[-1].form["Twiml"]).find("./Dial/Number")
    assert dial is not None and dial.text == "+15559990000"
    assert twilio.calls[call_sid].dialed == ["+15559990000"]


async def test_a_transfer_twilio_refuses_is_not_repeated(twilio):
    call_sid = live_call(twilio)
    twilio.inject_fault(400, code=21220, message="Call is not in-progress", on="update")
    settings = make_settings(twilio_api_base_url=twilio.base_url)

    with pytest.raises(TwilioUnavailable) as error:
        await update_call_twiml(settings, call_sid, dial_twiml("+15559990000"), policy=FAST)

    assert error.value.code == 21220
    assert len(requests_on(twilio, call_sid)) == 1


# --- dial-out through POST /dialout --------------------------------------------------------


async def post_dialout(base_url: str, **settings) -> tuple[httpx.Response, float]:
    """POST /dialout to the server app (in this process) using TWILIO_API_BASE_URL=base_url."""
    app = create_app(make_settings(twilio_api_base_url=base_url, **settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        started = time.monotonic()
        response = await client.post(
            "/dialout", json={"to": TO}, headers={"Authorization": f"Bearer {DIALOUT_KEY}"}
        )
    return response, time.monotonic() - started


async def test_a_dial_out_answered_503_is_not_repeated_and_was_not_placed(twilio):
    twilio.inject_fault(503, count=3, on="create")

    response, _ = await post_dialout(twilio.base_url)

    assert response.status_code == 502
    assert len(creates(twilio)) == 1
    body = response.json()
    assert body["code"] == 503
    assert body["call_may_have_been_placed"] is False
    assert body["detail"] == "Twilio is unavailable (HTTP 503); the call was not placed"
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("fault", "what"),
    [
        ({"status": 500}, "Twilio failed (HTTP 500)"),
        ({"status": None, "reset": True}, "the connection to Twilio broke before its answer"),
    ],
)
async def test_a_dial_out_that_may_have_reached_twilio_is_not_repeated(twilio, fault, what):
    twilio.inject_fault(count=3, on="create", **fault)

    response, _ = await post_dialout(twilio.base_url)

    assert response.status_code == 502
    assert len(creates(twilio)) == 1
    body = response.json()
    assert body["call_may_have_been_placed"] is True
    assert body["detail"].startswith(what)
    assert body["detail"].endswith(
        "the call may have been placed: check the Twilio console before retrying"
    )


async def test_a_dial_out_twilio_does_not_answer_in_time_fails_once_within_the_timeout(twilio):
    # Twilio is slow but acts: the call exists although the client gave up on it.
    twilio.inject_fault(None, delay=1.5, on="create")

    response, elapsed = await post_dialout(twilio.base_url, twilio_rest_timeout_s=0.5)

    assert response.status_code == 502
    assert 0.5 <= elapsed < 1.4
    body = response.json()
    assert body["detail"] == (
        "Twilio did not answer within 0.5 s; the call may have been placed: check the Twilio "
        "console before retrying"
    )
    assert body["call_may_have_been_placed"] is True
    await twilio.wait_for_call(timeout=5)  # ...which is why it must not be repeated
    assert len(creates(twilio)) == 1


async def test_a_dial_out_that_cannot_reach_twilio_is_retried_then_502(logs):
    closed = f"http://127.0.0.1:{free_port()}"

    response, elapsed = await post_dialout(closed)

    assert response.status_code == 502
    body = response.json()
    assert body["call_may_have_been_placed"] is False
    assert body["detail"].startswith("Twilio's REST API could not be reached")
    assert body["detail"].endswith("after 3 attempts; the call was not placed")
    warnings = retries(logs)
    assert len(warnings) == 2 and "dial-out to …4567" in warnings[0]
    assert elapsed < 5


# --- dial-out from the command line --------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point `dialout.py`'s settings (read from the environment) at `base_url`."""

    def point_at(base_url: str) -> None:
        for name, value in {
            "PUBLIC_URL": "https://bot.example.com",
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_PHONE_NUMBER": OUR_NUMBER,
            "TWILIO_API_BASE_URL": base_url,
            "TWILIO_REST_TIMEOUT_S": "0.5",
        }.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield point_at
    get_settings.cache_clear()


def test_the_cli_says_the_call_was_not_placed_when_twilio_is_unreachable(cli_env, capsys):
    cli_env(f"http://127.0.0.1:{free_port()}")

    assert dialout.main([TO]) == 1

    error = capsys.readouterr().err
    assert error.startswith("error: Twilio's REST API could not be reached")
    assert "the call was not placed" in error


def test_the_cli_exits_3_when_the_call_may_have_been_placed(cli_env, capsys):
    # A port that accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cli_env(f"http://127.0.0.1:{silent.getsockname()[1]}")

        assert dialout.main([TO]) == dialout.EXIT_MAYBE_PLACED

    error = capsys.readouterr().err
    assert "Twilio did not answer within 0.5 s; the call may have been placed" in error
