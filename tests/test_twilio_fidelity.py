"""What real Twilio does that a first call must survive: the URL forms it signs, SharedKey
signing, what the caller hears after the stream, webhook retries, `wss://` only, withheld
caller IDs, and a production server that can't authenticate anything.

Server-side checks run the app in-process; the call-level ones drive it with the emulator,
which behaves like Twilio in each case (see phonebot/emulator).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from defusedxml import ElementTree
from fastapi.testclient import TestClient

from phonebot.agents.agent import opening_line
from phonebot.config import Settings
from phonebot.emulator import MediaStreamCaller, WaitForBot, dial_in
from phonebot.emulator.ids import new_call_sid
from phonebot.emulator.loopback import LoopbackServer
from phonebot.emulator.signature import SharedKey, compute_signature, signed_headers
from phonebot.emulator.twiml import say_seconds
from phonebot.emulator.webhook import IDEMPOTENCY_HEADER, voice_webhook_form
from phonebot.state import MemoryState
from phonebot.twilio.stream_token import verify_call_token
from phonebot.web.app import create_app
from phonebot.web.safety import production_auth_problem
from phonebot.web.services import app_services
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, make_settings, shipped_agent
from tests.live_server import ROOT, LiveServer, free_port

CALLER = "+15557654321"
OUR_NUMBER = "+15550001111"
SHARED_SECRET = "shared-key-secret-0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def form(call_sid: str | None = None, from_: str = CALLER) -> dict[str, str]:
    return voice_webhook_form(
        call_sid=call_sid or new_call_sid(), account_sid=ACCOUNT_SID, from_=from_, to=OUR_NUMBER
    )


def post(client: TestClient, path: str, fields: dict, signed_url: str, headers=None,
         shared_key: SharedKey | None = None) -> httpx.Response:
    """POST `path` signed over `signed_url`, exactly the string Twilio would have used."""
    signature = signed_headers(AUTH_TOKEN, signed_url, fields, shared_key)
    return client.post(path, data=fields, headers={**signature, **(headers or {})})


def parameters_of(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    stream = ElementTree.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None, response.text
    return {p.get("name"): p.get("value") for p in stream.findall("Parameter")}


# --- 1. the URL forms Twilio signs ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "signed_url"),
    [
        ("/", "http://testserver/"),
        ("/", "http://testserver"),  # number configured without the trailing slash
        ("/?session_type=sales", "http://testserver?session_type=sales"),
        ("/?session_type=sales", "http://testserver/?session_type=sales"),
        ("/", "http://testserver:80/"),  # with the default port (RequestValidator)
        ("/", "http://testserver:80"),
        # The raw query string, as sent: not decoded and re-encoded (%20 stays, + stays).
        ("/?note=a%20b+c&x=%2F", "http://testserver/?note=a%20b+c&x=%2F"),
        ("/outbound?campaign_id=summer_sale", "http://testserver/outbound?campaign_id=summer_sale"),
    ],
)
def test_every_url_form_twilio_may_sign_is_accepted(path, signed_url):
    client = TestClient(create_app(make_settings()))
    assert post(client, path, form(), signed_url).status_code == 200


@pytest.mark.parametrize(
    ("path", "signed_url"),
    [
        ("/", "http://testserver/other"),  # another path
        ("/outbound", "http://testserver/outbound/"),  # the slash is optional on the root only
        ("/", "https://testserver/"),  # another scheme
        ("/?note=a%20b", "http://testserver/?note=a b"),  # the query decoded: not what came
    ],
)
def test_urls_twilio_did_not_sign_are_still_refused(path, signed_url, logs):
    client = TestClient(create_app(make_settings()))
    response = post(client, path, form(), signed_url)
    assert response.status_code == 403
    assert "badly signed" in response.json()["detail"]
    refusals = [line for line in logs if "badly signed" in line]
    assert len(refusals) == 1 and "PUBLIC_URL" in refusals[0]


@pytest.mark.parametrize("public_url", ["https://abc.ngrok.app", "https://abc.ngrok.app/"])
@pytest.mark.parametrize("configured", ["https://abc.ngrok.app", "https://abc.ngrok.app/"])
def test_public_url_with_or_without_slash_accepts_both_number_configurations(
    public_url, configured
):
    client = TestClient(create_app(make_settings(public_url=public_url)))
    response = post(client, "/?session_type=support", form(), f"{configured}?session_type=support")
    assert parameters_of(response)["session_type"] == "support"
    assert ElementTree.fromstring(response.text).find("./Connect/Stream").get("url") == (
        "wss://abc.ngrok.app/ws"
    )


def test_behind_a_proxy_the_forwarded_host_is_signed_with_or_without_slash_and_port():
    client = TestClient(create_app(make_settings()))
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "abc.ngrok.app"}
    for signed in ("https://abc.ngrok.app", "https://abc.ngrok.app:443/"):
        assert post(client, "/", form(), signed, proxy).status_code == 200


# --- 2. SharedKey signing (Webhooks signing rules) -------------------------------------


SHARED = SharedKey(SHARED_SECRET, key_id="webhooks_sharedkey_01jexample")


def test_a_shared_key_signature_is_checked_with_the_configured_secret():
    client = TestClient(create_app(make_settings(twilio_webhook_shared_key=SHARED_SECRET)))
    signed = post(client, "/", form(), "http://testserver/", shared_key=SHARED)
    assert signed.status_code == 200
    wrong = SharedKey("not-the-secret", key_id=SHARED.key_id)
    assert post(client, "/", form(), "http://testserver/", shared_key=wrong).status_code == 403
    # The auth token's HMAC-SHA1 is no good when the request says SharedKey + HMAC-SHA256.
    fields = form()
    forged = {
        "X-Twilio-Signature": compute_signature(AUTH_TOKEN, "http://testserver/", fields),
        "X-Twilio-Webhooks-Signature-Settings": SHARED.settings_header,
    }
    assert client.post("/", data=fields, headers=forged).status_code == 403
    # Requests without the header are still checked against the auth token.
    assert post(client, "/", form(), "http://testserver/").status_code == 200


def test_a_shared_key_webhook_without_the_setting_gets_403_and_one_line_saying_what_to_set(logs):
    client = TestClient(create_app(make_settings()))
    response = post(client, "/", form(), "http://testserver/", shared_key=SHARED)

    assert response.status_code == 403
    assert "TWILIO_WEBHOOK_SHARED_KEY" in response.json()["detail"]
    explained = [line for line in logs if "X-Twilio-Webhooks-Signature-Settings" in line]
    assert len(explained) == 1, logs
    assert "TWILIO_WEBHOOK_SHARED_KEY" in explained[0]
    assert "key=webhooks_sharedkey_01jexample,algorithm=HMAC_SHA256" in explained[0]
    assert SHARED_SECRET not in "\n".join(logs)


def test_an_algorithm_the_library_cannot_check_is_named(logs):
    client = TestClient(create_app(make_settings(twilio_webhook_shared_key=SHARED_SECRET)))
    headers = {"X-Twilio-Signature": "c2ln", "X-Twilio-Webhooks-Signature-Settings":
               "key=webhooks_sharedkey_x,algorithm=HMAC_SHA512"}
    response = client.post("/", data=form(), headers=headers)
    assert response.status_code == 403
    assert [line for line in logs if "HMAC_SHA512" in line], logs


# --- 4. Twilio's retries ---------------------------------------------------------------


def test_a_retry_of_an_answered_webhook_gets_the_same_twiml_and_no_second_slot():
    client = TestClient(create_app(make_settings()))
    fields = form()
    token = {"I-Twilio-Idempotency-Token": "retry-1"}
    first = post(client, "/", fields, "http://testserver/", token)
    retry = post(client, "/", fields, "http://testserver/", token)

    assert retry.status_code == 200
    assert retry.text == first.text  # same TwiML, same stream token
    assert client.get("/health").json()["reserved_calls"] == 1
    # A replay with another token, or none, is still refused.
    other = post(client, "/", fields, "http://testserver/", {"I-Twilio-Idempotency-Token": "x"})
    assert other.status_code == 409
    assert post(client, "/", fields, "http://testserver/").status_code == 409
    # The same token for another call is not a retry either.
    assert post(client, "/", form(), "http://testserver/", token).status_code == 409
    assert client.get("/health").json()["reserved_calls"] == 1


def test_a_retry_after_the_window_is_a_replay():
    settings = make_settings(webhook_retry_window_s=60, replay_cache_ttl_s=600)
    clock = FakeClock()
    app = create_app(settings, shared=MemoryState(clock=clock))
    client = TestClient(app)
    fields = form()
    token = {"I-Twilio-Idempotency-Token": "retry-2"}
    assert post(client, "/", fields, "http://testserver/", token).status_code == 200
    clock.now += 59
    assert post(client, "/", fields, "http://testserver/", token).status_code == 200
    clock.now += 2
    assert post(client, "/", fields, "http://testserver/", token).status_code == 409


class LoseFirstAnswer:
    """ASGI wrapper: the first request is answered by the app, but the answer never leaves
    (the connection is dropped), as when Twilio times out or the network loses it."""

    def __init__(self, app) -> None:
        self.app = app
        self.tokens: list[str | None] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        token = headers.get(IDEMPOTENCY_HEADER.lower().encode())
        self.tokens.append(token.decode() if token else None)
        body: list[bytes] = []
        lose = len(self.tokens) == 1

        async def capture(message) -> None:
            if message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            if not lose:
                await send(message)

        await self.app(scope, receive, capture)
        self.bodies.append(b"".join(body))
        if lose:
            send.__self__.transport.abort()  # uvicorn's: close without answering


async def test_the_emulator_retries_a_lost_answer_like_twilio_and_gets_the_same_twiml():
    settings = make_settings()
    app = create_app(settings)
    lossy = LoseFirstAnswer(app)
    server = LoopbackServer(lossy)
    await server.start()
    try:
        call = await dial_in(f"{server.base_url}/", auth_token=AUTH_TOKEN, attempts=2)
    finally:
        await server.stop()

    assert len(lossy.tokens) == 2 and lossy.tokens[0] and lossy.tokens[0] == lossy.tokens[1]
    assert lossy.bodies[0] == lossy.bodies[1]
    assert verify_call_token(call.call_sid, call.parameters, settings.stream_token_secret).ok
    assert (await app_services(app).admission.counts()).reserved == 1


# --- 5. ws:// stream URLs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "settings", "headers", "errors"),
    [
        ("http://bot.internal:8000", {}, {}, 1),
        ("http://bot.internal:8000", {}, {"X-Forwarded-Proto": "https"}, 0),
        ("http://bot.internal:8000", {"public_url": "https://bot.example.com"}, {}, 0),
        ("http://127.0.0.1:8000", {}, {}, 0),
        ("http://localhost:8000", {}, {}, 0),
    ],
)
def test_a_ws_stream_url_for_a_public_host_logs_one_error_naming_public_url(
    base_url, settings, headers, errors, logs
):
    client = TestClient(create_app(make_settings(**settings)), base_url=base_url)
    public = settings.get("public_url") or (
        base_url.replace("http", "https") if headers else base_url
    )
    response = post(client, "/", form(), f"{public}/", headers)
    assert response.status_code == 200
    lines = [line for line in logs if line.startswith("ERROR")]
    assert len(lines) == errors, lines
    if errors:
        assert "PUBLIC_URL" in lines[0] and "31922" in lines[0]


# --- 6. withheld caller IDs ------------------------------------------------------------


@pytest.mark.parametrize(
    "withheld", ["+266696687", "266696687", "Anonymous", "ANONYMOUS", "restricted", "Unknown", ""]
)
def test_a_withheld_caller_id_is_no_caller_id_everywhere(withheld, logs):
    client = TestClient(create_app(make_settings()))
    parameters = parameters_of(post(client, "/", form(from_=withheld), "http://testserver/"))

    assert parameters["caller_id"] == ""
    greeting = opening_line(shipped_agent("general"), parameters)
    assert "ending in" not in greeting
    # Even a stream whose parameters carry the placeholder (e.g. an older webhook server).
    assert "ending in" not in opening_line(shipped_agent("general"), {"caller_id": withheld})
    assert not [line for line in logs if "266696687" in line or "6 6 8 7" in line]


def test_a_real_caller_id_is_still_read_out():
    client = TestClient(create_app(make_settings()))
    parameters = parameters_of(post(client, "/", form(from_=CALLER), "http://testserver/"))
    assert parameters["caller_id"] == CALLER
    assert "ending in 4 3 2 1" in opening_line(shipped_agent("general"), parameters)


# --- 7. production without a shared secret ---------------------------------------------


def production(**overrides) -> Settings:
    values = {"env": "production", "agent_name": "phone-bot", "organization_name": "acme"}
    return Settings(**{**values, **overrides})


def test_production_names_every_missing_setting():
    problem = production_auth_problem(production())
    assert problem is not None
    assert "STREAM_SECRET" in problem and "TWILIO_AUTH_TOKEN" in problem
    assert "WEBHOOK_AUTH=external" in problem
    only_secret = production_auth_problem(production(stream_secret="s"))
    assert only_secret is not None and "TWILIO_AUTH_TOKEN" in only_secret
    assert "STREAM_SECRET" not in only_secret.split("set ", 1)[1].split(" (")[0]
    assert production_auth_problem(production(twilio_auth_token="t")) is None
    assert production_auth_problem(production(stream_secret="s", webhook_auth="external")) is None
    external_only = production_auth_problem(production(webhook_auth="external"))
    assert external_only is not None and "STREAM_SECRET" in external_only
    assert production_auth_problem(Settings()) is None  # local: anything goes


def test_create_app_refuses_production_without_secrets():
    with pytest.raises(ValueError, match="ENV=production refuses to start"):
        create_app(production())
    create_app(production(stream_secret="s" * 16, webhook_auth="external"))  # 16: long enough


def test_python_server_py_exits_with_the_message_in_production_without_secrets(tmp_path: Path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "ENV": "production",
           "AGENT_NAME": "phone-bot", "ORGANIZATION_NAME": "acme", "HOST": "127.0.0.1",
           "PORT": str(free_port())}
    started = time.monotonic()
    process = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    output = process.stdout + process.stderr
    assert process.returncode != 0, output
    lines = [line for line in output.splitlines() if "ENV=production refuses to start" in line]
    assert len(lines) == 1, output
    assert "STREAM_SECRET" in lines[0] and "TWILIO_AUTH_TOKEN" in lines[0]
    assert "Traceback" not in output
    assert time.monotonic() - started < 60


# --- 3. no dead air: a refused stream hears the apology, then Twilio hangs up ----------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real server, offline, with Twilio credentials (so its TwiML carries the apology).

    A refused stream makes no REST request, so the REST root points at a closed port.
    """
    env = {
        "STREAM_SECRET": "fidelity-secret",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": f"http://127.0.0.1:{free_port()}",
    }
    live = LiveServer(env, tmp_path_factory.mktemp("fidelity"))
    yield live
    live.stop()


