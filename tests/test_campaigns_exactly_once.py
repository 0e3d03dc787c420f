"""Nobody is rung twice for one attempt: across a restart in the middle of a campaign
(SQLite and PostgreSQL), and with two schedulers, each with its own engine, claiming from
one PostgreSQL database at the same time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime

import pytest

pytest.register_assert_rewrite("tests.campaigns_fixtures")
from tests.campaigns_fixtures import NY, T0, FakeTwilio, build_harness, end_call  # noqa: E402

pytest_plugins = ["tests.pg_server", "tests.campaigns_fixtures"]


async def test_a_restart_resumes_without_ringing_anyone_twice(database_url: str):
    first, close_first = await build_harness(database_url, campaign_unknown_after_s=120)
    first.twilio.hang = {NY[2]}  # the process dies inside this calls.create
    campaign = await first.create(contacts=[{"to": n} for n in NY[:6]], max_concurrent=3,
                                  retry={"attempts": 2, "delay_s": 60})
    await first.scheduler.tick()
    await asyncio.sleep(0.2)
    for task in list(first.scheduler._dialing):  # the crash: nothing more is written
        task.cancel()
    await close_first()
    assert first.twilio.dialed() == NY[:3]

    second, close_second = await build_harness(database_url, campaign_unknown_after_s=120)
    try:
        second.clock.set(first.clock.now())
        assert await second.tick() == 0  # three still in progress: max_concurrent 3
        await end_call(second.records, first.twilio.sid_of(NY[0]), "completed")
        await end_call(second.records, first.twilio.sid_of(NY[1]), "busy")
        # NY[0] is done and NY[1] waits its delay: two places; NY[2] still holds one.
        assert await second.tick() == 2
        assert second.twilio.dialed() == [NY[3], NY[4]]
        second.clock.advance(121)  # the claim of NY[2] was never confirmed: it may have rung
        await second.tick()
        states = await second.states(campaign)
        assert states[NY[2]] == "unknown"
        for _ in range(4):
            for sid in list(second.twilio.sids):
                await end_call(second.records, sid, "completed")
            second.clock.advance(61)
            await second.tick()
        states = await second.states(campaign)
        assert states == {NY[0]: "completed", NY[1]: "completed", NY[2]: "unknown",
                          NY[3]: "completed", NY[4]: "completed", NY[5]: "completed"}
        # Every number rung once per attempt: NY[1] twice (busy, then its retry).
        rung = Counter(first.twilio.dialed() + second.twilio.dialed())
        assert rung == {NY[0]: 1, NY[1]: 2, NY[2]: 1, NY[3]: 1, NY[4]: 1, NY[5]: 1}
    finally:
        await close_second()


class Callees:
    """The people called: answer after a moment, busy on the first try for some numbers;
    counts how many calls are in progress at once across every scheduler."""

    def __init__(self, busy_first: set[str]) -> None:
        self.busy_first = busy_first
        self.live = 0
        self.most = 0
        self.tries: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()

    def dialed(self, twilio: FakeTwilio, records):
        """The scheduler's dial, through `twilio`; the call ends through `records`, the
        placing process's, whose writer holds the record's start (`end_call` waits for it,
        as a real status callback comes after it: through the other process, its insert
        and the record's start could collide)."""
        original = twilio.__call__

        async def dial(request):
            placed = await original(request)
            self.tries[request.to] += 1
            self.live += 1
            self.most = max(self.most, self.live)
            task = asyncio.create_task(self._talk(records, placed.call_sid, request.to))
            self.tasks.add(task)
            return placed

        return dial

    async def _talk(self, records, call_sid: str, number: str) -> None:
        await asyncio.sleep(random.uniform(0.01, 0.05))
        status = "busy" if number in self.busy_first and self.tries[number] == 1 else "completed"
        self.live -= 1
        await end_call(records, call_sid, status)


async def test_two_schedulers_on_one_postgresql_never_ring_anyone_twice(postgres_server):
    url = postgres_server.create_database()
    numbers = NY[:30]
    one, close_one = await build_harness(url)
    two, close_two = await build_harness(url)
    callees = Callees(busy_first=set(numbers[::3]))
    for harness in (one, two):
        harness.scheduler.dial = callees.dialed(harness.twilio, harness.records)
        harness.scheduler.name = f"scheduler-{id(harness)}"
    try:
        campaign = await one.create(contacts=[{"to": n} for n in numbers], max_concurrent=5,
                                    calls_per_minute=1000, retry={"attempts": 2, "delay_s": 0})
        for round_ in range(200):
            pair = (one, two) if round_ % 2 else (two, one)  # neither always goes first
            await asyncio.gather(*(h.scheduler.tick() for h in pair))
            await asyncio.sleep(0.01)
            states = await one.states(campaign)
            if all(state == "completed" for state in states.values()):
                break
        await asyncio.gather(one.scheduler.settle(), two.scheduler.settle())
        states = await one.states(campaign)
    finally:
        await asyncio.gather(*callees.tasks, return_exceptions=True)
        await close_one()
        await close_two()
    assert set(states.values()) == {"completed"}
    assert one.twilio.requests and two.twilio.requests  # both took part
    rung = Counter(one.twilio.dialed() + two.twilio.dialed())
    assert rung == {n: 2 if n in numbers[::3] else 1 for n in numbers}
    assert callees.most <= 5  # max_concurrent held across both


async def test_a_claim_skips_what_another_process_has_locked(postgres_server):
    """What makes the above hold, shown deterministically: while another connection holds
    the campaign row (a claim in progress elsewhere), a claim takes nothing and does not
    wait; while it holds one contact's row, a claim takes the others."""
    from sqlalchemy import select

    from phonebot.campaigns.schema import Campaign, CampaignContact

    url = postgres_server.create_database()
    harness, close = await build_harness(url)
    try:
        campaign = await harness.create(contacts=[{"to": n} for n in NY[:3]])
        now = harness.clock.now()
        async with harness.records.sessions.begin() as other:
            await other.scalar(select(Campaign).where(Campaign.id == campaign)
                               .with_for_update())
            claims = await asyncio.wait_for(harness.store.claim(campaign, now, 5, "b"), 5)
            assert claims == []
        async with harness.records.sessions.begin() as other:
            await other.scalar(select(CampaignContact).where(CampaignContact.to_number == NY[0])
                               .with_for_update())
            claims = await asyncio.wait_for(harness.store.claim(campaign, now, 5, "b"), 5)
            assert sorted(c.to for c in claims) == NY[1:3]
        claims = await harness.store.claim(campaign, now, 5, "b")
        assert [c.to for c in claims] == [NY[0]]
        assert await harness.store.claim(campaign, now, 5, "b") == []  # all claimed once
    finally:
        await close()


# A scheduler process: its own interpreter, engine and connections. Its "Twilio" appends
# each dial to a shared file and its callees end each call a moment later (busy on the
# first try for every third number), writing what /status and the bot would write. Its
# clock is the real one moved by the same shift in both processes, to the harness's T0
# (a Wednesday, 10:00 in New York): inside the calling window whenever the suite runs.
WORKER = r"""
import asyncio, os, random, sys
from datetime import UTC, datetime, timedelta
from phonebot.twilio.dialout import DialoutResponse
from phonebot.campaigns.store import CampaignStore
from phonebot.campaigns.scheduler import CampaignScheduler
from phonebot.campaigns.windows import SystemClock
from phonebot.records import Records
from tests.campaigns_fixtures import end_call, NY
from tests.conftest import make_settings

url, log, deadline, campaign = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
shift = timedelta(seconds=float(sys.argv[5]))
busy_first = set(NY[:30:3])

class ShiftedClock(SystemClock):
    def now(self):
        return datetime.now(UTC) + shift

async def main():
    records = Records(make_settings(database_url=url, campaign_tick_s=0.05))
    await records.start()
    tries, tasks = {}, set()

    async def talk(sid, to):
        await asyncio.sleep(random.uniform(0.01, 0.1))
        first = to in busy_first and not os.path.exists(f"{log}.{to}")
        if first:
            open(f"{log}.{to}", "w").close()
        await end_call(records, sid, "busy" if first else "completed")

    async def dial(request):
        sid = "CA" + os.urandom(16).hex()
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {request.to}\n")
        tasks.add(asyncio.create_task(talk(sid, request.to)))
        return DialoutResponse(call_sid=sid, status="queued", to=request.to)

    store = CampaignStore(records.sessions, records.settings)
    scheduler = CampaignScheduler(store, records.settings, dial=dial, clock=ShiftedClock())
    loop = asyncio.get_running_loop()
    # Start together: both interpreters are up (a loaded machine takes seconds for each).
    open(f"{log}.ready.{os.getpid()}", "w").close()
    folder = os.path.dirname(log)
    while loop.time() < deadline and sum(".ready." in f for f in os.listdir(folder)) < 2:
        await asyncio.sleep(0.05)
    while loop.time() < deadline and (await store.get(campaign)).status != "completed":
        await scheduler.tick()
        await asyncio.sleep(random.uniform(0, 0.05))
    await scheduler.settle()
    await asyncio.gather(*tasks)
    await records.stop()

asyncio.run(main())
"""


async def test_two_scheduler_processes_on_one_postgresql(postgres_server, tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = postgres_server.create_database()
    numbers = NY[:30]
    harness, close = await build_harness(url)
    try:
        campaign = await harness.create(contacts=[{"to": n} for n in numbers],
                                        max_concurrent=4, calls_per_minute=1000,
                                        retry={"attempts": 2, "delay_s": 0})
        log = tmp_path / "dials.log"
        root = Path(__file__).resolve().parent.parent
        # Both start claiming at the same moment (monotonic clocks are system-wide here).
        # Generous: a loaded machine takes seconds to start each interpreter; the workers
        # stop as soon as the campaign is completed.
        deadline = time.monotonic() + 90
        shift = (T0 - datetime.now(UTC)).total_seconds()  # the workers' clock: T0 and on
        workers = [
            subprocess.Popen([sys.executable, "-c", WORKER, url, str(log), str(deadline),
                              campaign, str(shift)],
                             cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        try:
            states: dict[str, str] = {}
            while time.monotonic() < deadline + 5:
                states = await harness.states(campaign)
                if set(states.values()) == {"completed"}:
                    break
                await asyncio.sleep(0.3)
        finally:
            errors = [w.communicate(timeout=60)[1].decode()[-2000:] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], errors
    finally:
        await close()
    assert set(states.values()) == {"completed"}, states
    lines = [line.split() for line in log.read_text().splitlines()]
    rung = Counter(number for _, number in lines)
    assert rung == {n: 2 if n in numbers[::3] else 1 for n in numbers}
    assert len({pid for pid, _ in lines}) == 2  # both processes dialed
