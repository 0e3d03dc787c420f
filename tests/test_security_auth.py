"""Issue 16's weaknesses, as attacks: guessing keys, short keys, a session that outlives its
logout, a cookie that crashed the page, and X-Forwarded-For from loopback.

- Wrong keys lock a client out (AUTH_FAILURE_LIMIT, AUTH_LOCKOUT_S) on every route that
  takes one, the right key included, across processes (Redis).
- ENV=production refuses secrets shorter than 16 characters; every secret is masked.
- Logging out ends the session on the server (shared state), so a copy of the cookie is
  dead; the cookie is Secure whenever PUBLIC_URL is https; a non-ASCII cookie is "not
  logged in", never a 500.
- A real `python server.py`: only `client_ip` reads X-Forwarded-For (uvicorn does not).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from loguru import logger

from phonebot.config import Settings
from phonebot.ops.logs import configure_logging, redact, secret_values
from phonebot.state import MemoryState
from phonebot.web.app import create_app
from phonebot.web.safety import UnsafeConfiguration, require_safe_configuration
from phonebot.web.sessions import COOKIE
from tests.browser import records_app
from tests.conftest import DIALOUT_KEY, make_settings
from tests.live_server import LiveServer, free_port, refused_start

if TYPE_CHECKING:  # imported by pytest as a plugin (pytest_plugins), not here
    from bench.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

KEY = "test-admin-key-0123456789"
METRICS = "test-metrics-token-0123456789"
LIMIT = 10  # AUTH_FAILURE_LIMIT's default
WRONG = {"Authorization": "Bearer wrong-key-0123456789"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Clock:
    """A monotonic clock the test moves (the memory state's expiries and buckets)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server_app(clock: Clock | None = None, **settings) -> FastAPI:
    """server.py's app, without its lifespan (no route here needs the records started)."""
    values = {"admin_api_key": KEY, "metrics_token": METRICS, **settings}
    shared = MemoryState(clock=clock) if clock is not None else None
    return create_app(make_settings(**values), shared=shared)


# --- wrong keys lock the client out ----------------------------------------------------------
KEY_ROUTES = [
    ("GET", "/calls", WRONG),
    ("DELETE", "/calls/CA" + "0" * 32, WRONG),
    ("GET", "/campaigns", WRONG),
    ("GET", "/dnc", WRONG),
    ("POST", "/dialout", WRONG),
    ("GET", "/metrics", WRONG),
]


@pytest.mark.parametrize(("method", "path", "headers"), KEY_ROUTES,
                         ids=[f"{m} {p[:9]}" for m, p, _ in KEY_ROUTES])
def test_twenty_wrong_keys_end_in_429(method: str, path: str, headers: dict[str, str]):
    # /dialout's own rate limit (DIALOUT_RATE_LIMIT_BURST, 5) would answer 429 first.
    client = TestClient(server_app(dialout_rate_limit_burst=100))
    body = {"to": "+15550102222"} if path == "/dialout" else None
    codes = [client.request(method, path, headers=headers, json=body).status_code
             for _ in range(20)]
    assert codes == [401] * LIMIT + [429] * (20 - LIMIT)
    refused = client.request(method, path, headers=headers, json=body)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "AUTH_FAILURE_LIMIT" in refused.json()["detail"]


def test_twenty_wrong_keys_on_the_login_form_end_in_429():
    client = TestClient(server_app(), follow_redirects=False)
    codes = [client.post("/calls/ui/login", data={"key": f"guess-{n}"}).status_code
             for n in range(20)]
    assert codes == [401] * LIMIT + [429] * (20 - LIMIT)


def test_the_right_key_is_refused_until_the_lockout_ends():
    clock = Clock()
    client = TestClient(server_app(clock), follow_redirects=False)
    for _ in range(LIMIT):
        client.get("/calls", headers=WRONG)
    # Every key the locked-out client may send: admin, dial-out, metrics, the login form.
    assert client.get("/calls", headers=bearer(KEY)).status_code == 429
    assert client.post("/dialout", headers=bearer(DIALOUT_KEY), json={}).status_code == 429
    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 429
    login = client.post("/calls/ui/login", data={"key": KEY})
    assert login.status_code == 429 and "set-cookie" not in login.headers
    clock.now += 59
    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 429
    clock.now += 2  # AUTH_LOCKOUT_S (60 s) has passed
    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200
    assert client.post("/calls/ui/login", data={"key": KEY}).status_code == 303


def test_the_right_key_never_counts_and_a_request_without_a_key_is_no_guess():
    client = TestClient(server_app())
    for _ in range(3 * LIMIT):
        assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200
        assert client.get("/calls").status_code == 401  # no key sent: not a guess
    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200


def test_the_lockout_is_per_client_and_only_client_ip_reads_x_forwarded_for():
    client = TestClient(server_app(trusted_proxy_hops=1))
    attacker, admin = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.2"}
    for _ in range(LIMIT):
        client.get("/calls", headers={**WRONG, **attacker})
    assert client.get("/metrics", headers={**bearer(METRICS), **attacker}).status_code == 429
    assert client.get("/metrics", headers={**bearer(METRICS), **admin}).status_code == 200


def test_the_limit_is_a_setting():
    client = TestClient(server_app(auth_failure_limit=2, auth_lockout_s=5))
    codes = [client.get("/calls", headers=WRONG).status_code for _ in range(3)]
    assert codes == [401, 401, 429]
    assert int(client.get("/calls", headers=WRONG).headers["retry-after"]) <= 5


def test_failures_on_one_process_lock_the_client_out_of_another(
    redis_server: RedisServer, tmp_path: Path
):
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'calls.db'}", admin_api_key=KEY,
        redis_url=redis_server.url, state_key_prefix="auth-test:",
    )
    with TestClient(records_app(settings)) as one, TestClient(records_app(settings)) as other:
        codes = [(one if n % 2 else other).get("/calls", headers=WRONG).status_code
                 for n in range(LIMIT + 1)]
        assert codes == [401] * LIMIT + [429]
        assert one.get("/calls", headers=bearer(KEY)).status_code == 429
        assert other.post("/calls/ui/login", data={"key": KEY}).status_code == 429


