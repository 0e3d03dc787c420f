"""The campaigns API: creating (JSON and CSV), reading, pause/resume/cancel, results.csv,
the do-not-call list, and every bad input answered 422 naming its field and row."""

from __future__ import annotations

import csv
import io
import json

import pytest

pytest.register_assert_rewrite("tests.campaigns_fixtures")
from tests.campaigns_fixtures import AUTH, LA, NY  # noqa: E402

pytest_plugins = ["tests.pg_server", "tests.campaigns_fixtures"]

GOOD = {"name": "summer sale", "parameters": {"campaign_id": "summer_sale"},
        "contacts": [{"to": NY[0], "customer_id": "c-1"}, {"to": LA[0]}]}


async def test_a_campaign_is_created_and_read(sqlite_harness):
    api = sqlite_harness.client
    response = await api.post("/campaigns", json=GOOD, headers=AUTH)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "running" and created["contacts"] == 2
    detail = (await api.get(f"/campaigns/{created['id']}", headers=AUTH)).json()
    assert detail["status"] == "running"
    assert detail["counts"] == {"pending": 2} and detail["total"] == 2
    assert [(c["to"], c["state"], c["attempts"], c["call_sids"]) for c in detail["contacts"]] == [
        (NY[0], "pending", 0, []), (LA[0], "pending", 0, [])]
    # The zone comes from the number when the contact gives none.
    assert [c["timezone"] for c in detail["contacts"]] == ["America/New_York",
                                                           "America/Los_Angeles"]
    listed = (await api.get("/campaigns", headers=AUTH)).json()["campaigns"]
    assert [c["id"] for c in listed] == [created["id"]]


async def test_a_csv_upload_makes_the_same_campaign(sqlite_harness):
    text = "to,customer_id,timezone,first_name\n" \
           f"{NY[0]},c-1,,Ann\n{LA[0]},c-2,Europe/Paris,Bob\n"
    options = {"name": "csv", "window": {"start": "10:00", "end": "18:00", "days": ["mon"]}}
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH,
        files={"contacts": ("contacts.csv", text, "text/csv")},
        data={"campaign": json.dumps(options)},
    )
    assert response.status_code == 201, response.text
    detail = await sqlite_harness.store.get(response.json()["id"])
    assert detail.window.start == "10:00" and detail.window.days == ["mon"]
    assert [(c.to, c.customer_id, c.timezone) for c in detail.contacts] == [
        (NY[0], "c-1", "America/New_York"), (LA[0], "c-2", "Europe/Paris")]


async def test_duplicates_are_merged_and_reported(sqlite_harness):
    body = {"name": "dups", "contacts": [
        {"to": NY[0]}, {"to": "+1 (202) 555-0100", "customer_id": "c-9"}, {"to": LA[0]}]}
    response = await sqlite_harness.client.post("/campaigns", json=body, headers=AUTH)
    assert response.status_code == 201
    assert response.json()["duplicates"] == [{"to": NY[0], "rows": [1, 2]}]
    detail = await sqlite_harness.store.get(response.json()["id"])
    assert [(c.to, c.customer_id) for c in detail.contacts] == [(NY[0], "c-9"), (LA[0], None)]


BAD = [
    ("invalid-number", {"contacts": [{"to": NY[0]}, {"to": "+15551234567"}]},
     ["body", "contacts", 1, "to"], "row 2"),
    ("unknown-zone", {"contacts": [{"to": NY[0], "timezone": "Mars/Olympus"}]},
     ["body", "contacts", 0, "timezone"], "row 1"),
    ("premium-number", {"contacts": [{"to": "+19005550100"}]},
     ["body", "contacts", 0, "to"], "premium-rate"),
    ("other-country", {"contacts": [{"to": "+33612345678"}]},
     ["body", "contacts", 0, "to"], "DIALOUT_ALLOWED_COUNTRIES"),
    ("reversed-window", {"window": {"start": "20:00", "end": "09:00"}},
     ["body", "window"], "window.end must be after window.start"),
    ("empty-window", {"window": {"start": "09:00", "end": "09:00"}},
     ["body", "window"], "empty or reversed"),
    ("bad-hour", {"window": {"start": "9am", "end": "20:00"}},
     ["body", "window", "start"], "HH:MM"),
    ("no-days", {"window": {"days": []}}, ["body", "window", "days"], "at least 1"),
    ("bad-parameter", {"contacts": [{"to": NY[0], "parameters": {"token": "x"}}]},
     ["body", "contacts", 0, "parameters", "token"], "reserved"),
    ("no-contacts", {"contacts": []}, ["body", "contacts"], "at least 1"),
]


