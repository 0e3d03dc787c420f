"""Several real server processes sharing one real Redis: what a load balancer makes of it.

Twilio spreads the hops of one call over whichever process the balancer picks, so the
tests send them to different processes on purpose: a burst of webhooks over two
processes admits exactly MAX_CONCURRENT_CALLS; a webhook answered by one is a replay on
the other (and Twilio's retry of it gets the same answer there); a call whose webhook
went to one process streams to the other; the /dialout rate limit holds across them; a
process killed with SIGKILL mid-call frees its slot within CALL_LEASE_TTL_S; and Redis
restarting under a running call: the call goes on, new calls hear busy, /dialout
answers 503, /health says so, and all of it recovers by itself.

The three processes are started once for the module (in parallel: a start costs seconds
of model loading); each test begins with an empty Redis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
from defusedxml import ElementTree
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from phonebot.emulator import CallEvent, Hangup, MediaStreamCaller, Pause, WaitForBot, dial_in
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import DialIn
from phonebot.twilio.twiml import BUSY_MESSAGE
from tests import live_server
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY
from tests.live_server import LiveServer, free_port
from tests.test_abuse import start_frame, webhook_form
from tests.test_calls import CALLER, OUR_NUMBER, server_env

if TYPE_CHECKING:
    from bench.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
# pytest-timeout counts the module fixture's setup (three servers loading their models at
# once: a minute and more on a loaded 2-core machine) against the first test.
pytestmark = pytest.mark.timeout(600)

CAP = 3
LEASE_TTL_S = 2.0


@dataclass
class Cluster:
    redis: RedisServer
    a: LiveServer
    b: LiveServer
    victim: LiveServer  # the one the SIGKILL test kills

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=2) as sock:
            sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            assert sock.recv(16).startswith(b"+OK")


@pytest.fixture(scope="module")
def cluster(module_redis_server: RedisServer, tmp_path_factory) -> Iterator[Cluster]:
    env = server_env(
        free_port(),  # no REST emulator: nothing here hangs up through Twilio's API
        REDIS_URL=module_redis_server.url,
        STREAM_SECRET="shared-stream-secret-for-all-processes",
        MAX_CONCURRENT_CALLS=str(CAP),
        CALL_LEASE_TTL_S=str(LEASE_TTL_S),
        REDIS_TIMEOUT_S="0.3",
        DIALOUT_RATE_LIMIT_BURST="2",
        DIALOUT_RATE_LIMIT_PER_MINUTE="1",
        SILENCE_TIMEOUT_S="60",
    )
    names = ["a", "b", "victim"]
    # Three model-loading starts at once on a 2-core machine: allow more than one's timeout.
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(len(names)) as pool:
        patch.setattr(live_server, "STARTUP_TIMEOUT_S", 3 * live_server.STARTUP_TIMEOUT_S)
        starts = [pool.submit(LiveServer, env, tmp_path_factory.mktemp(n)) for n in names]
        servers = [start.result() for start in starts]
    try:
        yield Cluster(module_redis_server, *servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def clean(cluster: Cluster) -> Cluster:
    cluster.flush()
    return cluster


async def ring(
    client: httpx.AsyncClient, server: LiveServer, form: dict, headers: dict | None = None
) -> httpx.Response:
    url = f"{server.base_url}/"
    signed = {**signed_headers(AUTH_TOKEN, url, form), **(headers or {})}
    return await client.post(url, data=form, headers=signed)


def children(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [child.tag for child in ElementTree.fromstring(response.text)]


def ws_url(server: LiveServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def caller_on(server: LiveServer, dial: DialIn, **kwargs) -> MediaStreamCaller:
    """The call's media stream, sent to `server` whichever process answered its webhook."""
    return MediaStreamCaller(
        ws_url(server),
        parameters=dial.parameters,
        call_sid=dial.call_sid,
        account_sid=dial.account_sid,
        after_stream=dial.after_stream,
        **kwargs,
    )


async def dial(server: LiveServer) -> DialIn:
    return await dial_in(
        f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
        from_=CALLER, to=OUR_NUMBER,
    )


async def start_call(dialed: DialIn, stream_to: LiveServer, script) -> asyncio.Task:
    """Run the call's stream on `stream_to`; returns once the bot's opening was heard."""
    opened = asyncio.Event()

    def on_event(event: CallEvent) -> None:
        if event.kind == "bot_utterance":
            opened.set()

    caller = caller_on(stream_to, dialed, on_event=on_event)
    call = asyncio.create_task(caller.run(script))
    await asyncio.wait_for(opened.wait(), timeout=60)
    return call


