"""The calls page (/calls/ui): in a real headless Chromium (Debian's, driven by
Playwright) and over plain HTTP for the session cookie's rules.

Every test here is synchronous: Playwright's sync API must not run inside an asyncio loop,
so the app runs on uvicorn in a thread (tests/browser.py) or in Starlette's TestClient.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from phonebot.records.chart import latency_chart, tick_step
from phonebot.records.models import TranscriptEntryOut
from phonebot.web.calls_ui import _offset
from phonebot.web.sessions import COOKIE, SESSION_TTL_S, new_session
from tests.browser import (
    HOSTILE_SID,
    HOSTILE_TEXT,
    OTHER_CALLS,
    RICH_SID,
    RICH_TRANSCRIPT,
    ServedApp,
    chromium,
    records_app,
    require_chromium,
    seed_calls,
)
from tests.conftest import make_settings

KEY = "test-admin-key-0123456789"
# Newest first, as seeded (seed_calls dates the calls minutes apart).
NEWEST_FIRST = [RICH_SID, HOSTILE_SID, *[row[0] for row in OTHER_CALLS]]
OUTBOUND = [row[0] for row in OTHER_CALLS if row[1] == "outbound"]
BOT_LATENCIES = [latency for kind, _, _, latency, _, _ in RICH_TRANSCRIPT
                 if kind == "bot" and latency is not None]


def _app(folder: Path, **settings):
    values = {"database_url": f"sqlite:///{folder / 'calls.db'}", "admin_api_key": KEY}
    values.update(settings)
    return records_app(make_settings(**values), lambda records: seed_calls(records, folder))


# --- in Chromium --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    executable = require_chromium()  # before starting anything: skip or fail fast
    del executable
    with ServedApp(_app(tmp_path_factory.mktemp("calls-ui"))) as served:
        yield served.base_url


@pytest.fixture(scope="module")
def browser(site: str):
    with chromium(require_chromium()) as context:
        yield context


@pytest.fixture
def page(browser):
    """A fresh page without cookies; fails the test if any dialog (alert) opens."""
    browser.clear_cookies()
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    page.close()
    assert dialogs == [], "a script ran on the page"


def _login(page, site: str, key: str = KEY) -> None:
    page.goto(f"{site}/calls/ui/login")
    page.fill("input[name=key]", key)
    page.click("form.login button[type=submit]")


def _rows(page) -> list[str]:
    return page.eval_on_selector_all(
        "table.calls tbody tr[data-call-sid]", "rows => rows.map(r => r.dataset.callSid)"
    )


def test_without_a_session_the_page_asks_for_the_key(page, site: str):
    page.goto(f"{site}/calls/ui/{RICH_SID}")
    assert page.url.startswith(f"{site}/calls/ui/login")
    assert page.locator("input[name=key][type=password]").count() == 1

    page.fill("input[name=key]", KEY + "x")
    page.click("form.login button[type=submit]")
    assert page.locator(".error").inner_text() == "That is not the ADMIN_API_KEY."
    assert page.url == f"{site}/calls/ui/login"
    assert page.context.cookies() == []

    page.fill("input[name=key]", KEY)
    page.click("form.login button[type=submit]")
    assert page.url == f"{site}/calls/ui/{RICH_SID}"  # back where the visit began
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert KEY not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # no script can read it


def test_the_call_log_lists_and_filters_calls(page, site: str):
    _login(page, site)
    assert page.url == f"{site}/calls/ui"
    assert _rows(page) == NEWEST_FIRST
    headers = page.eval_on_selector_all("table.calls th", "cells => cells.map(c => c.innerText)")
    assert headers == ["Time (UTC)", "Direction", "From", "To", "Agent", "Duration",
                       "End reason", "Status", "Success"]
    cells = page.eval_on_selector_all(
        f"tr[data-call-sid='{RICH_SID}'] td", "cells => cells.map(c => c.innerText.trim())"
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0])
    assert cells[1:] == ["inbound", "+15550111111", "+15550100000", "support", "0:27",
                         "bot ended", "completed", ""]

    page.select_option("select[name=direction]", "outbound")
    page.click("form.filters button[type=submit]")
    assert "direction=outbound" in page.url
    assert _rows(page) == OUTBOUND
    page.select_option("select[name=status]", "busy")
    page.click("form.filters button[type=submit]")
    assert _rows(page) == [row[0] for row in OTHER_CALLS if row[6] == "busy"]
    assert page.locator("select[name=status]").input_value() == "busy"  # filters kept


def test_the_next_link_pages_through_the_log(page, site: str):
    _login(page, site)
    page.goto(f"{site}/calls/ui?limit=3&persona=")
    seen = _rows(page)
    while page.locator("a.next").count():
        page.click("a.next")
        assert "limit=3" in page.url
        seen += _rows(page)
    assert seen == NEWEST_FIRST  # every call once, in order, over three pages


def test_a_call_shows_its_conversation_recording_and_chart(page, site: str):
    _login(page, site)
    page.click(f"tr[data-call-sid='{RICH_SID}'] a")
    assert page.url == f"{site}/calls/ui/{RICH_SID}"

    entries = page.eval_on_selector_all(
        "ol.transcript li.entry",
        "items => items.map(i => [i.classList[1], i.querySelector('.text').innerText])",
    )
    assert [kind for kind, _ in entries] == [row[0] for row in RICH_TRANSCRIPT]
    for (kind, text), (_, expected, *_rest) in zip(entries, RICH_TRANSCRIPT, strict=True):
        if kind == "function" and expected == "lookup_order":
            assert text.startswith('lookup_order({"order": 42}) → {"status": "shipped"')
        elif kind == "function":  # a tool that failed shows its error, not a result
            assert text == 'check_stock({"sku": "T2"}) → failed: check_stock failed (HTTP 503)'
        else:
            assert text == expected
    # Caller on the left, bot on the right.
    caller = page.locator("li.entry.caller .bubble").first.bounding_box()
    bot = page.locator("li.entry.bot .bubble").first.bounding_box()
    assert caller["x"] + caller["width"] < bot["x"] + bot["width"]
    assert caller["x"] < bot["x"]
    assert page.locator("li.entry.bot .meta .latency").all_inner_texts() == [
        f"reply {latency:.2f} s" for latency in BOT_LATENCIES
    ]
    assert page.locator("li.entry.bot").nth(0).locator(".at").inner_text() == "0:00.4"
    assert page.locator("li.entry.interrupted").count() == 1
    # How long each tool call took.
    assert page.locator("li.entry.function .took").all_inner_texts() == ["took 0.31 s",
                                                                         "took 0.05 s"]

    # The recording plays from the API's route, authorized by the session cookie.
    page.wait_for_function("document.querySelector('audio').readyState >= 1", timeout=10_000)
    assert page.evaluate("document.querySelector('audio').duration") == pytest.approx(6.0)

    heights = page.eval_on_selector_all(
        "svg.latency-chart rect.bar",
        "bars => bars.map(b => [Number(b.dataset.latency), b.getBBox().height])",
    )
    assert [latency for latency, _ in heights] == BOT_LATENCIES
    per_second = heights[0][1] / heights[0][0]
    assert [height for _, height in heights] == pytest.approx(
        [latency * per_second for latency in BOT_LATENCIES], abs=0.2
    )
    assert page.locator("svg.latency-chart rect.bar.interrupted").count() == 1
    assert page.locator("svg.latency-chart line.p50").count() == 1


def test_caller_speech_is_shown_as_text_never_run(page, site: str):
    _login(page, site)
    page.goto(f"{site}/calls/ui/{HOSTILE_SID}")
    said = page.locator("li.entry.caller .text").inner_text()
    assert said == HOSTILE_TEXT
    assert page.evaluate("document.querySelectorAll('main script, main img').length") == 0
    assert "pwned" not in page.title()


def test_logging_out_ends_the_session(page, site: str):
    _login(page, site)
    kept = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    page.click("form.logout button")
    assert page.url == f"{site}/calls/ui/login"
    assert [c for c in page.context.cookies() if c["name"] == COOKIE] == []
    page.goto(f"{site}/calls/ui")
    assert page.url.startswith(f"{site}/calls/ui/login")
    page.context.add_cookies([kept])  # a copy of the cookie taken before the logout
    page.goto(f"{site}/calls/ui")
    assert page.url.startswith(f"{site}/calls/ui/login")  # ended on the server too


# --- over HTTP: the cookie, the guard rails ---------------------------------------------------
@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(_app(tmp_path), follow_redirects=False) as client:
        yield client


def _log_in(client: TestClient, **headers: str):
    return client.post("/calls/ui/login", data={"key": KEY}, headers=headers)


def test_the_cookie_is_httponly_strict_and_secure_over_https(tmp_path: Path):
    app = _app(tmp_path)
    with TestClient(app, follow_redirects=False) as plain:
        cookie = _log_in(plain).headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/calls" in cookie
        assert "Secure" not in cookie  # http://localhost would never send it back
        assert KEY not in cookie
        proxied = _log_in(plain, **{"X-Forwarded-Proto": "https"}).headers["set-cookie"]
        assert "Secure" in proxied
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as https:
        assert "Secure" in _log_in(https).headers["set-cookie"]


def test_the_session_reads_the_api_but_cannot_erase(client: TestClient):
    assert client.get(f"/calls/{RICH_SID}/recording").status_code == 401
    assert _log_in(client).status_code == 303
    recording = client.get(f"/calls/{RICH_SID}/recording")
    assert recording.status_code == 200 and recording.headers["content-type"] == "audio/wav"
    assert client.get(f"/calls/{RICH_SID}").json()["call_sid"] == RICH_SID
    assert client.delete(f"/calls/{RICH_SID}").status_code == 401  # erasing needs the bearer
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert client.get(f"/calls/{RICH_SID}", headers=bearer).status_code == 200


@pytest.mark.parametrize(
    "session",
    [
        new_session("another-key-0123456789"),  # made with another key
        new_session(KEY, now=time.time() - SESSION_TTL_S - 1),  # expired
        new_session(KEY).rsplit(".", 1)[0] + "." + "0" * 64,  # forged signature
        str(int(time.time()) + 10**6) + "." + new_session(KEY).split(".", 1)[1],  # moved expiry
        new_session(KEY),  # signed right, but no login opened it on the server
        KEY,
        "",
    ],
    # Fixed ids: the values hold the time, and xdist's workers must collect the same names.
    ids=["another-key", "expired", "forged", "moved-expiry", "never-opened", "raw-key", "empty"],
)
def test_a_bad_session_cookie_is_refused(client: TestClient, session: str):
    client.cookies.set(COOKIE, session)
    assert client.get("/calls/ui").headers["location"].startswith("/calls/ui/login")
    assert client.get(f"/calls/{RICH_SID}/recording").status_code == 401


def test_logout_needs_the_pages_token(client: TestClient):
    _log_in(client)
    page = client.get("/calls/ui").text
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    assert client.post("/calls/ui/logout").status_code == 403
    assert client.post("/calls/ui/logout", data={"csrf": "0" * 64}).status_code == 403
    assert client.get("/calls/ui").status_code == 200  # still logged in
    out = client.post("/calls/ui/logout", data={"csrf": token})
    assert out.status_code == 303 and out.headers["location"] == "/calls/ui/login"
    assert f'{COOKIE}=""' in out.headers["set-cookie"] and "Max-Age=0" in out.headers["set-cookie"]


def test_login_attempts_are_rate_limited(client: TestClient):
    codes = [client.post("/calls/ui/login", data={"key": f"guess-{n}"}).status_code
             for n in range(10)]
    assert codes == [401] * 10
    refused = client.post("/calls/ui/login", data={"key": KEY})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "Too many attempts" in refused.text and "set-cookie" not in refused.headers


@pytest.mark.parametrize(
    ("query", "field"),
    [("direction=sideways", "direction"), ("since=yesterday", "since"),
     ("limit=0", "limit"), ("cursor=nonsense", "cursor"),
     ("since=2026-11-02&until=2026-11-01", "until")],
)
def test_bad_filters_name_the_field(client: TestClient, query: str, field: str):
    _log_in(client)
    response = client.get(f"/calls/ui?{query}")
    assert response.status_code == 422
    assert re.search(rf'class="error" role="alert">{field}: ', response.text)


def test_login_only_returns_to_this_page(client: TestClient):
    for target in ["https://evil.example/", "//evil.example/calls/ui", "/calls/ui/../../x",
                   "/calls/ui?x=1"]:
        response = client.post("/calls/ui/login", data={"key": KEY, "next": target})
        assert response.headers["location"] == "/calls/ui", target
    kept = client.post("/calls/ui/login", data={"key": KEY, "next": f"/calls/ui/{RICH_SID}"})
    assert kept.headers["location"] == f"/calls/ui/{RICH_SID}"


def test_pages_forbid_scripts_and_caching(client: TestClient):
    _log_in(client)
    for path in ["/calls/ui/login", "/calls/ui", f"/calls/ui/{RICH_SID}"]:
        headers = client.get(path).headers
        assert headers["content-security-policy"].startswith("default-src 'none';"), path
        assert "script-src" not in headers["content-security-policy"]  # falls back to none
        assert headers["cache-control"] == "no-store"
        assert headers["x-frame-options"] == "DENY"


def test_an_unknown_call_is_404(client: TestClient):
    _log_in(client)
    response = client.get("/calls/ui/CA" + "0" * 32)
    assert response.status_code == 404 and "No record of call" in response.text


def test_the_page_is_off_without_a_key(tmp_path: Path):
    with TestClient(_app(tmp_path, admin_api_key=None), follow_redirects=False) as client:
        for method, path in [("GET", "/calls/ui"), ("GET", "/calls/ui/login"),
                             ("POST", "/calls/ui/login")]:
            response = client.request(method, path, data={"key": ""})
            assert response.status_code == 503, (method, path)
            assert "ADMIN_API_KEY" in response.text


def test_the_server_serves_the_page_not_the_api_route_for_a_call_named_ui():
    """`create_app` includes the page's router before the API's: `/calls/{call_sid}` would
    otherwise answer /calls/ui with a 401."""
    from phonebot.web.app import create_app

    app = create_app(make_settings(admin_api_key=KEY))
    response = TestClient(app, follow_redirects=False).get("/calls/ui")  # no lifespan needed
    assert response.status_code == 303
    assert response.headers["location"] == "/calls/ui/login?next=%2Fcalls%2Fui"


# --- the chart ----------------------------------------------------------------------------------
def _entry(seq: int, latency: float | None, kind: str = "bot", interrupted: bool = False):
    return TranscriptEntryOut(seq=seq, kind=kind, speaker="bot", text="x", at_s=float(seq),
                              reply_latency_s=latency, interrupted=interrupted)


def test_the_chart_draws_one_bar_per_bot_turn_to_scale():
    entries = [_entry(0, None), _entry(1, 0.5), _entry(2, None, kind="caller"),
               _entry(3, 1.5, interrupted=True), _entry(4, 1.0)]
    svg = str(latency_chart(entries, p50=1.0, p95=1.45))
    bars = re.findall(r'data-latency="([\d.]+)" x="[\d.]+" y="[\d.]+" width="[\d.]+"'
                      r' height="([\d.]+)"', svg)
    assert [float(latency) for latency, _ in bars] == [0.5, 1.5, 1.0]
    heights = [float(height) for _, height in bars]
    assert heights[1] == pytest.approx(3 * heights[0], abs=0.2)
    assert heights[2] == pytest.approx(2 * heights[0], abs=0.2)
    assert svg.count('class="bar interrupted"') == 1
    assert 'class="p50"' in svg and 'class="p95"' in svg
    assert latency_chart([_entry(0, None), _entry(1, None, kind="caller")]) is None


@pytest.mark.parametrize(("top", "step"), [(0.94, 0.2), (0.2, 0.05), (3.2, 1.0), (40, 10.0),
                                           (1000, 200)])
def test_chart_ticks_are_round_and_few(top: float, step: float):
    assert tick_step(top) == step


@pytest.mark.parametrize(("seconds", "shown"), [(0.4, "0:00.4"), (59.96, "1:00.0"),
                                                (125.25, "2:05.2"), (None, "")])
def test_transcript_times_read_as_minutes_and_seconds(seconds, shown):
    assert _offset(seconds) == shown
