"""The scheduler, on SQLite and PostgreSQL: windows (a clock moved by hand), retries by
outcome and their delays, the caps, the do-not-call list, unknown results, events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import select

from phonebot.records.schema import EventDelivery
from phonebot.twilio.rest import TwilioUnavailable

pytest.register_assert_rewrite("tests.campaigns_fixtures")
from tests.campaigns_fixtures import LA, NY, build_harness  # noqa: E402

pytest_plugins = ["tests.pg_server", "tests.campaigns_fixtures"]
HOUR = 3600


async def test_the_window_is_read_in_each_contacts_local_time(harness):
    # 15:00 UTC: 10:00 in New York (inside 09:00-20:00), 07:00 in Los Angeles (before it).
    campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": LA[0]},
                                              {"to": NY[1], "timezone": "Asia/Tokyo"}])
    assert await harness.tick() == 1
    assert harness.twilio.dialed() == [NY[0]]  # Tokyo: 00:00, outside too
    states = await harness.states(campaign)
    assert states == {NY[0]: "calling", LA[0]: "pending", NY[1]: "pending"}
    detail = await harness.store.get(campaign)
    waiting = {c.to: c.next_attempt_at for c in detail.contacts}
    assert waiting[LA[0]].hour == 17  # 09:00 in Los Angeles, in UTC

    harness.clock.advance(HOUR)  # 08:00 in Los Angeles: still waiting
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0]]
    harness.clock.advance(HOUR + 1)  # 09:00:01
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0], LA[0]]


async def test_window_days_and_start_at(harness):
    # Wednesday; the window is on weekends only, and the campaign starts in an hour anyway.
    start = harness.clock.now().replace(hour=16)
    campaign = await harness.create(contacts=[{"to": NY[0]}],
                                    window={"days": ["sat", "sun"]}, start_at=start.isoformat())
    assert (await harness.store.get(campaign)).status == "scheduled"
    await harness.tick()
    harness.clock.advance(2 * HOUR)
    await harness.tick()
    assert (await harness.store.get(campaign)).status == "running"
    assert harness.twilio.dialed() == []
    harness.clock.advance(3 * 24 * HOUR)  # Saturday 13:00 in New York
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0]]


async def test_busy_and_no_answer_are_retried_after_the_delay(harness):
    campaign = await harness.create(contacts=[{"to": NY[0]}],
                                    retry={"attempts": 3, "delay_s": 600})
    await harness.tick()
    await harness.end(NY[0], "busy")
    await harness.tick()
    contact = (await harness.store.get(campaign)).contacts[0]
    assert (contact.state, contact.outcome, contact.attempts) == ("pending", "busy", 1)
    harness.clock.advance(599)
    await harness.tick()
    assert len(harness.twilio.dialed()) == 1  # not before delay_s
    harness.clock.advance(2)
    await harness.tick()
    assert len(harness.twilio.dialed()) == 2
    await harness.end(NY[0], "no-answer")
    await harness.tick()  # the outcome is read: the delay counts from here
    harness.clock.advance(601)
    await harness.tick()
    assert len(harness.twilio.dialed()) == 3
    await harness.end(NY[0], "busy")
    await harness.tick()
    contact = (await harness.store.get(campaign)).contacts[0]
    assert (contact.state, contact.outcome, contact.attempts) == ("failed", "busy", 3)
    assert len(contact.call_sids) == 3
    assert (await harness.store.get(campaign)).status == "completed"


async def test_outcomes_decide_done_or_retry(harness):
    campaign = await harness.create(
        contacts=[{"to": n} for n in NY[:4]],
        retry={"attempts": 2, "delay_s": 60, "on": ["busy"]},
    )
    await harness.tick()
    await harness.end(NY[0], "completed", outcomes={"interested": "yes"})
    await harness.end(NY[1], "completed", amd_verdict="machine_end_beep", end_reason="voicemail")
    await harness.end(NY[2], "failed")
    await harness.end(NY[3], "completed", end_reason="opted out")
    await harness.tick()
    detail = await harness.store.get(campaign)
    got = {c.to: (c.state, c.outcome, c.outcomes) for c in detail.contacts}
    assert got == {
        NY[0]: ("completed", "completed", {"interested": "yes"}),
        NY[1]: ("voicemail", "voicemail", None),  # voicemail not in retry.on
        NY[2]: ("failed", "failed", None),
        NY[3]: ("opted_out", "opted-out", None),
    }
    assert detail.status == "completed"


async def test_a_conversation_is_done_only_once_the_bot_wrote_its_end(harness):
    """The status callback's "completed" can land before the bot's end of call."""
    campaign = await harness.create(contacts=[{"to": NY[0]}])
    await harness.tick()
    sid = harness.twilio.sid_of(NY[0])
    from phonebot.records.schema import CallRecord, utcnow

    async with harness.records.sessions.begin() as session:
        session.add(CallRecord(call_sid=sid, created_at=utcnow(), stream_started_at=utcnow(),
                               twilio_status="completed"))
    await harness.tick()
    assert (await harness.states(campaign))[NY[0]] == "calling"
    await harness.end(NY[0], "completed", end_reason="opted out")
    await harness.tick()
    assert (await harness.states(campaign))[NY[0]] == "opted_out"


async def test_max_concurrent_and_calls_per_minute_hold(harness):
    campaign = await harness.create(contacts=[{"to": n} for n in NY[:10]],
                                    max_concurrent=3, calls_per_minute=4)
    assert await harness.tick() == 3
    assert await harness.tick() == 0  # three ringing: no room
    for number in harness.twilio.dialed():
        await harness.end(number, "completed")
    assert await harness.tick() == 1  # 4 per minute: one left this minute
    await harness.end(harness.twilio.dialed()[-1], "completed")
    assert await harness.tick() == 0
    harness.clock.advance(61)
    assert await harness.tick() == 3
    counts = (await harness.store.get(campaign)).counts
    assert counts == {"calling": 3, "completed": 4, "pending": 3}


async def test_the_servers_call_cap_holds(harness):
    """Free slots = MAX_CONCURRENT_CALLS (20) - live - reserved - campaign calls ringing."""
    harness.scheduler.admission = SimpleNamespace(
        draining=False, refusal=lambda: None, live=15, reserved=2)
    await harness.create(contacts=[{"to": n} for n in NY[:10]], max_concurrent=10,
                         calls_per_minute=100)
    assert await harness.tick() == 3
    assert await harness.tick() == 0  # three ringing, not streaming yet
    harness.scheduler.admission.refusal = lambda: "at capacity"
    await harness.end(NY[0], "busy")
    assert await harness.tick() == 0


async def test_the_do_not_call_list_is_checked_before_each_dial(harness):
    campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": NY[1]}],
                                    retry={"attempts": 2, "delay_s": 60})
    await harness.campaigns.dnc.store.add([NY[1]], "asked", source="api")
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0]]
    await harness.end(NY[0], "busy")
    await harness.tick()
    await harness.campaigns.dnc.store.add([NY[0]], None, source="api")  # between attempts
    harness.clock.advance(61)
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0]]
    assert await harness.states(campaign) == {NY[0]: "do_not_call", NY[1]: "do_not_call"}


async def test_an_unknown_create_result_is_not_retried(harness):
    uncertain = TwilioUnavailable("timeout", uncertain=True, detail="Twilio did not answer")
    refused = TwilioUnavailable("503", status=503, detail="Twilio is unavailable")
    harness.twilio.fail = lambda r: uncertain if r.to == NY[0] else refused
    campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": NY[1]}],
                                    retry={"attempts": 2, "delay_s": 60})
    await harness.tick()
    harness.twilio.fail = lambda r: None
    harness.clock.advance(61)
    await harness.tick()
    detail = await harness.store.get(campaign)
    got = {c.to: (c.state, c.outcome, c.attempts) for c in detail.contacts}
    # NY[0] may have rung: never again; NY[1] certainly did not: tried again.
    assert got == {NY[0]: ("unknown", "unknown", 1), NY[1]: ("calling", "failed", 2)}
    assert harness.twilio.dialed() == [NY[0], NY[1], NY[1]]


async def test_pause_stops_dialing_and_cancel_ends(harness):
    campaign = await harness.create(contacts=[{"to": n} for n in NY[:4]], max_concurrent=1)
    await harness.tick()
    await harness.store.act(campaign, "pause", harness.clock.now())
    await harness.end(NY[0], "completed")
    await harness.tick()
    assert harness.twilio.dialed() == [NY[0]]
    assert (await harness.states(campaign))[NY[0]] == "completed"  # outcomes still land
    await harness.store.act(campaign, "resume", harness.clock.now())
    await harness.tick()
    assert harness.twilio.dialed() == NY[:2]
    await harness.store.act(campaign, "cancel", harness.clock.now())
    await harness.end(NY[1], "busy")
    await harness.tick()
    assert harness.twilio.dialed() == NY[:2]
    assert await harness.states(campaign) == {
        NY[0]: "completed", NY[1]: "failed", NY[2]: "canceled", NY[3]: "canceled"}


async def test_end_at_expires_the_contacts_still_waiting(harness):
    end = harness.clock.now().replace(hour=23)
    campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": LA[0]}],
                                    window={"start": "09:00", "end": "17:00"},
                                    end_at=end.isoformat())
    await harness.tick()
    await harness.end(NY[0], "completed")
    harness.clock.advance(9 * HOUR)  # past end_at; Los Angeles is still before its window
    await harness.tick()
    detail = await harness.store.get(campaign)
    assert {c.to: c.state for c in detail.contacts} == {NY[0]: "completed", LA[0]: "expired"}
    assert detail.status == "completed"


async def test_events_for_each_finished_contact_and_the_campaign(tmp_path):
    harness, close = await build_harness(
        f"sqlite:///{tmp_path / 'events.db'}",
        events_webhook_url="http://127.0.0.1:9/events", events_webhook_secret="s" * 32)
    try:
        campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": NY[1]}],
                                        retry={"attempts": 1})
        await harness.tick()
        await harness.end(NY[0], "completed", outcomes={"interested": "no"})
        await harness.end(NY[1], "no-answer")
        await harness.tick()
        async with harness.records.sessions() as session:
            rows = (await session.scalars(
                select(EventDelivery).where(EventDelivery.type.in_(
                    ["contact.finished", "campaign.completed"]))
                .order_by(EventDelivery.created))).all()
    finally:
        await close()
    events = [(r.type, r.payload["data"].get("to"), r.payload["data"].get("state")
               or r.payload["data"].get("status")) for r in rows]
    assert sorted(events, key=str) == sorted([
        ("contact.finished", NY[0], "completed"), ("contact.finished", NY[1], "failed"),
        ("campaign.completed", None, "completed")], key=str)
    finished = next(r.payload["data"] for r in rows if r.payload["data"].get("to") == NY[0])
    assert finished["campaign_id"] == campaign and finished["outcomes"] == {"interested": "no"}


async def test_a_call_whose_end_never_arrives_does_not_hold_its_place(harness):
    """A lost status callback must not stall the campaign at max_concurrent for ever."""
    campaign = await harness.create(contacts=[{"to": NY[0]}, {"to": NY[1]}], max_concurrent=1)
    await harness.tick()
    harness.clock.advance(harness.records.settings.max_call_duration_s + 599)
    assert await harness.tick() == 0  # still possibly on the line
    harness.clock.advance(2)
    assert await harness.tick() == 1
    assert await harness.states(campaign) == {NY[0]: "unknown", NY[1]: "calling"}


@pytest.mark.parametrize(
    ("given", "detection"), [(False, False), (True, True), ("twilio", True), ("bot", "bot")]
)
async def test_each_call_asks_for_the_campaigns_machine_detection(harness, given, detection):
    """Twilio's AMD (true, or "twilio"; a campaign from before revision 0004 reads so too),
    the bot listening itself ("bot", kept in its own column since 0004) or none: stored,
    shown, and asked for on every call."""
    campaign = await harness.create(contacts=[{"to": NY[0]}], machine_detection=given)
    assert (await harness.store.get(campaign)).machine_detection == detection
    await harness.tick()
    assert [r.machine_detection for r in harness.twilio.requests] == [detection]
