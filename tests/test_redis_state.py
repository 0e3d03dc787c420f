"""The shared state's semantics, on both backends: the in-memory default and a real Redis.

Each test that holds for both is parametrized ("memory", "redis"); the ones about several
processes use two `RedisState` clients on one Redis (two processes as far as Redis can
tell), and the outage tests stop and restart the test's own redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from phonebot.state import (
    AmdVerdicts,
    CallAdmission,
    MemoryState,
    SharedRateLimiter,
    SharedState,
    StateUnavailable,
    StreamGate,
    build_state,
)
from phonebot.state.base import ADMITTED, CLUSTER_FULL, DRAINING, PROCESS_FULL, TOKEN_USED
from phonebot.state.redis import RedisState
from phonebot.web.app import create_app
from phonebot.web.safety import UnsafeConfiguration, scaling_problem
from phonebot.web.services import app_services
from tests.conftest import make_settings
from tests.live_server import free_port, refused_start
from tests.test_abuse import fake_pipeline, open_stream, signed_post, stream_token, webhook_form

if TYPE_CHECKING:  # imported by pytest as a plugin (pytest_plugins), not here
    from bench.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

_prefixes = itertools.count()
TIMEOUT_S = 0.3


def redis_state(server: RedisServer, prefix: str | None = None) -> RedisState:
    return RedisState(server.url, prefix=prefix or f"t{next(_prefixes)}:", timeout_s=TIMEOUT_S)


@pytest.fixture(params=["memory", "redis"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[SharedState]:
    if request.param == "memory":
        state: SharedState = MemoryState()
    else:
        state = redis_state(request.getfixturevalue("redis_server"))
    try:
        yield state
    finally:
        await state.close()


@pytest.fixture
async def two_processes(redis_server: RedisServer) -> AsyncIterator[tuple[RedisState, ...]]:
    """Two clients with one prefix on one Redis: what two server processes share."""
    prefix = f"t{next(_prefixes)}:"
    first, second = redis_state(redis_server, prefix), redis_state(redis_server, prefix)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def admit_args(**overrides) -> dict:
    values = {
        "token_ttl_s": 60,
        "lease_ttl_s": 30,
        "cap": 2,
        "process_cap": 2,
        "draining": False,
    }
    return {**values, **overrides}


# --- once-only keys --------------------------------------------------------------------


async def test_claim_is_set_nx_for_all_keys_or_none(shared):
    assert await shared.claim(["replay:a", "replay:b"], 60) is None
    assert await shared.claim(["replay:b"], 60) == "replay:b"
    # "c" is new but "a" was seen: nothing is claimed, so "c" is still free afterwards.
    assert await shared.claim(["replay:c", "replay:a"], 60) == "replay:a"
    assert await shared.claim(["replay:c"], 60) is None
    await shared.forget(["replay:a"])
    assert await shared.claim(["replay:a"], 60) is None


async def test_claims_and_values_expire(shared):
    assert await shared.claim(["replay:a"], 0.2) is None
    await shared.put("answer:x", "body", 0.2)
    assert await shared.get("answer:x") == "body"
    await asyncio.sleep(0.35)
    assert await shared.get("answer:x") is None
    assert await shared.claim(["replay:a"], 60) is None


async def test_a_replay_claimed_on_one_process_is_refused_on_the_other(two_processes):
    first, second = two_processes
    assert await first.claim(["replay:CallSid:CA1", "replay:Idempotency:i1"], 60) is None
    assert await second.claim(["replay:CallSid:CA1"], 60) == "replay:CallSid:CA1"
    assert await second.claim(["replay:CallSid:CA2", "replay:Idempotency:i1"], 60) == (
        "replay:Idempotency:i1"
    )


# --- call leases -----------------------------------------------------------------------


async def test_reservations_and_live_calls_share_the_global_cap(shared):
    assert await shared.reserve("CA1", 30, cap=2)
    assert await shared.reserve("CA2", 30, cap=2)
    assert not await shared.reserve("CA3", 30, cap=2)
    assert await shared.reserve("CA1", 30, cap=2)  # the same call again takes no new slot
    # A reserved call gets in at capacity (its slot is counted); a stranger doesn't.
    assert await shared.admit("CA1", "p1", **admit_args()) == ADMITTED
    assert await shared.admit("CA9", "p1", **admit_args()) == CLUSTER_FULL
    counts = await shared.counts("p1")
    assert (counts.live, counts.reserved, counts.process_live) == (1, 1, 1)
    await shared.release("p1", "CA1")
    assert (await shared.counts("p1")).in_use == 1


async def test_the_stream_token_is_single_use(shared):
    assert await shared.admit("CA1", "p1", **admit_args()) == ADMITTED
    await shared.release("p1", "CA1")
    assert await shared.admit("CA1", "p1", **admit_args()) == TOKEN_USED
    assert await shared.admit("CA1", "p2", **admit_args()) == TOKEN_USED


async def test_the_per_process_cap_holds_even_for_a_reserved_call(shared):
    assert await shared.admit("CA1", "p1", **admit_args(cap=10, process_cap=1)) == ADMITTED
    await shared.reserve("CA2", 30, cap=10)
    assert await shared.admit("CA2", "p1", **admit_args(cap=10, process_cap=1)) == PROCESS_FULL
    assert await shared.admit("CA3", "p2", **admit_args(cap=10, process_cap=1)) == ADMITTED


async def test_while_draining_only_reserved_calls_get_in(shared):
    await shared.reserve("CA1", 30, cap=5)
    assert await shared.admit("CA2", "p1", **admit_args(cap=5, draining=True)) == DRAINING
    assert await shared.admit("CA1", "p1", **admit_args(cap=5, draining=True)) == ADMITTED


async def test_an_unrenewed_lease_frees_its_slot_and_a_renewed_one_does_not(shared):
    """A process killed mid-call stops renewing: its slot frees itself within the lease."""
    assert await shared.admit("CAdead", "p1", **admit_args(lease_ttl_s=0.3)) == ADMITTED
    assert await shared.admit("CAlive", "p2", **admit_args(lease_ttl_s=0.3)) == ADMITTED
    for _ in range(5):
        await asyncio.sleep(0.1)
        await shared.renew("p2", ["CAlive"], 0.3, 60)
    counts = await shared.counts("p2")
    assert (counts.live, counts.process_live) == (1, 1)
    assert (await shared.counts("p1")).process_live == 0


async def test_the_slot_of_an_expired_lease_goes_to_the_next_call(shared):
    assert await shared.admit("CAdead", "p1", **admit_args(cap=1, lease_ttl_s=0.2)) == ADMITTED
    assert await shared.admit("CAnext", "p2", **admit_args(cap=1)) == CLUSTER_FULL
    assert not await shared.reserve("CAnext", 30, cap=1)
    await asyncio.sleep(0.3)
    assert await shared.admit("CAnext", "p2", **admit_args(cap=1)) == ADMITTED


async def test_an_expired_lease_frees_a_reservation_slot(shared):
    assert await shared.admit("CAdead", "p1", **admit_args(cap=1, lease_ttl_s=0.2)) == ADMITTED
    await asyncio.sleep(0.3)
    assert await shared.reserve("CAnext", 30, cap=1)


async def test_an_unused_reservation_expires(shared):
    await shared.reserve("CA1", 0.2, cap=1)
    assert not await shared.reserve("CA2", 30, cap=1)
    await asyncio.sleep(0.3)
    assert await shared.reserve("CA2", 30, cap=1)
    assert await shared.still_reserved(["CA1", "CA2"]) == ["CA2"]


async def test_a_burst_of_reservations_from_two_processes_admits_exactly_the_cap(
    redis_server,
):
    settings = make_settings(max_concurrent_calls=5)
    prefix = f"t{next(_prefixes)}:"
    states = [redis_state(redis_server, prefix) for _ in range(2)]
    admissions = [CallAdmission(state, settings) for state in states]
    try:
        refusals = await asyncio.gather(
            *(admissions[i % 2].reserve(f"CA{i}") for i in range(20))
        )
        assert sum(refusal is None for refusal in refusals) == 5
        assert (await admissions[0].counts()).reserved == 5
    finally:
        for state in states:
            await state.close()


async def test_a_draining_process_waits_for_its_answered_calls_only_until_they_stream(
    two_processes,
):
    """Draining is per process: the webhook process's reservation is done with once its
    stream has connected, here or on another process."""
    settings = make_settings(max_concurrent_calls=5, call_reservation_ttl_s=30)
    webhook_process, stream_process = (CallAdmission(s, settings) for s in two_processes)
    try:
        assert await webhook_process.reserve("CA1") is None
        webhook_process.start_draining()
        assert not await webhook_process.wait_idle(0.3)  # its answered call hasn't streamed
        assert await stream_process.admit_stream("CA1") is None  # ... now it has, elsewhere
        started = time.monotonic()
        assert await webhook_process.wait_idle(5)
        assert time.monotonic() - started < 1
        assert stream_process.process_live == 1  # the other process goes on with it
    finally:
        await webhook_process.close()
        await stream_process.close()


async def test_a_stream_whose_token_cannot_be_checked_is_refused(redis_server):
    settings = make_settings()
    state = redis_state(redis_server)
    gate = StreamGate(CallAdmission(state, settings))
    try:
        redis_server.stop()
        refusal = await gate(SimpleNamespace(call_sid="CA1"))
        assert refusal is not None and "shared state unavailable" in refusal
        await gate.release()  # nothing to release, nothing raised
    finally:
        await state.close()


# --- rate limits -----------------------------------------------------------------------


async def test_a_rate_limit_is_shared_between_processes(two_processes):
    first, second = (SharedRateLimiter(s, "dialout", per_minute=60, burst=2) for s in two_processes)
    assert await first.retry_after("1.2.3.4") == 0
    assert await second.retry_after("1.2.3.4") == 0
    wait = await first.retry_after("1.2.3.4")
    assert 0.5 < wait <= 1.0  # one token a second
    assert await second.retry_after("5.6.7.8") == 0  # another client has its own bucket
    await asyncio.sleep(wait + 0.05)
    assert await second.retry_after("1.2.3.4") == 0


async def test_the_token_bucket_refills(shared):
    limiter = SharedRateLimiter(shared, "dialout", per_minute=600, burst=1)
    assert await limiter.retry_after("c") == 0
    assert await limiter.retry_after("c") > 0
    await asyncio.sleep(0.15)
    assert await limiter.retry_after("c") == 0


# --- AMD verdicts ----------------------------------------------------------------------


async def test_a_verdict_stored_before_the_stream_reaches_the_other_process(two_processes):
    amd_process, stream_process = (AmdVerdicts(s) for s in two_processes)
    await amd_process.set("CA1", "machine_end_beep")
    assert await stream_process.wait("CA1", timeout=2) == "machine_end_beep"


async def test_a_waiting_bot_is_woken_at_once_by_a_verdict_on_another_process(two_processes):
    # poll_s=30: only the pub/sub announcement can wake it within the test's second.
    amd_process = AmdVerdicts(two_processes[0])
    stream_process = AmdVerdicts(two_processes[1], poll_s=30)
    waiter = asyncio.create_task(stream_process.wait("CA1", timeout=10))
    await asyncio.sleep(1.5)  # an idle listener longer than its socket timeout stays subscribed
    started = time.monotonic()
    await amd_process.set("CA1", "human")
    assert await asyncio.wait_for(waiter, 2) == "human"
    assert time.monotonic() - started < 0.5


async def test_without_a_verdict_the_wait_ends_with_none(shared):
    assert await AmdVerdicts(shared, poll_s=0.05).wait("CA1", timeout=0.2) is None


# --- Redis unreachable -----------------------------------------------------------------


async def test_a_bot_waiting_for_a_verdict_during_an_outage_just_gets_none(redis_server, logs):
    state = redis_state(redis_server)
    try:
        redis_server.stop()
        started = time.monotonic()
        assert await AmdVerdicts(state, poll_s=0.2).wait("CA1", timeout=1.0) is None
        assert time.monotonic() - started < 1.0 + 2.5 * TIMEOUT_S + 1.0
        assert sum("can't read its AMD verdict" in line for line in logs) == 1
    finally:
        await state.close()


async def test_every_operation_fails_fast_when_redis_is_down_and_recovers_by_itself(
    redis_server,
):
    state = redis_state(redis_server)
    errors: list[int] = []
    state.on_error = lambda: errors.append(1)  # /metrics' Redis error counter (server.py)
    try:
        await state.put("answer:a", "1", 60)
        assert not errors
        redis_server.stop()
        operations = [
            state.claim(["replay:x"], 60),
            state.get("answer:a"),
            state.reserve("CA1", 30, cap=5),
            state.admit("CA1", "p1", **admit_args()),
            state.counts("p1"),
            state.take_token("rate:x", 1, 1),
            state.ping(),
        ]
        for operation in operations:
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await operation
            assert time.monotonic() - started < 2.5 * TIMEOUT_S + 1.0
        assert len(errors) == len(operations)  # each failure counted once
        redis_server.start()  # same port, empty (no persistence)
        # The same client (its pool) reconnects by itself.
        assert await state.claim(["replay:x"], 60) is None
        assert await state.admit("CA1", "p1", **admit_args()) == ADMITTED
    finally:
        await state.close()


async def test_a_renewal_puts_back_the_leases_a_restarted_redis_lost(redis_server):
    settings = make_settings(max_concurrent_calls=5)
    state = redis_state(redis_server)
    admission = CallAdmission(state, settings)
    try:
        assert await admission.admit_stream("CA1") is None
        redis_server.restart()
        assert (await admission.counts()).live == 0
        await admission.renew_now()
        assert (await admission.counts()).live == 1
        assert await admission.admit_stream("CA1") is not None  # its token is spent again
    finally:
        await admission.close()
        await state.close()


async def test_round_trips_are_counted_and_pings_are_not(redis_server):
    state = redis_state(redis_server)
    try:
        await state.ping()
        assert state.round_trips == 0
        await state.claim(["replay:a", "replay:b"], 60)
        await state.admit("CA1", "p1", **admit_args())
        await state.release("p1", "CA1")
        assert state.round_trips == 3
    finally:
        await state.close()


def test_a_dial_in_call_costs_six_state_round_trips(monkeypatch):
    """What /health's state.round_trips counts per call (the benchmark divides by calls):
    the retry lookup, the replay claim, the reservation, the kept answer, the admission
    and the release; lease renewals come on top, one per CALL_LEASE_TTL_S / 3 per process."""
    fake_pipeline(monkeypatch)
    app = create_app(make_settings())
    client = TestClient(app)
    form = webhook_form()
    answer = signed_post(client, "/", form, {"I-Twilio-Idempotency-Token": "idem-1"})
    assert app_services(app).shared.round_trips == 4
    assert open_stream(client, form["CallSid"], stream_token(answer)) == 1000
    assert app_services(app).shared.round_trips == 6
    assert client.get("/health").json()["state"] == {
        "backend": "memory", "ok": True, "error": None, "round_trips": 6
    }


def test_build_state_picks_the_backend_from_redis_url():
    assert build_state(make_settings()).backend == "memory"
    assert build_state(make_settings(redis_url="redis://127.0.0.1:1/0")).backend == "redis"


# --- several processes need a shared secret and Redis --------------------------------


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"workers": 2}, "REDIS_URL"),
        ({"workers": 2, "redis_url": "redis://r:6379/0"}, "STREAM_SECRET"),
        ({"redis_url": "redis://r:6379/0"}, "STREAM_SECRET"),
    ],
    ids=["workers-without-redis", "workers-without-secret", "redis-without-secret"],
)
def test_several_processes_refuse_to_start_without_redis_or_a_shared_secret(settings, named):
    unsafe = make_settings(stream_secret=None, twilio_auth_token=None, **settings)
    problem = scaling_problem(unsafe)
    assert problem is not None and named in problem
    with pytest.raises(UnsafeConfiguration, match=named):
        create_app(unsafe)


def test_several_processes_start_with_redis_and_a_shared_secret():
    redis = "redis://127.0.0.1:1/0"
    assert scaling_problem(make_settings(workers=2, redis_url=redis)) is None
    assert scaling_problem(make_settings(redis_url=redis, stream_secret=None)) is None  # token
    assert scaling_problem(make_settings(stream_secret=None, twilio_auth_token=None)) is None


def test_python_server_py_exits_2_with_redis_url_and_no_secret(tmp_path: Path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HOST": "127.0.0.1",
           "PORT": str(free_port()), "REDIS_URL": "redis://127.0.0.1:1/0"}
    assert "STREAM_SECRET" in refused_start(env, tmp_path)