async def stream_close_code(
    server: LiveServer, call_sid: str, parameters: dict[str, str]
) -> int | None:
    """Open a stream with these parameters (token included): the close code (1008 refused)
    or None (it ran)."""
    async with connect(ws_url(server)) as websocket:
        await websocket.send(json.dumps({"event": "connected", "protocol": "Call"}))
        await websocket.send(json.dumps(start_frame(call_sid, parameters)))
        try:
            while True:
                await asyncio.wait_for(websocket.recv(), timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        except TimeoutError:
            return None


async def health(server: LiveServer) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        return await client.get(f"{server.base_url}/health")


async def wait_until(check, timeout_s: float, every_s: float = 0.1) -> float:
    """Seconds until `await check()` is true; fails after `timeout_s`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(every_s)
    return time.monotonic() - started


# --- the tests -------------------------------------------------------------------------


async def test_a_burst_of_webhooks_over_two_processes_admits_exactly_the_cap(clean):
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        answers = await asyncio.gather(
            *(ring(client, (clean.a, clean.b)[i % 2], webhook_form()) for i in range(12))
        )
    kinds = [children(answer) for answer in answers]
    assert kinds.count(["Connect", "Say", "Hangup"]) == CAP
    assert kinds.count(["Say", "Hangup"]) == 12 - CAP
    busy = next(a for a, k in zip(answers, kinds, strict=True) if k == ["Say", "Hangup"])
    assert ElementTree.fromstring(busy.text).find("Say").text == BUSY_MESSAGE
    health_a, health_b = (await health(clean.a)).json(), (await health(clean.b)).json()
    assert health_a["reserved_calls"] == health_b["reserved_calls"] == CAP


async def test_a_webhook_answered_by_one_process_is_a_replay_on_the_other(clean):
    form = webhook_form()
    retry = {"I-Twilio-Idempotency-Token": "idem-" + form["CallSid"]}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        first = await ring(client, clean.a, form, retry)
        replayed = await ring(client, clean.b, form)
        retried = await ring(client, clean.b, form, retry)  # Twilio's retry, lost answer
    assert children(first) == ["Connect", "Say", "Hangup"]
    assert replayed.status_code == 409
    assert "already answered" in replayed.json()["detail"]
    assert retried.status_code == 200 and retried.text == first.text  # same token, no new slot
    assert (await health(clean.b)).json()["reserved_calls"] == 1


async def test_the_dialout_rate_limit_holds_across_processes(clean):
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        codes = []
        for server in (clean.a, clean.b, clean.a, clean.b):
            response = await client.post(
                f"{server.base_url}/dialout", json={"to": "+15551234567"},
                headers={"Authorization": "Bearer wrong-key"},
            )
            codes.append(response.status_code)
    assert codes == [401, 401, 429, 429]  # burst 2 for the client, whichever process


async def test_a_call_answered_by_one_process_streams_on_the_other_and_its_token_is_spent(
    clean,
):
    dialed = await dial(clean.a)
    call = await start_call(dialed, clean.b, [WaitForBot(timeout=60), Pause(0.5), Hangup()])
    cluster_a = (await health(clean.a)).json()
    result = await asyncio.wait_for(call, 60)

    assert result.bot_utterances, "the bot on the other process never spoke"
    assert clean.b.wait_for_log(f"Call {dialed.call_sid} started")
    assert not any(f"Call {dialed.call_sid} started" in line for line in clean.a.logs)
    # Process a sees the call process b runs, and its reservation was used by it.
    assert (cluster_a["cluster_calls"], cluster_a["reserved_calls"]) == (1, 0)
    # The token is single-use on every process: replayed on a, it is refused.
    assert await stream_close_code(clean.a, dialed.call_sid, dialed.parameters) == 1008
    assert clean.a.wait_for_log("stream token already used")


async def test_a_process_killed_mid_call_frees_its_slot_within_the_lease(clean):
    dialed = await dial(clean.a)
    call = await start_call(dialed, clean.victim, [WaitForBot(timeout=60), Pause(60)])
    try:
        assert (await health(clean.a)).json()["cluster_calls"] == 1
        clean.victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        async def slot_freed() -> bool:
            return (await health(clean.a)).json()["cluster_calls"] == 0

        await wait_until(slot_freed, timeout_s=LEASE_TTL_S + 5)
        freed_after = time.monotonic() - killed
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
    assert freed_after <= LEASE_TTL_S + 1.5, f"slot freed only after {freed_after:.1f} s"


async def test_redis_restarting_under_a_running_call(clean):
    """The call goes on; meanwhile new calls are busy, /dialout is 503, /health says so;
    once Redis is back (empty: no persistence) all of it recovers by itself."""
    dialed = await dial(clean.a)
    call = await start_call(
        dialed, clean.b, [WaitForBot(timeout=60), Pause(8), Hangup()]
    )
    clean.redis.stop()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            started = time.monotonic()
            busy = await ring(client, clean.a, webhook_form())
            busy_s = time.monotonic() - started
            dialout = await client.post(
                f"{clean.b.base_url}/dialout", json={"to": "+15551234567"},
                headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
            )
        down = await health(clean.a)
        await asyncio.sleep(LEASE_TTL_S)  # a lease renewal fails on b meanwhile
    finally:
        clean.redis.start()

    assert children(busy) == ["Say", "Hangup"] and busy_s < 3
    assert dialout.status_code == 503
    assert "shared state unavailable" in dialout.json()["detail"]
    assert down.status_code == 503
    assert down.json()["status"] == "degraded"
    assert down.json()["state"]["ok"] is False and down.json()["state"]["backend"] == "redis"

    async def healthy() -> bool:
        return (await health(clean.a)).status_code == 200

    await wait_until(healthy, timeout_s=10)
    # b's next renewal puts the running call's lease back into the emptied Redis.
    async def call_counted() -> bool:
        return (await health(clean.a)).json()["cluster_calls"] == 1

    await wait_until(call_counted, timeout_s=LEASE_TTL_S + 5)
    result = await asyncio.wait_for(call, 60)
    assert result.bot_utterances
    assert clean.b.wait_for_log(f"Call {dialed.call_sid} ended after")
    ended = next(line for line in clean.b.logs if f"Call {dialed.call_sid} ended after" in line)
    assert "(caller hung up)" in ended, ended  # not cut off by the outage
    assert clean.b.wait_for_log("could not renew")
    assert sum("could not renew" in line for line in clean.b.logs) == 1  # once per outage
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        assert children(await ring(client, clean.a, webhook_form())) == [
            "Connect", "Say", "Hangup"
        ]
