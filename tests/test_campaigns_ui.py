"""The campaigns pages next to the call log: same login, a list with progress, a campaign's
contacts with links to their calls, pause/resume/cancel with the page's token, results."""

from __future__ import annotations

import re

import pytest

from phonebot.web.calls_ui import router as records_ui_router

pytest.register_assert_rewrite("tests.campaigns_fixtures")
from tests.campaigns_fixtures import ADMIN_KEY, NY  # noqa: E402

pytest_plugins = ["tests.campaigns_fixtures"]


@pytest.fixture
async def site(sqlite_harness):
    sqlite_harness.app.include_router(records_ui_router)  # after the campaigns pages
    return sqlite_harness


async def _login(client) -> None:
    response = await client.post("/calls/ui/login", data={"key": ADMIN_KEY})
    assert response.status_code == 303


async def test_the_pages_need_the_login(site):
    response = await site.client.get("/calls/ui/campaigns")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/calls/ui/login")


async def test_campaigns_and_their_progress(site):
    campaign = await site.create(name="summer <sale>", contacts=[{"to": n} for n in NY[:4]])
    await site.tick()
    await site.end(NY[0], "completed", outcomes={"interested": "yes"})
    await site.tick()
    await _login(site.client)
    listing = await site.client.get("/calls/ui/campaigns")
    assert listing.status_code == 200
    assert "summer &lt;sale&gt;" in listing.text  # escaped
    assert 'progress max="100" value="25"' in listing.text
    assert listing.headers["content-security-policy"].startswith("default-src 'none'")
    log = await site.client.get("/calls/ui")
    assert 'href="/calls/ui/campaigns"' in log.text  # the call log links here

    page = await site.client.get(f"/calls/ui/campaigns/{campaign}")
    assert page.status_code == 200
    sid = site.twilio.sid_of(NY[0])
    assert f'href="/calls/ui/{sid}"' in page.text
    assert "interested" in page.text and "completed" in page.text
    csv = await site.client.get(f"/calls/ui/campaigns/{campaign}/results.csv")
    assert csv.status_code == 200 and NY[0] in csv.text

    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    bad = await site.client.post(f"/calls/ui/campaigns/{campaign}/pause", data={"csrf": "x"})
    assert bad.status_code == 403
    paused = await site.client.post(f"/calls/ui/campaigns/{campaign}/pause",
                                    data={"csrf": token})
    assert paused.status_code == 303
    assert (await site.store.get(campaign)).status == "paused"
    missing = await site.client.get("/calls/ui/campaigns/cmp_nope")
    assert missing.status_code == 404
