"""bench/balancer.py: the HAProxy that tests and the load benchmark put in front of servers.

Two tiny uvicorn apps stand in for server processes; each answers with its own name, so a
test can see where each request (and each websocket) landed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress

import httpx
import pytest
from websockets.sync.client import connect

from bench.balancer import (
    BalancerUnavailable,
    render_config,
    skip_or_fail_if_missing,
    start_haproxy,
)
from tests.live_server import free_port

APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
NAME = sys.argv[1]
state = {"healthy": True}
async def who(request):
    return PlainTextResponse(NAME)
async def health(request):
    return PlainTextResponse("ok" if state["healthy"] else "draining",
                             status_code=200 if state["healthy"] else 503)
async def sick(request):
    state["healthy"] = False
    return PlainTextResponse("now draining")
async def ws(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"{NAME}:{text}")
routes = [Route("/health", health), Route("/sick", sick, methods=["POST"]),
          Route("/{path:path}", who, methods=["GET", "POST"]), WebSocketRoute("/ws", ws)]
uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=int(sys.argv[2]), log_level="error")
"""


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-c", APP, name, str(self.port)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"backend {name} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    skip_or_fail_if_missing()
    started: list[Backend] = []
    try:
        for name in ("a", "b", "c"):
            started.append(Backend(name))
        yield started
    finally:
        for backend in started:
            backend.stop()


def test_round_robin_spreads_requests_even_on_one_kept_alive_connection(backends):
    a, b, _ = backends
    with start_haproxy([a.url, b.url]) as balancer, httpx.Client() as client:
        seen = [client.get(f"{balancer.url}/who").text for _ in range(6)]
    assert seen.count("a") == 3 and seen.count("b") == 3, seen


def test_routes_send_each_path_prefix_to_its_backend_and_websockets_pass(backends):
    a, b, c = backends
    routes = {"/outbound": a.url, "/ws": b.url, "/amd": c.url}
    with start_haproxy([a.url, b.url, c.url], routes=routes) as balancer:
        for _ in range(3):
            assert httpx.post(f"{balancer.url}/outbound?x=1").text == "a"
            assert httpx.post(f"{balancer.url}/amd").text == "c"
        with connect(f"ws://127.0.0.1:{balancer.port}/ws") as websocket:
            websocket.send("hello")
            assert websocket.recv(timeout=5) == "b:hello"
            time.sleep(1.5)  # longer than nothing: the tunnel outlives a quiet moment
            websocket.send("again")
            assert websocket.recv(timeout=5) == "b:again"


def test_a_server_failing_its_health_check_gets_no_new_requests(backends):
    a, b, _ = backends
    with start_haproxy([a.url, b.url]) as balancer:
        httpx.post(f"{a.url}/sick")  # /health now answers 503, like a draining server
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen = {httpx.get(f"{balancer.url}/who").text for _ in range(4)}
            if seen == {"b"}:
                break
            time.sleep(0.5)
        assert seen == {"b"}, balancer.log_text()


def test_stop_frees_the_port_and_the_folder(backends):
    balancer = start_haproxy([backends[0].url])
    root = balancer.root
    balancer.stop()
    assert balancer.process.poll() is not None and not root.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{balancer.url}/who", timeout=2)


def test_config_routes_longest_prefix_first_and_refuses_bad_input():
    text = render_config(["http://127.0.0.1:1"], {"/": "127.0.0.1:2", "/ws": "127.0.0.1:3"}, 9)
    assert text.index("path_beg /ws") < text.index("path_beg /\n")
    assert "timeout tunnel 1h" in text and "option httpchk GET /health" in text
    with pytest.raises(ValueError, match="host:port"):
        render_config(["127.0.0.1"], None, 9)
    with pytest.raises(ValueError, match="starts with /"):
        render_config(["127.0.0.1:1"], {"ws": "127.0.0.1:1"}, 9)


def test_a_config_haproxy_rejects_is_reported():
    skip_or_fail_if_missing()
    with pytest.raises(BalancerUnavailable, match="rejected"):
        start_haproxy(["127.0.0.1:1"], balance="no-such-algorithm")
