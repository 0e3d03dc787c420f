"""Fixtures for the campaign tests: records + campaigns on a fresh database, a clock moved
by hand, and a fake `place_call` that remembers every dial (the Twilio side is the
emulator in test_campaigns_emulator.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from phonebot.campaigns.service import Campaigns
from phonebot.campaigns.windows import ManualClock
from phonebot.records import Records
from phonebot.records.schema import CallRecord, utcnow
from phonebot.twilio.dialout import DialoutRequest, DialoutResponse
from phonebot.web.app import create_app
from phonebot.web.campaigns import EXCEPTION_HANDLERS, ROUTERS
from phonebot.web.services import AppServices
from tests.browser import ServedApp
from tests.conftest import make_settings

ADMIN_KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Wednesday 2026-11-25 15:00 UTC = 10:00 in New York (+1 202), 07:00 in Los Angeles (+1 415).
T0 = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
NY = [f"+1202555{n:04d}" for n in range(100, 200)]  # America/New_York
LA = [f"+1415555{n:04d}" for n in range(100, 200)]  # America/Los_Angeles
_sids = itertools.count(1)


def new_sid() -> str:
    return f"CA{next(_sids):032x}"


class FakeTwilio:
    """`place_call` stand-in: every request it got, and a CallSid for each."""

    def __init__(self) -> None:
        self.requests: list[DialoutRequest] = []
        self.sids: dict[str, str] = {}  # call_sid -> number
        self.fail: Callable[[DialoutRequest], Exception | None] = lambda _: None
        self.delay_s = 0.0
        self.hang: set[str] = set()  # numbers whose calls.create never answers

    async def __call__(self, request: DialoutRequest) -> DialoutResponse:
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if request.to in self.hang:
            await asyncio.Event().wait()
        if (error := self.fail(request)) is not None:
            raise error
        sid = new_sid()
        self.sids[sid] = request.to
        return DialoutResponse(call_sid=sid, status="queued", to=request.to)

    def dialed(self) -> list[str]:
        return [r.to for r in self.requests]

    def sid_of(self, number: str) -> str:
        return [sid for sid, to in self.sids.items() if to == number][-1]


async def end_call(records: Records, call_sid: str, status: str, **fields: Any) -> None:
    """What the status callback (and, for an answered call, the bot) write at the end.

    After the writer's queued start of the record (the scheduler's), as in a real call."""
    await records.writer.flush()
    async with records.sessions.begin() as session:
        row = await session.get(CallRecord, call_sid)
        if row is None:
            row = CallRecord(call_sid=call_sid, created_at=utcnow())
            session.add(row)
        row.twilio_status = status
        if status == "completed":
            row.stream_started_at = row.stream_started_at or utcnow()
            row.ended_at = utcnow()
            row.end_reason = fields.pop("end_reason", "bot ended")
        for name, value in fields.items():
            setattr(row, name, value)


class Harness:
    """An app with records and campaigns (no server.py), its client, clock and fake Twilio."""

    def __init__(self, records: Records, campaigns: Campaigns, client: httpx.AsyncClient,
                 clock: ManualClock, twilio: FakeTwilio) -> None:
        self.records, self.campaigns, self.client = records, campaigns, client
        self.clock, self.twilio = clock, twilio
        self.store = campaigns.store
        self.scheduler = campaigns.scheduler

    async def create(self, **body: Any) -> str:
        body.setdefault("name", "test")
        response = await self.client.post("/campaigns", json=body, headers=AUTH)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    async def tick(self) -> int:
        started = await self.scheduler.tick()
        await self.scheduler.settle()
        return started

    async def states(self, campaign_id: str) -> dict[str, str]:
        detail = await self.store.get(campaign_id)
        return {c.to: c.state for c in detail.contacts}

    async def end(self, number: str, status: str, **fields: Any) -> None:
        await end_call(self.records, self.twilio.sid_of(number), status, **fields)


async def build_harness(database_url: str, **settings: Any) -> tuple[Harness, Any]:
    values = {"database_url": database_url, "admin_api_key": ADMIN_KEY, **settings}
    records = Records(make_settings(**values))
    await records.start()
    clock, twilio = ManualClock(T0), FakeTwilio()
    campaigns = Campaigns(records.settings, records, dial=twilio, clock=clock)
    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)
    app.state.services = AppServices.build(records.settings, records=records, campaigns=campaigns)
    for router in ROUTERS:
        app.include_router(router)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    harness = Harness(records, campaigns, client, clock, twilio)
    harness.app = app

    async def close() -> None:
        await campaigns.stop()
        await client.aclose()
        await records.stop()

    return harness, close


@pytest.fixture
async def harness(database_url: str):
    built, close = await build_harness(database_url)
    try:
        yield built
    finally:
        await close()


@pytest.fixture
async def sqlite_harness(tmp_path):
    built, close = await build_harness(f"sqlite:///{tmp_path / 'campaigns.db'}")
    try:
        yield built
    finally:
        await close()


@pytest.fixture
def campaign_server(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The server's whole app on a free port (its own TWILIO_PHONE_NUMBER, no scheduler:
    nothing is dialed), for `python -m phonebot.campaigns`, its client. The terminal's
    environment has only what the README gives it: the server's URL and the admin key."""
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'server.db'}",
                             admin_api_key=ADMIN_KEY, campaign_scheduler=False)
    with ServedApp(create_app(settings)) as served:
        monkeypatch.setenv("PHONEBOT_URL", served.base_url)
        monkeypatch.setenv("ADMIN_API_KEY", ADMIN_KEY)
        yield served.base_url