def test_a_redis_outage_skips_the_lockout_never_the_key(
    redis_server: RedisServer, tmp_path: Path
):
    """The lockout brakes guessing; the key still decides. /metrics and the records API
    (no Redis needed) keep answering the right key while Redis is down."""
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'calls.db'}", admin_api_key=KEY,
        redis_url=redis_server.url, redis_timeout_s=0.1,
    )
    with TestClient(records_app(settings)) as client:
        redis_server.stop()
        assert client.get("/calls", headers=WRONG).status_code == 401
        assert client.get("/calls", headers=bearer(KEY)).status_code == 200


# --- short secrets ---------------------------------------------------------------------------
SECRETS = ["admin_api_key", "dialout_api_key", "metrics_token", "stream_secret",
           "events_webhook_secret"]


def production(**overrides) -> Settings:
    values = {"env": "production", "agent_name": "bot", "organization_name": "acme"}
    return make_settings(**{**values, **overrides})


@pytest.mark.parametrize("name", SECRETS)
def test_production_refuses_a_secret_shorter_than_16_characters(name: str):
    with pytest.raises(UnsafeConfiguration, match=f"{name.upper()} is shorter than 16"):
        require_safe_configuration(production(**{name: "k" * 15}))
    require_safe_configuration(production(**{name: "k" * 16}))
    require_safe_configuration(make_settings(**{name: "k"}))  # ENV=local: anything goes


def test_python_server_py_exits_2_naming_a_1_character_admin_key(tmp_path: Path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "ENV": "production",
           "AGENT_NAME": "bot", "ORGANIZATION_NAME": "acme", "HOST": "127.0.0.1",
           "PORT": str(free_port()), "STREAM_SECRET": "s" * 32, "WEBHOOK_AUTH": "external",
           "ADMIN_API_KEY": "k", "DATABASE_URL": f"sqlite:///{tmp_path / 'calls.db'}"}
    assert "ADMIN_API_KEY is shorter than 16" in refused_start(env, tmp_path)


def test_a_3_character_secret_is_masked_in_a_log_line(capsys, restore_logging):
    settings = make_settings(admin_api_key="k3y", redis_url="redis://:pw@127.0.0.1:1/0")
    assert {"k3y", "pw"} <= set(secret_values(settings))
    configure_logging(settings)
    logger.info("GET /calls with Authorization: Bearer k3y from a redis://:pw@ client")
    err = capsys.readouterr().err
    assert "Bearer ***" in err and "k3y" not in err
    assert "redis://:***@" in err
    # Only where it stands alone: a short secret inside a longer word leaves the word alone.
    assert redact("k3y, monk3y", ["k3y"]) == "***, monk3y"


# --- the calls page's session ----------------------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
def page_apps(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], FastAPI]:
    """Apps of the calls page and the records API sharing one state: in memory (one app
    serves every request) or Redis (each call makes another "process" on one Redis)."""
    values = {"database_url": f"sqlite:///{tmp_path / 'calls.db'}", "admin_api_key": KEY}
    if request.param == "memory":
        app = records_app(make_settings(**values))
        return lambda: app
    server: RedisServer = request.getfixturevalue("redis_server")
    values.update(redis_url=server.url, state_key_prefix="sessions-test:")
    return lambda: records_app(make_settings(**values))


