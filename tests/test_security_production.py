"""A production-configured server against an attacker's crafted requests.

No request may make it write a secret to its log (the issue's "secrets in the log from one
crafted request": loguru's `diagnose` printed the crashed frame's variables), and what it
shows a stranger is the least it can: no API docs, a bare /health, no `server` header, a
generic 403. Each test performs the attack against a real `python server.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from phonebot.emulator.ids import new_call_sid
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import voice_webhook_form
from phonebot.ops.logs import configure_logging
from phonebot.web.app import create_app
from tests.conftest import ACCOUNT_SID, make_settings
from tests.live_server import ROOT, LiveServer

ADMIN_KEY = "admin-key-for-the-attack-test-0123"
AUTH_TOKEN = "auth-token-for-the-attack-test-456"
STREAM_SECRET = "stream-secret-for-the-attack-789"
DIALOUT_KEY = "dialout-key-for-the-attack-abcd"
SECRETS = (ADMIN_KEY, AUTH_TOKEN, STREAM_SECRET, DIALOUT_KEY)


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {
        "ENV": "production",
        "ADMIN_API_KEY": ADMIN_KEY,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "STREAM_SECRET": STREAM_SECRET,
        "DIALOUT_API_KEY": DIALOUT_KEY,
        "LOG_LEVEL": "DEBUG",  # the most a log can say: it must still say no secret
    }
    live = LiveServer(env, tmp_path_factory.mktemp("production"))
    yield live
    live.stop()


def assert_no_secret_logged(server: LiveServer) -> None:
    text = server.log_text()
    for secret in SECRETS:
        assert secret not in text
    assert "Traceback" not in text


def test_a_non_ascii_session_cookie_is_not_a_500_and_logs_no_secret(production):
    response = httpx.get(
        f"{production.base_url}/calls/ui",
        headers={"Cookie": b"phonebot_calls_session=1999999999.\xe9"},
    )
    assert response.status_code < 500
    assert_no_secret_logged(production)


async def test_a_non_ascii_stream_token_is_refused_and_logs_no_secret(production):
    url = production.base_url.replace("http", "ws") + "/ws"
    start = {
        "event": "start",
        "streamSid": "MZ" + "3" * 32,
        "start": {
            "streamSid": "MZ" + "3" * 32,
            "callSid": new_call_sid(),
            "customParameters": {"call_type": "inbound", "token": "1999999999.\xe9"},
        },
    }
    async with connect(url, ping_interval=None, proxy=None) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
        await ws.send(json.dumps(start))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert_no_secret_logged(production)


def test_a_webhook_with_a_bad_port_in_host_is_a_generic_403(production):
    """twilio's validator raises ValueError on `Host: bot.example.com:abc` (PUBLIC_URL
    unset): a 403 like any bad signature, whose body names no URL (the log does)."""
    form = voice_webhook_form(
        call_sid=new_call_sid(), account_sid=ACCOUNT_SID, from_="+15550001", to="+15550002"
    )
    headers = {**signed_headers(AUTH_TOKEN, "https://bot.example.com/", form),
               "Host": "bot.example.com:abc"}  # fmt: skip
    response = httpx.post(f"{production.base_url}/", data=form, headers=headers)
    assert response.status_code == 403
    assert response.json() == {"detail": "X-Twilio-Signature is missing or invalid"}
    assert "bot.example.com" not in response.text
    assert production.wait_for_log("403 badly signed webhook (checked over")
    assert_no_secret_logged(production)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_the_api_docs_are_off(production, path):
    assert httpx.get(f"{production.base_url}{path}").status_code == 404


def test_health_tells_a_stranger_only_the_status(production):
    stranger = httpx.get(f"{production.base_url}/health")
    assert stranger.status_code == 200
    assert stranger.json() == {"status": "ok"}
    wrong = httpx.get(f"{production.base_url}/health", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"status": "ok"}
    operator = httpx.get(
        f"{production.base_url}/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    assert operator["status"] == "ok" and "version" in operator and "pid" in operator


def test_no_server_header(production):
    response = httpx.get(f"{production.base_url}/health")
    assert "server" not in response.headers


# --- the log handlers themselves ------------------------------------------------------


def leaky(secret: str) -> None:
    key = secret  # a local that loguru's `diagnose` would print
    raise RuntimeError(f"upstream refused key {key}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_logged_exception_shows_no_local_variables_and_is_masked(
    capsys, restore_logging, log_format
):
    configure_logging(make_settings(admin_api_key=ADMIN_KEY, log_format=log_format))
    try:
        leaky(ADMIN_KEY)
    except RuntimeError:
        logger.exception("the provider failed")
    err = capsys.readouterr().err
    assert "the provider failed" in err and "upstream refused key ***" in err
    assert "RuntimeError" in err  # the traceback is still there, masked
    assert ADMIN_KEY not in err


def test_before_logging_is_configured_no_local_variables_are_printed(tmp_path):
    """What Pipecat Cloud's bot runs with: loguru's handler as `phonebot.ops.log_start` left it."""
    script = (
        "import phonebot.ops.log_start\n"
        "from loguru import logger\n"
        "def leaky():\n"
        "    very_secret_local = 'sk-live-abcdefghijklmnopqrstuvwxyz'\n"
        "    raise RuntimeError('boom', len(very_secret_local))\n"
        "try:\n"
        "    leaky()\n"
        "except RuntimeError:\n"
        "    logger.exception('failed')\n"
    )
    (tmp_path / "leaky.py").write_text(script)  # a file: loguru's diagnose reads its lines
    done = subprocess.run(
        [sys.executable, str(tmp_path / "leaky.py")], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={"PATH": "", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "failed" in done.stderr and "RuntimeError: ('boom', 34)" in done.stderr
    assert "sk-live-abcdefghijklmnopqrstuvwxyz" not in done.stderr


def test_health_is_no_way_around_the_failed_key_lockout():
    """/health shows more for the admin key, so a wrong one there is a guess like any other
    (counted toward the lockout), yet /health itself never answers 429: a load balancer's
    check must not fail because someone guessed keys from its address."""
    settings = make_settings(env="production", admin_api_key=ADMIN_KEY, stream_secret=STREAM_SECRET,
                             auth_failure_limit=3)  # fmt: skip
    client = TestClient(create_app(settings))
    wrong = {"Authorization": "Bearer not-the-admin-key-at-all"}
    for _ in range(5):
        answer = client.get("/health", headers=wrong)
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
    right = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert client.get("/health", headers=right).json() == {"status": "ok"}  # locked out
    assert client.get("/calls", headers=right).status_code == 429
