"""Stream tokens are bound to their call: its CallSid, its parameters and a short life.

Each test performs an attack that worked before the token carried an expiry and a hash of
its parameters (issue: "Stream tokens outlive their call"), and checks the honest call
still gets through.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from phonebot.twilio.stream_token import (
    TOKEN_PARAMETER,
    call_token,
    covered_parameters,
    verify_call_token,
)
from phonebot.web.app import create_app
from tests.conftest import make_settings
from tests.test_abuse import (
    fake_pipeline,
    open_stream,
    signed_post,
    stream_token,
    webhook_form,
)

SECRET = "stream-secret-0123456789abcdef"


@pytest.fixture
def calls_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fake_pipeline(monkeypatch)


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The stream side's clock `seconds` ahead (the token's expiry is read with it)."""
    now = time.time() + seconds
    monkeypatch.setattr("phonebot.twilio.stream_token.time", SimpleNamespace(time=lambda: now))


def answered(client: TestClient, query: str = "") -> tuple[str, dict[str, str]]:
    """A webhook answered by the app: its CallSid and the stream parameters in the TwiML."""
    form = webhook_form()
    return form["CallSid"], stream_token(signed_post(client, f"/{query}", form))


def test_a_call_answered_but_never_streamed_is_refused_35_s_later(calls_run, monkeypatch):
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    call_sid, parameters = answered(client)
    later(monkeypatch, 35)  # STREAM_TOKEN_TTL_S is 30
    assert open_stream(client, call_sid, parameters) == 1008
    assert calls_run == []


def test_a_stream_within_the_token_life_is_admitted(calls_run, monkeypatch):
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    call_sid, parameters = answered(client)
    later(monkeypatch, 25)
    assert open_stream(client, call_sid, parameters) == 1000
    assert calls_run == [call_sid]


def test_the_token_of_an_ended_call_opens_nothing_once_every_cache_has_forgotten_it(
    calls_run, monkeypatch
):
    """The single-use mark is a cache entry; the expiry inside the token outlives it.

    A second app with the same STREAM_SECRET and an empty state stands for any process
    after REPLAY_CACHE_TTL_S + MAX_CALL_DURATION_S (or after a Redis flush).
    """
    settings = make_settings(stream_secret=SECRET)
    first = TestClient(create_app(settings))
    call_sid, parameters = answered(first)
    assert open_stream(first, call_sid, parameters) == 1000  # the call, which then ended

    forgetful = TestClient(create_app(settings))
    later(monkeypatch, 20 * 60)
    assert open_stream(forgetful, call_sid, parameters) == 1008
    assert calls_run == [call_sid]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda p: {**p, "caller_id": "+19005550100"}, id="changed-from"),
        pytest.param(lambda p: {**p, "session_type": "sales"}, id="changed-persona"),
        pytest.param(lambda p: {k: v for k, v in p.items() if k != "user_id"}, id="removed"),
        pytest.param(
            lambda p: {**p, **{f"extra{i}": "x" for i in range(256)}}, id="256-parameters"
        ),
    ],
)
def test_parameters_changed_after_the_webhook_are_refused(calls_run, tamper):
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    query = "?" + urlencode({"session_type": "support", "user_id": "u123"})
    call_sid, parameters = answered(client, query)
    assert open_stream(client, call_sid, tamper(parameters)) == 1008
    assert calls_run == []
    # The honest stream, untouched, still gets in.
    assert open_stream(client, call_sid, parameters) == 1000
    assert calls_run == [call_sid]


def test_another_calls_token_is_refused(calls_run):
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    _, parameters = answered(client)
    other_sid, _ = answered(client)
    assert open_stream(client, other_sid, parameters) == 1008
    assert calls_run == []


@pytest.mark.parametrize("token", ["1999999999.\xe9", "\xe9" * 64, "1.2.3", "-5.abc", "9" * 40])
def test_a_malformed_or_non_ascii_token_is_refused_not_crashed(calls_run, token):
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    call_sid, parameters = answered(client)
    assert open_stream(client, call_sid, {**parameters, TOKEN_PARAMETER: token}) == 1008
    assert calls_run == []
    assert open_stream(client, call_sid, parameters) == 1000  # the server is fine


def test_the_hosting_platforms_own_parameters_are_not_covered_and_are_dropped():
    """Pipecat Cloud routes on `_pipecatCloudServiceHost` (which no caller can set: names
    start with a letter); the token covers ours, and the call never sees theirs."""
    ours = {"call_type": "inbound", "caller_id": "+15557654321"}
    token = call_token("CA" + "1" * 32, b"k", ours, time.time() + 30)
    sent = {**ours, TOKEN_PARAMETER: token, "_pipecatCloudServiceHost": "agent.org"}
    assert verify_call_token("CA" + "1" * 32, sent, b"k").ok
    assert covered_parameters(sent) == ours


def test_a_dialout_twilio_reports_over_before_its_stream_can_stream_no_more(calls_run):
    """The callee hung up while the TwiML was fetched: Twilio's final status spends the
    token, so its stream (or a replay of it) is refused on any process sharing the state."""
    client = TestClient(create_app(make_settings(stream_secret=SECRET)))
    form = webhook_form()
    parameters = stream_token(signed_post(client, "/outbound", form))
    final = {**form, "CallStatus": "completed", "CallDuration": "3"}
    assert signed_post(client, "/status", final).status_code == 204
    assert open_stream(client, form["CallSid"], parameters) == 1008
    assert calls_run == []
