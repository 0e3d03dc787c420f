"""Reading the records: the store's filters and pages (SQLite and PostgreSQL) and the /calls
API behind ADMIN_API_KEY."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from phonebot.records import Records
from phonebot.records.schema import CallRecord, TranscriptEntry
from phonebot.records.store import CallFilter
from phonebot.web.calls_api import router
from phonebot.web.services import AppServices, app_services
from tests.conftest import make_settings

pytest_plugins = ["tests.pg_server"]
ADMIN_KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CALLS = [
    # call_sid, minutes after T0, direction, from, to, persona, campaign, end_reason, status
    ("CA0", 0, "inbound", "+15550000001", "+15559999999", "support", None, "caller hung up",
     "completed"),
    ("CA1", 1, "outbound", "+15559999999", "+15550000002", "sales", "spring", "voicemail",
     "completed"),
    ("CA2", 2, "outbound", "+15559999999", "+15550000003", "sales", "spring", "not connected",
     "busy"),
    ("CA3", 3, "inbound", "+15550000002", "+15559999999", "support", None, "bot ended",
     "completed"),
    ("CA4", 4, "outbound", "+15559999999", "+15550000001", "sales", "autumn", "not connected",
     "no-answer"),
]


async def seed(records: Records, recording: Path | None = None) -> None:
    async with records.sessions.begin() as session:
        for sid, minutes, direction, src, dst, persona, campaign, reason, status in CALLS:
            session.add(CallRecord(
                call_sid=sid, created_at=T0 + timedelta(minutes=minutes), direction=direction,
                from_number=src, to_number=dst, persona=persona, campaign_id=campaign,
                end_reason=reason, twilio_status=status,
                parameters={"session_type": persona},
                recording_path=str(recording) if recording and sid == "CA0" else None,
            ))
        session.add_all(
            TranscriptEntry(call_sid="CA0", seq=seq, kind=kind, speaker=speaker, text=text,
                            at_s=float(seq), interrupted=False)
            for seq, (kind, speaker, text) in enumerate(
                [("bot", "bot", "Hello"), ("caller", "caller", "hi"), ("keypad", "caller", "1")]
            )
        )


@pytest.fixture
async def records(database_url: str):
    records = Records(make_settings(database_url=database_url, admin_api_key=ADMIN_KEY))
    await records.start()
    await seed(records)
    yield records
    await records.stop()


FILTERS = [
    (CallFilter(), ["CA4", "CA3", "CA2", "CA1", "CA0"]),
    (CallFilter(direction="inbound"), ["CA3", "CA0"]),
    (CallFilter(persona="sales"), ["CA4", "CA2", "CA1"]),
    (CallFilter(campaign_id="spring"), ["CA2", "CA1"]),
    (CallFilter(end_reason="not connected"), ["CA4", "CA2"]),
    (CallFilter(status="busy"), ["CA2"]),
    (CallFilter(number="+15550000001"), ["CA4", "CA0"]),  # as caller and as callee
    (CallFilter(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)),
     ["CA2", "CA1"]),
    (CallFilter(direction="outbound", campaign_id="spring", status="busy"), ["CA2"]),
]


async def test_the_store_filters(records: Records):
    for where, expected in FILTERS:
        page = await records.store.list(where)
        assert [c.call_sid for c in page.calls] == expected, where
        assert page.next_cursor is None


async def test_pages_follow_the_cursor_without_repeats(records: Records):
    seen, cursor = [], None
    for _ in range(3):
        page = await records.store.list(limit=2, cursor=cursor)
        seen += [c.call_sid for c in page.calls]
        cursor = page.next_cursor
    assert seen == ["CA4", "CA3", "CA2", "CA1", "CA0"]
    assert cursor is None


async def test_delete_erases_the_record_and_its_transcript(records: Records):
    assert await records.store.delete("CA0") == (True, None)
    assert await records.store.get("CA0") is None
    async with records.sessions() as session:
        left = await session.scalar(select(func.count()).select_from(TranscriptEntry))
    assert left == 0
    assert await records.store.delete("CA0") == (False, None)


# --- the HTTP API (SQLite is enough: the store above runs on both) -----------------------
@pytest.fixture
async def api(tmp_path: Path):
    recording = tmp_path / "CA0.wav"
    recording.write_bytes(b"RIFF....WAVEfmt ")
    records = Records(make_settings(
        database_url=f"sqlite:///{tmp_path / 'api.db'}", admin_api_key=ADMIN_KEY
    ))
    await records.start()
    await seed(records, recording)
    app = FastAPI()
    app.state.services = AppServices.build(records.settings, records=records)
    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        client.recording = recording
        client.app = app
        yield client
    await records.stop()


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY}]
)
async def test_the_api_wants_the_admin_key(api, headers):
    for method, path in [("GET", "/calls"), ("GET", "/calls/CA0"),
                         ("GET", "/calls/CA0/recording"), ("DELETE", "/calls/CA0")]:
        response = await api.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await api.get("/calls/CA0", headers=AUTH)).status_code == 200  # nothing deleted


async def test_the_api_is_off_without_a_key(api):
    app_services(api.app).settings = make_settings(admin_api_key=None)
    response = await api.get("/calls", headers=AUTH)
    assert response.status_code == 503
    assert "ADMIN_API_KEY" in response.json()["detail"]


async def test_list_with_filters_and_pages(api):
    response = await api.get(
        "/calls", params={"direction": "outbound", "status": "completed"}, headers=AUTH
    )
    assert response.status_code == 200
    body = response.json()
    assert [c["call_sid"] for c in body["calls"]] == ["CA1"]
    assert body["calls"][0]["from"] == "+15559999999" and body["calls"][0]["to"]

    first = (await api.get("/calls", params={"limit": 3}, headers=AUTH)).json()
    rest = (await api.get(
        "/calls", params={"limit": 3, "cursor": first["next_cursor"]}, headers=AUTH
    )).json()
    assert [c["call_sid"] for c in first["calls"] + rest["calls"]] == [
        "CA4", "CA3", "CA2", "CA1", "CA0"
    ]
    since = (await api.get(
        "/calls", params={"since": "2026-11-01T12:03:00Z", "number": "+15550000001"},
        headers=AUTH,
    )).json()
    assert [c["call_sid"] for c in since["calls"]] == ["CA4"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"direction": "sideways"}, "direction"),
        ({"since": "last tuesday"}, "since"),
        ({"until": "2026-13-45"}, "until"),
        ({"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "until"),
        ({"limit": "0"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
async def test_bad_filters_are_422_naming_the_field(api, params, field):
    response = await api.get("/calls", params=params, headers=AUTH)
    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["query", field]]


async def test_one_call_with_its_transcript(api):
    response = await api.get("/calls/CA0", headers=AUTH)
    assert response.status_code == 200
    call = response.json()
    assert call["has_recording"] is True and call["parameters"] == {"session_type": "support"}
    assert [(e["seq"], e["speaker"], e["text"]) for e in call["transcript"]] == [
        (0, "bot", "Hello"), (1, "caller", "hi"), (2, "caller", "1")
    ]
    assert (await api.get("/calls/CAnope", headers=AUTH)).status_code == 404


async def test_the_recording_is_served_as_wav(api):
    response = await api.get("/calls/CA0/recording", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert response.content == api.recording.read_bytes()
    assert (await api.get("/calls/CA1/recording", headers=AUTH)).status_code == 404
    assert (await api.get("/calls/CAnope/recording", headers=AUTH)).status_code == 404


async def test_delete_erases_record_transcript_and_recording(api):
    response = await api.delete("/calls/CA0", headers=AUTH)
    assert response.status_code == 204
    assert not api.recording.exists()
    assert (await api.get("/calls/CA0", headers=AUTH)).status_code == 404
    assert (await api.delete("/calls/CA0", headers=AUTH)).status_code == 404


async def test_the_openapi_schema_has_typed_responses(api):
    schema = (await api.get("/openapi.json")).json()
    listing = schema["paths"]["/calls"]["get"]["responses"]["200"]["content"]
    assert listing["application/json"]["schema"]["$ref"].endswith("/CallPage")
    assert "transcript" in schema["components"]["schemas"]["CallDetail"]["properties"]
    assert "audio/wav" in schema["paths"]["/calls/{call_sid}/recording"]["get"]["responses"][
        "200"]["content"]
