"""One dial-out whose hops each land on a different server process, end to end.

Behind a load balancer Twilio spreads the requests of one call over processes. Here that
is forced: three `server.py` processes share one Redis and one STREAM_SECRET behind
HAProxy (bench/balancer.py), which routes `/outbound` (the webhook Twilio fetches when the
callee answers) to A, the media stream `/ws` to B and the `/amd` callback to C. Every
PUBLIC_URL is the balancer's, as in production, so Twilio's signatures verify on any of
them. The callee is an answering machine: C stores the verdict, B's bot waits for it
through Redis, leaves the campaign's voicemail after the beep and sends the REST hang-up.
Each server's log shows the hop it took, and only that one.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest

from bench.balancer import skip_or_fail_if_missing, start_haproxy
from phonebot.emulator import MediaStreamCaller, Speak, TwilioRestEmulator, WaitForHangup
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, shipped_agent
from tests.live_server import LiveServer, ai_api_process, free_port, instant_services_env
from tests.test_call_control import assert_hung_up_after_playout
from tests.test_calls import dialout, say, server_env

pytest_plugins = ["tests.redis_server"]

GREETING = "Hi, you've reached Alex. Please leave a message after the beep."
BEEP_S = 0.5
SUMMER_SALE = shipped_agent("summer_sale")


@pytest.fixture(scope="module")
def ai_api() -> Iterator[str]:
    """Instant AI services: no offline speech engines (and their decoder processes) to
    start in each of the three servers."""
    with ai_api_process() as url:
        yield url


@pytest.fixture
async def cluster(redis_server, ai_api: str, tmp_path: Path) -> AsyncIterator[dict]:
    """Servers A, B, C on one Redis behind HAProxy with one route per hop; a Twilio emulator
    whose webhooks, streams and callbacks all go to the balancer."""
    skip_or_fail_if_missing()
    balancer_port, rest_port = free_port(), free_port()
    public_url = f"http://127.0.0.1:{balancer_port}"
    env = server_env(
        rest_port,
        REDIS_URL=redis_server.url,
        STREAM_SECRET="multiprocess-test-stream-secret",
        PUBLIC_URL=public_url,
        **instant_services_env(ai_api),
    )
    servers: dict[str, LiveServer] = {}
    twilio = None
    try:
        names = ("A", "B", "C")
        for name in names:
            (tmp_path / name).mkdir()  # each its own records file
        # Started side by side: each takes seconds to load its models.
        with ThreadPoolExecutor(len(names)) as pool:
            futures = {name: pool.submit(LiveServer, env, tmp_path / name) for name in names}
        for name, future in futures.items():
            with suppress(Exception):
                servers[name] = future.result()
        if len(servers) < len(names):
            futures[next(n for n in names if n not in servers)].result()  # raises its error
        urls = {name: server.base_url for name, server in servers.items()}
        routes = {"/outbound": urls["A"], "/ws": urls["B"], "/amd": urls["C"]}
        with start_haproxy(list(urls.values()), routes, port=balancer_port) as balancer:
            twilio = TwilioRestEmulator(
                account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port,
                local_server_url=balancer.url,
            )  # fmt: skip
            await twilio.start()
            yield {"servers": servers, "twilio": twilio, "balancer": balancer}
    finally:
        if twilio is not None:
            await twilio.stop()
        for server in servers.values():  # all drain at once, then each is waited for
            server.send_signal(signal.SIGTERM)
        for server in servers.values():
            server.wait_exit(15)
            server.stop()


async def test_webhook_stream_and_amd_on_three_processes_leave_the_voicemail(cluster):
    servers, twilio, balancer = cluster["servers"], cluster["twilio"], cluster["balancer"]
    a, b, c = servers["A"], servers["B"], servers["C"]
    greeting = say(GREETING)
    beep = Speak.tone(BEEP_S, 1000)
    beep_ends = greeting.duration + BEEP_S
    twilio.answered_by = "machine_end_beep"
    twilio.amd_delay = beep_ends + 0.5  # Twilio hears the beep end, then calls back

    async def callee(call, caller: MediaStreamCaller):
        call.result = await caller.run([greeting, beep, WaitForHangup(timeout=45)])

    twilio.on_answer = callee
    body = {
        "to": "+15551234567",
        "parameters": {"campaign_id": "summer_sale"},
        "machine_detection": True,
    }
    # /dialout itself goes through the balancer too (round-robin: any process places it).
    response = await dialout(_at(balancer.url), body)
    assert response.status_code == 201, response.text
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=60)
    assert call.exception is None, call.error
    sid = call.sid

    # The callee heard exactly the voicemail, after the beep, then the REST hang-up came.
    result = call.result
    assert len(result.bot_utterances) == 1, [u.start for u in result.bot_utterances]
    assert result.bot_utterances[0].start >= beep_ends
    assert b.bot_lines(sid) == [SUMMER_SALE.voicemail]
    assert_hung_up_after_playout(result, twilio)
    assert [cb.status for cb in twilio.status_callbacks if "AnsweredBy" in cb.form] == [204]

    # Each hop on the process it was routed to, and on no other.
    answered = f"outbound call {sid}: streaming to"
    verdict = f"Call {sid} answered by machine_end_beep"
    left = f"Call {sid} voicemail: machine_end_beep -> left message"
    assert a.wait_for_log(answered), a.log_text()[-3000:]
    assert c.wait_for_log(verdict), c.log_text()[-3000:]
    assert b.wait_for_log(left), b.log_text()[-3000:]
    assert b.wait_for_log(f"Call {sid} ended"), b.log_text()[-3000:]
    for line, owner in ((answered, a), (verdict, c), (left, b)):
        others = [s for s in servers.values() if s is not owner]
        assert not [s for s in others if line in s.log_text()], line
    assert not any(f"Call {sid} ended" in s.log_text() for s in (a, c))
    for server in servers.values():
        assert server.error_lines() == [], server.error_lines()


class _at:
    """`tests.test_calls.dialout` takes a server; the balancer stands in for one."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