@pytest.mark.parametrize(("change", "loc", "says"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_bad_input_is_422_naming_the_field_and_row(sqlite_harness, change, loc, says):
    body = {**GOOD, **change}
    response = await sqlite_harness.client.post("/campaigns", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and says in e["msg"] for e in errors), errors
    assert await sqlite_harness.store.list() == []  # nothing was created


async def test_too_many_contacts(tmp_path):
    from tests.campaigns_fixtures import build_harness

    harness, close = await build_harness(f"sqlite:///{tmp_path / 'c.db'}",
                                         max_campaign_contacts=2)
    try:
        body = {**GOOD, "contacts": [{"to": n} for n in NY[:3]]}
        response = await harness.client.post("/campaigns", json=body, headers=AUTH)
        assert response.status_code == 422
        assert "MAX_CAMPAIGN_CONTACTS (2)" in response.json()["detail"][0]["msg"]
    finally:
        await close()


async def test_a_csv_without_a_number_column_is_422(sqlite_harness):
    response = await sqlite_harness.client.post(
        "/campaigns", headers=AUTH, files={"contacts": ("c.csv", "name\nAnn\n", "text/csv")},
        data={"campaign": json.dumps({"name": "x"})},
    )
    assert response.status_code == 422
    assert "needs a column named one of to" in response.text


async def test_the_api_wants_the_admin_key(sqlite_harness):
    api = sqlite_harness.client
    for method, path in [("POST", "/campaigns"), ("GET", "/campaigns"), ("GET", "/dnc"),
                         ("POST", "/dnc"), ("DELETE", "/dnc/+12025550100")]:
        response = await api.request(method, path, headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401, (method, path)


async def test_pause_resume_cancel(sqlite_harness):
    api = sqlite_harness.client
    campaign = (await api.post("/campaigns", json=GOOD, headers=AUTH)).json()["id"]

    async def act(action: str) -> tuple[int, dict]:
        response = await api.post(f"/campaigns/{campaign}/{action}", headers=AUTH)
        return response.status_code, response.json()

    assert await act("pause") == (200, {"id": campaign, "status": "paused"})
    assert (await act("pause"))[0] == 409
    assert await act("resume") == (200, {"id": campaign, "status": "running"})
    assert await act("cancel") == (200, {"id": campaign, "status": "canceled"})
    assert (await act("resume"))[0] == 409
    detail = (await api.get(f"/campaigns/{campaign}", headers=AUTH)).json()
    assert detail["counts"] == {"canceled": 2}
    assert (await api.post("/campaigns/cmp_nope/pause", headers=AUTH)).status_code == 404


async def test_results_csv(sqlite_harness):
    harness = sqlite_harness
    campaign = await harness.create(**GOOD)
    await harness.tick()
    await harness.end(NY[0], "completed", outcomes={"interested": "yes"})
    await harness.tick()
    response = await harness.client.get(f"/campaigns/{campaign}/results.csv", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    # A leading + is escaped like any formula start (phonebot.csv_cells, OWASP's rule).
    assert [(r["to"], r["state"], r["attempts"], r["outcome"]) for r in rows] == [
        (f"'{NY[0]}", "completed", "1", "completed"), (f"'{LA[0]}", "pending", "0", "")]
    assert json.loads(rows[0]["outcomes"]) == {"interested": "yes"}
    assert rows[0]["call_sids"] == harness.twilio.sid_of(NY[0])


async def test_the_do_not_call_list(sqlite_harness):
    api = sqlite_harness.client
    response = await api.post("/dnc", json={"numbers": [NY[0], "+1 202-555-0101"],
                                            "reason": "asked by email"}, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"added": 2, "numbers": [NY[0], NY[1]]}
    again = await api.post("/dnc", json={"numbers": [NY[1]]}, headers=AUTH)
    assert again.json()["added"] == 0
    listed = (await api.get("/dnc", headers=AUTH)).json()["numbers"]
    assert [(e["number"], e["source"], e["reason"]) for e in listed] == [
        (NY[0], "api", "asked by email"), (NY[1], "api", "asked by email")]
    assert (await api.delete(f"/dnc/{NY[0]}", headers=AUTH)).status_code == 204
    assert (await api.delete(f"/dnc/{NY[0]}", headers=AUTH)).status_code == 404
    bad = await api.post("/dnc", json={"numbers": [NY[0], "12"]}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "numbers", 1]


async def test_the_openapi_docs_type_both_bodies(sqlite_harness):
    schema = (await sqlite_harness.client.get("/openapi.json")).json()
    body = schema["paths"]["/campaigns"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/CampaignIn"}
    assert "multipart/form-data" in body
    assert "CampaignDetail" in schema["components"]["schemas"]


async def test_a_campaign_names_its_agent_for_every_call(sqlite_harness):
    """`"agent"` is checked against the agents in use (422 naming it, or the row of a
    contact's `agent` column) and kept as the `agent` parameter every dial carries."""
    api = sqlite_harness.client
    unknown = await api.post("/campaigns", json={**GOOD, "agent": "nobody"}, headers=AUTH)
    assert unknown.status_code == 422
    [error] = unknown.json()["detail"]
    assert error["loc"] == ["body", "agent"] and "no agent named 'nobody'" in error["msg"]
    row = {**GOOD, "contacts": [{"to": NY[0]}, {"to": LA[0], "parameters": {"agent": "x"}}]}
    refused = await api.post("/campaigns", json=row, headers=AUTH)
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "contacts", 1, "parameters", "agent"] and error["row"] == 2
    clash = {**GOOD, "agent": "sales", "parameters": {"agent": "support"}}
    assert (await api.post("/campaigns", json=clash, headers=AUTH)).status_code == 422

    campaign = await sqlite_harness.create(**{**GOOD, "agent": "sales"})
    detail = (await api.get(f"/campaigns/{campaign}", headers=AUTH)).json()
    assert detail["agent"] == "sales"
    assert detail["parameters"] == {"campaign_id": "summer_sale", "agent": "sales"}
    assert await sqlite_harness.tick() == 1  # 10:00 in New York; 07:00 in LA is too early
    [dialed] = sqlite_harness.twilio.requests
    assert dialed.parameters["agent"] == "sales" and dialed.call_parameters()["agent"] == "sales"