@pytest.fixture
def browser(page_apps: Callable[[], FastAPI]) -> Iterator[TestClient]:
    with TestClient(page_apps(), follow_redirects=False) as client:
        yield client


def _csrf(client: TestClient) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/calls/ui").text).group(1)


def test_logout_ends_the_session_for_every_copy_of_the_cookie(
    browser: TestClient, page_apps: Callable[[], FastAPI]
):
    assert browser.post("/calls/ui/login", data={"key": KEY}).status_code == 303
    stolen = browser.cookies[COOKIE]
    with TestClient(page_apps(), follow_redirects=False) as elsewhere:  # another worker
        elsewhere.cookies.set(COOKIE, stolen)
        assert elsewhere.get("/calls/ui").status_code == 200
        assert elsewhere.get("/calls").status_code == 200
        out = browser.post("/calls/ui/logout", data={"csrf": _csrf(browser)})
        assert out.status_code == 303
        page = elsewhere.get("/calls/ui")
        assert page.status_code == 303 and page.headers["location"].startswith("/calls/ui/login")
        assert elsewhere.get("/calls").status_code == 401
    browser.cookies.set(COOKIE, stolen)  # the logged-out browser, its cookie restored
    assert browser.get("/calls/ui").status_code == 303
    assert browser.get("/calls").status_code == 401


@pytest.mark.parametrize(
    "value", ["1999999999.\xe9.\xe9", "1999999999.abc." + "\xe9" * 64],
    ids=["3-parts", "64-character-signature"],
)
def test_a_non_ascii_cookie_is_not_logged_in_never_a_500(browser: TestClient, value: str):
    """In-process, on both backends (the test client sends the cookie as UTF-8; the bytes
    exactly as an attacker sends them go to a real server below)."""
    cookie = {"Cookie": f"{COOKIE}={value}".encode()}
    page = browser.get("/calls/ui", headers=cookie)
    assert page.status_code == 303 and page.headers["location"].startswith("/calls/ui/login")
    assert browser.get("/calls", headers=cookie).status_code == 401
    assert browser.get("/calls/CA" + "0" * 32 + "/recording", headers=cookie).status_code == 401
    out = browser.post("/calls/ui/logout", headers=cookie, data={"csrf": "\xe9" * 64})
    assert out.status_code == 403


def test_the_cookie_is_secure_whenever_public_url_is_https(tmp_path: Path):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'calls.db'}",
                             admin_api_key=KEY, public_url="https://bot.example.com")
    with TestClient(records_app(settings), follow_redirects=False) as plain_http:
        login = plain_http.post("/calls/ui/login", data={"key": KEY})
        assert login.status_code == 303 and "Secure" in login.headers["set-cookie"]


# --- a real server ----------------------------------------------------------------------------
RAW_COOKIES = [
    b"1999999999.\xe9",  # the cookie of the issue
    b"1999999999.\xe9.\xe9",
    b"\xb2" * 10 + b".a.b",  # superscript 2s: str.isdigit() says yes, int() says no
    b"1999999999.abc." + b"\xe9" * 64,
]


def test_raw_non_ascii_cookie_bytes_are_not_logged_in_never_a_500(tmp_path: Path):
    server = LiveServer({"ADMIN_API_KEY": KEY}, tmp_path)
    try:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for raw in RAW_COOKIES:
                cookie = {"Cookie": COOKIE.encode() + b"=" + raw}
                page = client.get("/calls/ui", headers=cookie)
                assert page.status_code == 303, raw
                assert page.headers["location"].startswith("/calls/ui/login")
                assert client.get("/calls", headers=cookie).status_code == 401, raw
                assert client.get("/calls/ui/campaigns", headers=cookie).status_code == 303, raw
    finally:
        server.stop()
    assert server.error_lines() == [], "\n".join(server.logs[-40:])
    assert KEY not in server.log_text()


def test_a_loopback_client_cannot_escape_the_lockout_by_changing_x_forwarded_for(
    tmp_path: Path,
):
    """uvicorn's defaults (proxy_headers on, forwarded_allow_ips 127.0.0.1) rewrote the
    client's address from X-Forwarded-For even with TRUSTED_PROXY_HOPS=0."""
    server = LiveServer({"ADMIN_API_KEY": KEY, "AUTH_FAILURE_LIMIT": "3"}, tmp_path)
    try:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            codes = [
                client.get("/calls", headers={**WRONG, "X-Forwarded-For": f"10.0.0.{n}"})
                .status_code for n in range(1, 4)
            ]
            assert codes == [401, 401, 401]
            fresh = {"X-Forwarded-For": "10.9.9.9"}
            assert client.get("/calls", headers={**bearer(KEY), **fresh}).status_code == 429
            login = client.post("/calls/ui/login", data={"key": KEY}, headers=fresh)
            assert login.status_code == 429
    finally:
        server.stop()