@pytest.mark.parametrize("token", ["0" * 64, None])
async def test_a_refused_stream_hears_the_apology_then_hangs_up_instead_of_silence(server, token):
    answered = await dial_in(
        f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER, auth_token=AUTH_TOKEN
    )
    parameters = {k: v for k, v in answered.parameters.items() if k != "token"}
    if token is not None:
        parameters["token"] = token
    caller = MediaStreamCaller(answered.stream_url, parameters=parameters,
                               call_sid=answered.call_sid, after_stream=answered.after_stream)
    started = time.monotonic()
    result = await asyncio.wait_for(caller.run([WaitForBot(timeout=10)], check=False), 20)
    elapsed = time.monotonic() - started

    phrase = Settings().stream_closed_phrase
    assert result.close is not None and (result.close.by, result.close.code) == ("server", 1008)
    assert result.said == [phrase]
    assert result.dead_air_after_stream == 0
    hangups = result.events_of("hangup")
    assert [(e.data["by"], e.data["reason"]) for e in hangups] == [
        ("twiml", "<Hangup/> after the stream")
    ]
    # Heard for as long as it takes to say, then the call ended: no 40 s of silence.
    assert hangups[0].t - result.close.t == pytest.approx(say_seconds(phrase), abs=0.5)
    assert elapsed < say_seconds(phrase) + 5
    assert server.wait_for_log("Media stream rejected")


def test_without_twilio_credentials_the_stream_end_is_a_bare_hangup():
    """No REST hang-up is possible, so the bot's goodbye closes the stream: no apology after it."""
    with_credentials = TestClient(create_app(make_settings()))
    without = TestClient(create_app(make_settings(twilio_account_sid=None, twilio_auth_token=None)))
    for client, verbs in [(with_credentials, ["Say", "Hangup"]), (without, ["Hangup"])]:
        form = voice_webhook_form(
            call_sid=new_call_sid(), account_sid=ACCOUNT_SID, from_=CALLER, to=OUR_NUMBER
        )
        headers = signed_headers(AUTH_TOKEN, "http://testserver/", form)
        answer = client.post("/", data=form, headers=headers)
        root = ElementTree.fromstring(answer.text)
        assert [verb.tag for verb in root][1:] == verbs, answer.text


def test_the_refused_stream_left_nothing_behind(server):
    assert server.health()["active_streams"] == 0
    assert "fidelity-secret" not in server.log_text()
