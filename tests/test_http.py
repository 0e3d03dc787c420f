"""The HTTP surface: TwiML and its Parameters, signatures, stream tokens, /dialout, /health."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest
from defusedxml import ElementTree
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from pipecat.runner.types import WebSocketRunnerArguments
from starlette.websockets import WebSocketDisconnect
from twilio.request_validator import RequestValidator

from phonebot.config import Settings
from phonebot.twilio.stream_token import call_token, verify_call_token
from phonebot.web.app import create_app
from phonebot.web.services import app_services
from tests.conftest import AUTH_TOKEN, DIALOUT_KEY, make_settings

CALL_SID = "CA" + "1" * 32
FORM = {
    "CallSid": CALL_SID,
    "AccountSid": "AC" + "0" * 32,
    "From": "+15557654321",
    "To": "+15550001111",
    "Direction": "inbound",
}


def signed_post(client: TestClient, url: str, form: dict, *, signed_url: str | None = None,
                headers: dict | None = None):
    """POST a form the way Twilio does, signed over `signed_url` (default: `url`)."""
    signature = RequestValidator(AUTH_TOKEN).compute_signature(signed_url or url, form)
    all_headers = {"X-Twilio-Signature": signature, **(headers or {})}
    return client.post(url, data=form, headers=all_headers)


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    root = ElementTree.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert stream is not None, twiml
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    return stream.get("url"), parameters


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def test_webhook_answers_connect_stream_with_every_parameter(client, settings):
    url = "http://testserver/?" + urlencode({"session_type": "support", "user_id": "u123"})
    response = signed_post(client, url, FORM)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(response.text)
    # No dead air: if the stream closes without a hang-up, Twilio says this and hangs up.
    assert [child.tag for child in root] == ["Connect", "Say", "Hangup"]
    assert root.find("Say").text == settings.stream_closed_phrase
    stream_url, parameters = stream_of(response.text)
    assert stream_url == "ws://testserver/ws"
    assert verify_call_token(CALL_SID, parameters, settings.stream_token_secret).ok
    parameters.pop("token")
    assert parameters == {
        "session_type": "support",
        "user_id": "u123",
        "caller_id": "+15557654321",
        "called_number": "+15550001111",
        "call_type": "inbound",
    }


def test_odd_parameter_values_are_xml_escaped(client):
    odd = "a<b>&\"quoted\" 'single' ünïcode"
    url = "http://testserver/?" + urlencode({"note": odd})
    response = signed_post(client, url, FORM)
    assert response.status_code == 200
    assert stream_of(response.text)[1]["note"] == odd


def test_signature_is_checked_against_the_url_twilio_saw_behind_a_proxy(client):
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "abc.ngrok.app"}
    outside_url = "https://abc.ngrok.app/?session_type=sales"
    response = signed_post(client, "http://testserver/?session_type=sales", FORM,
                           signed_url=outside_url, headers=proxy)
    assert response.status_code == 200
    assert stream_of(response.text)[0] == "wss://abc.ngrok.app/ws"


def test_public_url_sets_the_signed_url_and_stream_host():
    client = TestClient(create_app(make_settings(public_url="https://bot.example.com/")))
    response = signed_post(client, "http://testserver/", FORM,
                           signed_url="https://bot.example.com/")
    assert response.status_code == 200
    assert stream_of(response.text)[0] == "wss://bot.example.com/ws"


@pytest.mark.parametrize("signature", [None, "", "d3Jvbmc=", "not even base64"])
def test_unsigned_or_badly_signed_webhook_is_forbidden(client, signature):
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    response = client.post("/", data=FORM, headers=headers)
    assert response.status_code == 403
    assert "X-Twilio-Signature" in response.json()["detail"]


def test_signature_over_other_form_values_is_forbidden(client):
    signature = RequestValidator(AUTH_TOKEN).compute_signature("http://testserver/", FORM)
    tampered = {**FORM, "From": "+15550000000"}
    response = client.post("/", data=tampered, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403


def test_without_auth_token_signatures_are_not_required():
    client = TestClient(create_app(make_settings(twilio_auth_token=None)))
    assert client.post("/", data=FORM).status_code == 200


def test_webhook_without_callsid_names_the_field(client):
    form = {k: v for k, v in FORM.items() if k != "CallSid"}
    response = signed_post(client, "http://testserver/", form)
    assert response.status_code == 422
    assert response.json()["field"] == "CallSid"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"token": "forged"}, "query.token"),
        ({"call_type": "outbound"}, "query.call_type"),
        ({"bad name!": "x"}, "query.bad name!"),
        ({"note": "x" * 300}, "query.note"),
        ({f"p{i}": "x" for i in range(17)}, "query"),
    ],
)
def test_webhook_query_parameters_are_bounded(client, query, field):
    response = signed_post(client, "http://testserver/?" + urlencode(query), FORM)
    assert response.status_code == 422
    assert response.json()["field"] == field


def test_production_streams_to_pipecat_cloud():
    settings = make_settings(env="production", agent_name="phone-bot", organization_name="acme")
    client = TestClient(create_app(settings))
    response = signed_post(client, "http://testserver/", FORM)
    stream_url, parameters = stream_of(response.text)
    assert stream_url == "wss://api.pipecat.daily.co/ws/twilio"
    assert parameters["_pipecatCloudServiceHost"] == "phone-bot.acme"
    assert parameters["call_type"] == "inbound"


def test_outbound_twiml_marks_the_call_outbound(client):
    url = "http://testserver/outbound?campaign_id=summer_sale&customer_id=c-42"
    response = signed_post(client, url, {**FORM, "Direction": "outbound-api"})
    assert response.status_code == 200
    parameters = stream_of(response.text)[1]
    assert parameters["call_type"] == "outbound"
    assert parameters["campaign_id"] == "summer_sale"
    assert parameters["customer_id"] == "c-42"


def test_outbound_twiml_requires_a_signature(client):
    assert client.post("/outbound?campaign_id=x", data=FORM).status_code == 403


def test_call_token_checks():
    secret = b"secret"
    parameters = {"call_type": "inbound", "caller_id": "+15557654321"}
    expires = time.time() + 30
    signed = {**parameters, "token": call_token(CALL_SID, secret, parameters, expires)}
    token = signed["token"]
    assert verify_call_token(CALL_SID, signed, secret).ok
    assert not verify_call_token(CALL_SID, parameters, secret).ok
    assert not verify_call_token(CALL_SID, {**parameters, "token": ""}, secret).ok
    flipped = token[:-1] + ("1" if token.endswith("0") else "0")  # one hex digit changed
    assert not verify_call_token(CALL_SID, {**signed, "token": flipped}, secret).ok
    assert not verify_call_token("CA" + "2" * 32, signed, secret).ok
    assert not verify_call_token(CALL_SID, signed, b"other secret").ok


def start_message(token: str | None) -> str:
    parameters = {"caller_id": "+15557654321"}
    if token is not None:
        parameters["token"] = token
    return json.dumps({
        "event": "start",
        "streamSid": "MZ" + "3" * 32,
        "start": {
            "streamSid": "MZ" + "3" * 32,
            "callSid": CALL_SID,
            "accountSid": "AC" + "0" * 32,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    })


@pytest.mark.parametrize("token", [None, "", "0" * 64, "forged"])
def test_stream_without_a_valid_token_is_closed_before_any_service_starts(
    client, token, monkeypatch
):
    def no_services(*args, **kwargs):
        raise AssertionError("services must not be built for a rejected stream")

    monkeypatch.setattr("phonebot.call.serve.build_services", no_services)
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
        websocket.send_text(start_message(token))
        with pytest.raises(WebSocketDisconnect) as closed:
            websocket.receive_text()
    assert closed.value.code == 1008


def test_stream_that_is_not_twilio_is_closed(client):
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("hello")
        websocket.send_text("{}")
        with pytest.raises(WebSocketDisconnect) as closed:
            websocket.receive_text()
    assert closed.value.code == 1008


def dialout(client: TestClient, body: dict, key: str | None = DIALOUT_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return client.post("/dialout", json=body, headers=headers)


def test_dialout_is_disabled_without_a_key():
    client = TestClient(create_app(make_settings(dialout_api_key=None)))
    response = dialout(client, {"to": "+15551234567"})
    assert response.status_code == 503
    assert response.json()["detail"] == "dial-out disabled"


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
def test_dialout_needs_the_bearer_key(client, key):
    assert dialout(client, {"to": "+15551234567"}, key=key).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "5551234567"}, "to"),
        ({"to": "+0551234567"}, "to"),
        ({"to": "+1555123456789012"}, "to"),
        ({}, "to"),
        ({"to": "+15551234567", "from": "twilio"}, "from"),
        ({"to": "+15551234567", "parameters": {"campaign_id": 42}}, "parameters"),
    ],
)
def test_dialout_validation_names_the_field(client, body, field):
    response = dialout(client, body)
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"token": "x"}, "parameters.token"),
        ({"campaign_id": "x" * 257}, "parameters.campaign_id"),
        ({"x" * 65: "v"}, "parameters." + "x" * 64),
        ({f"p{i}": "v" for i in range(17)}, "parameters"),
    ],
)
def test_dialout_parameters_are_bounded(client, parameters, field):
    response = dialout(client, {"to": "+15551234567", "parameters": parameters})
    assert response.status_code == 422
    assert response.json()["field"] == field


def test_health_names_the_providers(client):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["providers"] == {"stt": "offline", "llm": "offline", "tts": "offline"}
    assert body["offline"] is True
    assert body["version"]


def test_health_counts_the_record_writes(tmp_path):
    """What the records lost (database down, queue full) shows in /health."""
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'records.db'}")
    with TestClient(create_app(settings)) as client:
        app_services(client.app).records.writer.dropped_writes = 3
        records = client.get("/health").json()["records"]
    assert records["dropped_writes"] == 3
    assert {"queued", "written", "failed_writes", "database_failing"} <= set(records)
    assert "records" in client.app.openapi()["components"]["schemas"]["HealthResponse"]["required"]


def test_pipecat_cloud_entry_point_verifies_the_token_then_runs_the_call(
    settings, monkeypatch
):
    """`bot(runner_args)` is what Pipecat Cloud calls: same verification, same pipeline."""
    import bot

    calls = []

    async def fake_run_bot(transport, call, settings, serializer, deps):
        calls.append(call)
        writers.append(deps.records)

    writers = []

    monkeypatch.setattr(bot, "get_settings", lambda: settings)
    monkeypatch.setattr("phonebot.call.serve.run_bot", fake_run_bot)
    app = FastAPI()

    @app.websocket("/ws")
    async def cloud(websocket: WebSocket):
        await websocket.accept()
        await bot.bot(WebSocketRunnerArguments(websocket=websocket))

    token = call_token(
        CALL_SID, settings.stream_token_secret, {"caller_id": "+15557654321"}, time.time() + 30
    )
    with TestClient(app).websocket_connect("/ws") as websocket:
        websocket.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
        websocket.send_text(start_message(token))
    assert [c.call_sid for c in calls] == [CALL_SID]
    assert calls[0].parameters["caller_id"] == "+15557654321"
    assert calls[0].stream_sid == "MZ" + "3" * 32
    # No app on Pipecat Cloud, and the default DATABASE_URL is a local SQLite file: no records.
    assert writers == [None]


def test_call_records_off_keep_nothing_and_the_records_api_says_so(tmp_path):
    """CALL_RECORDS=false: no database is opened, writes are dropped, /calls answers 503."""
    database = tmp_path / "records.db"
    settings = make_settings(
        call_records=False, admin_api_key="admin-key-123456", database_url=f"sqlite:///{database}"
    )
    with TestClient(create_app(settings)) as client:
        records = app_services(client.app).records
        records.writer.call_started("CA" + "1" * 32, direction="inbound")
        assert records.writer.queued == 0
        answer = client.get("/calls", headers={"Authorization": "Bearer admin-key-123456"})
        assert answer.status_code == 503
        assert "CALL_RECORDS=false" in answer.json()["detail"]
    assert not database.exists()
