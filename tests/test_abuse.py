"""Abuse of the HTTP side: oversized bodies, unsigned and replayed webhooks, floods, the
`/dialout` rate limit, call reservations and single-use stream tokens.

Most tests run the app in-process; the flood runs against the real server while a real
emulated call goes on. Every test also checks that the next legitimate call (or client)
is still served.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from defusedxml import ElementTree
from fastapi.testclient import TestClient
from starlette.datastructures import Headers
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from phonebot.agents.agent import opening_line
from phonebot.emulator import Hangup, TwilioRestEmulator, WaitForBot, dial_in
from phonebot.emulator.ids import new_call_sid
from phonebot.emulator.result import total_seconds
from phonebot.emulator.signature import signed_headers
from phonebot.emulator.webhook import voice_webhook_form
from phonebot.state import MemoryState, ReplayGuard
from phonebot.twilio.dialout import DialoutResponse
from phonebot.twilio.stream_guard import MAX_MEDIA_MESSAGE_BYTES
from phonebot.twilio.stream_token import call_token
from phonebot.twilio.twiml import BUSY_MESSAGE
from phonebot.web.app import create_app
from phonebot.web.guards import BodySizeLimit, RateLimiter, client_ip
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer, free_port
from tests.test_calls import CALLER, OUR_NUMBER, server_env

BASE = "http://testserver"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def webhook_form(call_sid: str | None = None) -> dict[str, str]:
    return voice_webhook_form(
        call_sid=call_sid or new_call_sid(), account_sid=ACCOUNT_SID, from_=CALLER, to=OUR_NUMBER
    )


def signed_post(client: TestClient, path: str, form: dict, headers: dict | None = None):
    url = f"{BASE}{path}"
    return client.post(url, data=form, headers={**signed_headers(AUTH_TOKEN, url, form),
                                                **(headers or {})})


def twiml_children(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [child.tag for child in ElementTree.fromstring(response.text)]


def stream_token(response: httpx.Response) -> dict[str, str]:
    """The stream's parameters in the TwiML, its token among them: what Twilio sends back."""
    stream = ElementTree.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None, response.text
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert parameters["token"]
    return parameters


def minted_parameters(call_sid: str, secret: bytes) -> dict[str, str]:
    """Parameters with a valid token for a call this app never answered (another process
    with the same secret did)."""
    parameters = {"call_type": "inbound"}
    token = call_token(call_sid, secret, parameters, time.time() + 30)
    return {**parameters, "token": token}


def start_frame(call_sid: str, parameters: dict[str, str]) -> dict:
    """Twilio's `start` message for an inbound call's stream carrying `parameters`."""
    return {
        "event": "start",
        "streamSid": "MZ" + "3" * 32,
        "start": {
            "streamSid": "MZ" + "3" * 32,
            "callSid": call_sid,
            "accountSid": ACCOUNT_SID,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    }


def open_stream(client: TestClient, call_sid: str, parameters: dict[str, str]) -> int:
    """Run a stream's handshake; the close code: 1008 refused, 1000 the call ran (fake)."""
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
        websocket.send_text(json.dumps(start_frame(call_sid, parameters)))
        with pytest.raises(WebSocketDisconnect) as closed:
            websocket.receive_text()
    return closed.value.code


@pytest.fixture
def calls_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fake_pipeline(monkeypatch)


def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CallSids whose pipeline ran; building AI services at all fails the test."""
    ran: list[str] = []

    async def fake_run_bot(websocket, call, settings, serializer, records=None, **app) -> None:
        ran.append(call.call_sid)
        await websocket.close(code=1000)  # the call is over

    def no_services(*args, **kwargs):
        raise AssertionError("no services may be built here")

    monkeypatch.setattr(
        "phonebot.call.serve.twilio_transport", lambda websocket, *args: (websocket, None)
    )
    monkeypatch.setattr("phonebot.call.serve.run_bot", fake_run_bot)
    monkeypatch.setattr("phonebot.call.serve.build_services", no_services)
    return ran


# --- oversized bodies --------------------------------------------------------------


async def test_a_declared_oversized_body_is_refused_before_any_byte_is_read():
    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        raise AssertionError("no body byte may be read")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [
        (b"content-length", b"65537")]}
    await BodySizeLimit(app, limit=65536)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert b"MAX_REQUEST_BODY_BYTES" in sent[1]["body"]


def test_a_campaign_contact_list_has_its_own_larger_cap(tmp_path):
    """POST /campaigns may carry 10,000 contacts: over the webhook cap, under its own."""
    settings = make_settings(
        admin_api_key="admin-key-0123456789",
        max_campaign_body_bytes=200_000,
        database_url=f"sqlite:///{tmp_path / 'records.db'}",
        twilio_phone_number="+12025550199",
        campaign_scheduler=False,
    )
    rows = "to\n" + "".join(f"+1202555{n:04d}\n" for n in range(6000))  # ~78 KB
    assert len(rows) > 65536
    campaign = {"campaign": '{"name": "big", "window": {"start": "00:00", "end": "23:59"}}'}
    headers = {"Authorization": "Bearer admin-key-0123456789"}
    with TestClient(create_app(settings)) as client:  # the lifespan creates the tables
        upload = {"contacts": ("contacts.csv", rows, "text/csv")}
        response = client.post("/campaigns", files=upload, data=campaign, headers=headers)
        assert response.status_code == 201, response.text
        huge = {"contacts": ("contacts.csv", rows * 3, "text/csv")}
        response = client.post("/campaigns", files=huge, data=campaign, headers=headers)
        assert response.status_code == 413
        assert "200000 bytes (MAX_CAMPAIGN_BODY_BYTES)" in response.json()["detail"]
        # Every other route keeps the small cap.
        response = signed_post(client, "/", {**webhook_form(), "Padding": "x" * 70_000})
        assert response.status_code == 413


def test_an_oversized_webhook_form_gets_413_and_the_next_call_is_answered():
    client = TestClient(create_app(make_settings()))
    huge = {**webhook_form(), "Padding": "x" * 70_000}
    response = signed_post(client, "/", huge)
    assert response.status_code == 413
    assert "65536 bytes (MAX_REQUEST_BODY_BYTES)" in response.json()["detail"]
    assert twiml_children(signed_post(client, "/", webhook_form())) == ["Connect", "Say", "Hangup"]


class Chunks:
    """A request body of `total` bytes sent in 4 KB chunks, counting what was pulled."""

    def __init__(self, total: int, chunk: bytes = b"x" * 4096):
        self.total, self.chunk, self.pulled = total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled * len(self.chunk) < self.total:
            self.pulled += 1
            yield self.chunk


FORM_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/", {"X-Twilio-Signature": "anything", **FORM_TYPE}),
        ("/dialout", {"Authorization": f"Bearer {DIALOUT_KEY}", **JSON_TYPE}),
    ],
)
async def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_cap(path, headers):
    app = create_app(make_settings(max_request_body_bytes=16_384))
    body = Chunks(total=1_000_000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.post(path, content=body, headers=headers)
        assert response.status_code == 413
        assert "MAX_REQUEST_BODY_BYTES" in response.json()["detail"]
        assert body.pulled <= 16_384 // 4096 + 1, "the whole body was read"
        assert (await client.get("/health")).status_code == 200


# --- signatures and replays --------------------------------------------------------


async def test_an_unsigned_webhook_is_refused_before_its_body_is_read_and_poisons_nothing():
    app = create_app(make_settings())
    call_sid = new_call_sid()
    body = Chunks(total=2048, chunk=urlencode(webhook_form(call_sid)).encode())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.post("/", content=body, headers=FORM_TYPE)
        assert response.status_code == 403
        assert body.pulled == 0
        form = webhook_form(call_sid)
        signed = await client.post(
            "/", data=form, headers=signed_headers(AUTH_TOKEN, f"{BASE}/", form)
        )
    assert twiml_children(signed) == ["Connect", "Say", "Hangup"]


def test_a_replayed_webhook_gets_409_and_other_calls_are_answered():
    client = TestClient(create_app(make_settings()))
    form = webhook_form()
    assert twiml_children(signed_post(client, "/", form)) == ["Connect", "Say", "Hangup"]

    replay = signed_post(client, "/", form)
    assert replay.status_code == 409
    assert "CallSid was already answered" in replay.json()["detail"]
    assert signed_post(client, "/outbound", form).status_code == 409
    assert twiml_children(signed_post(client, "/", webhook_form())) == ["Connect", "Say", "Hangup"]
    # The replays reserved nothing: two calls answered, two slots held.
    assert client.get("/health").json()["reserved_calls"] == 2


def test_a_repeated_idempotency_token_gets_409():
    client = TestClient(create_app(make_settings()))
    token = {"I-Twilio-Idempotency-Token": "idem-1"}
    assert signed_post(client, "/", webhook_form(), token).status_code == 200
    replay = signed_post(client, "/", webhook_form(), token)
    assert replay.status_code == 409
    assert "I-Twilio-Idempotency-Token" in replay.json()["detail"]
    other = {"I-Twilio-Idempotency-Token": "idem-2"}
    assert signed_post(client, "/", webhook_form(), other).status_code == 200


def test_a_webhook_that_failed_is_not_remembered_so_its_retry_is_answered():
    client = TestClient(create_app(make_settings()))
    form = webhook_form()
    assert signed_post(client, "/?token=forged", form).status_code == 422
    assert twiml_children(signed_post(client, "/", form)) == ["Connect", "Say", "Hangup"]


async def test_replay_memory_expires_and_is_bounded():
    clock = FakeClock()
    shared = MemoryState(max_entries=100, clock=clock)
    guard = ReplayGuard(shared, ttl_s=600)
    assert await guard.claim(["CallSid:A"]) is None
    assert await guard.claim(["CallSid:A"]) == "CallSid:A"
    clock.now += 601
    assert await guard.claim(["CallSid:A"]) is None
    for index in range(1000):
        await guard.claim([f"CallSid:{index}"])
    assert shared.size("replay") == 100
    assert await guard.claim(["CallSid:999"]) == "CallSid:999"


# --- call admission ----------------------------------------------------------------


def test_a_stream_token_works_once(calls_run):
    client = TestClient(create_app(make_settings()))
    first, second = new_call_sid(), new_call_sid()
    token = stream_token(signed_post(client, "/", webhook_form(first)))

    assert open_stream(client, first, token) == 1000
    assert open_stream(client, first, token) == 1008  # the same token again
    assert calls_run == [first]
    other = stream_token(signed_post(client, "/", webhook_form(second)))
    assert open_stream(client, second, other) == 1000
    assert calls_run == [first, second]


def test_answered_webhooks_hold_slots_until_their_stream_connects_or_they_expire(calls_run):
    settings = make_settings(max_concurrent_calls=2, call_reservation_ttl_s=30)
    clock = FakeClock()
    app = create_app(settings, shared=MemoryState(clock=clock))
    client = TestClient(app)
    first, second = new_call_sid(), new_call_sid()
    first_token = stream_token(signed_post(client, "/", webhook_form(first)))
    signed_post(client, "/", webhook_form(second))

    # Two answered, no stream yet: a third caller hears busy, /dialout is refused.
    busy = signed_post(client, "/", webhook_form())
    assert twiml_children(busy) == ["Say", "Hangup"]
    assert ElementTree.fromstring(busy.text).find("Say").text == BUSY_MESSAGE
    dialout = client.post("/dialout", json={"to": "+15551234567"},
                          headers={"Authorization": f"Bearer {DIALOUT_KEY}"})
    assert dialout.status_code == 429
    assert "MAX_CONCURRENT_CALLS" in dialout.json()["detail"]

    assert open_stream(client, first, first_token) == 1000  # uses its own reservation
    assert calls_run == [first]
    clock.now += 31  # the second call's stream never came: its slot is free again
    health = client.get("/health").json()
    assert (health["reserved_calls"], health["active_calls"]) == (0, 0)
    assert twiml_children(signed_post(client, "/", webhook_form())) == ["Connect", "Say", "Hangup"]


def test_a_stream_without_a_reservation_is_refused_at_capacity(calls_run):
    settings = make_settings(max_concurrent_calls=1)
    client = TestClient(create_app(settings))
    signed_post(client, "/", webhook_form())  # holds the only slot
    stranger = new_call_sid()  # answered by another process with the same secret
    parameters = minted_parameters(stranger, settings.stream_token_secret)
    assert open_stream(client, stranger, parameters) == 1008
    assert calls_run == []


# --- /dialout rate limit -----------------------------------------------------------


@pytest.fixture
def dialed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    placed: list[str] = []

    async def fake_place_call(body, settings, base_url) -> DialoutResponse:
        placed.append(body.to)
        return DialoutResponse(call_sid=new_call_sid(), status="queued", to=body.to)

    monkeypatch.setattr("phonebot.web.dialout.place_call", fake_place_call)
    return placed


def dial(client: TestClient, key: str = DIALOUT_KEY, forwarded_for: str | None = None):
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    return client.post("/dialout", json={"to": "+15551234567"}, headers=headers)


def test_dialout_rate_limit_answers_429_with_retry_after(dialed):
    settings = make_settings(dialout_rate_limit_per_minute=6, dialout_rate_limit_burst=2)
    client = TestClient(create_app(settings))
    # Without TRUSTED_PROXY_HOPS a client can't get fresh buckets by forging the header.
    assert [dial(client, forwarded_for=f"10.0.0.{i}").status_code for i in range(2)] == [201] * 2
    limited = dial(client, forwarded_for="10.0.0.9")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "10"
    assert "6 per minute" in limited.json()["detail"]
    assert "DIALOUT_RATE_LIMIT_PER_MINUTE" in limited.json()["detail"]
    assert len(dialed) == 2
    assert client.get("/health").status_code == 200


def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(dialed):
    settings = make_settings(
        dialout_rate_limit_per_minute=6, dialout_rate_limit_burst=1, trusted_proxy_hops=1
    )
    client = TestClient(create_app(settings))
    assert dial(client, forwarded_for="203.0.113.5").status_code == 201
    # Forging an entry to the left changes nothing: the proxy's entry is the last one.
    assert dial(client, forwarded_for="1.2.3.4, 203.0.113.5").status_code == 429
    assert dial(client, forwarded_for="198.51.100.7").status_code == 201


def test_guessing_the_dialout_key_is_rate_limited(dialed):
    settings = make_settings(dialout_rate_limit_per_minute=6, dialout_rate_limit_burst=2)
    client = TestClient(create_app(settings))
    codes = [dial(client, key="guess").status_code for _ in range(3)]
    assert codes == [401, 401, 429]
    assert dialed == []


def test_rate_limiter_refills_and_forgets_the_least_recent_clients():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=1, max_keys=100, clock=clock)
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("a") == pytest.approx(10)
    clock.now += 10
    assert limiter.retry_after("a") == 0
    for index in range(1000):
        limiter.retry_after(f"client-{index}")
    assert len(limiter) == 100


def test_client_ip_trusts_only_the_configured_proxy_hops():
    class FakeRequest:
        def __init__(self, forwarded: str):
            self.client = type("Peer", (), {"host": "127.0.0.1"})()
            self.headers = Headers({"X-Forwarded-For": forwarded})

    request = FakeRequest("6.6.6.6, 203.0.113.5, 10.0.0.2")
    assert client_ip(request, 0) == "127.0.0.1"
    assert client_ip(request, 1) == "10.0.0.2"
    assert client_ip(request, 2) == "203.0.113.5"


# --- a flood against the real server, during a real call ---------------------------


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Callable]:
    async with live_servers(tmp_path) as start:
        yield start


@asynccontextmanager
async def live_servers(tmp_path: Path) -> AsyncIterator[Callable]:
    """`start(**settings)` runs `server.py` with a Twilio REST emulator of its own."""
    started: list[tuple[LiveServer, TwilioRestEmulator]] = []

    async def start(**settings: str) -> tuple[LiveServer, TwilioRestEmulator]:
        rest_port = free_port()
        server = LiveServer(server_env(rest_port, **settings), tmp_path)
        twilio = TwilioRestEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                                    port=rest_port, local_server_url=server.base_url)
        await twilio.start()
        started.append((server, twilio))
        return server, twilio

    yield start
    for server, twilio in started:
        await twilio.stop()
        server.stop()


# The flood comes from its own process, as an attacker's would: in the test's event loop it
# would starve the emulated caller instead of the server. A request whose connection fails
# is sent once more, as Twilio does after a connection failure (its "Webhooks connection
# overrides" page: retry count `rc`, 1 by default). A keep-alive connection the server
# closes just as the client reuses it is reset by the kernel (seen once in CI, under the
# whole suite's load). Retries are counted and bounded, so a server that drops
# connections still fails the test.
FLOOD_CLIENT = """
import asyncio, json, sys
import httpx

async def main(url, path):
    requests = json.load(open(path))
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    retried = []
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        gate = asyncio.Semaphore(50)
        async def post(form, headers):
            async with gate:
                try:
                    return (await client.post(url, data=form, headers=headers)).status_code
                except httpx.TransportError as error:
                    retried.append(repr(error))
                    return (await client.post(url, data=form, headers=headers)).status_code
        codes = await asyncio.gather(*(post(f, h) for f, h in requests))
    print(json.dumps({"codes": codes, "retried": retried}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
FLOOD_RETRIES_ALLOWED = 5  # of 2,000 requests; each one is printed when the test fails
MAX_AUDIO_STALL_S = 0.25
MAX_CALLER_STALLS_S = 1.0
MAX_HEALTH_S = 2.0


async def flood(url: str, requests: list, workdir: Path) -> list[int]:
    """POST every (form, headers) pair over 50 connections from another process; the
    status codes, in order (a request whose connection failed was sent once more)."""
    spec = workdir / "flood.json"
    spec.write_text(json.dumps(requests))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD_CLIENT, url, str(spec), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0
    result = json.loads(stdout)
    assert len(result["retried"]) <= FLOOD_RETRIES_ALLOWED, result["retried"]
    return result["codes"]


async def sample_health(server: LiveServer, samples: list[dict]) -> None:
    """GET /health every 0.1 s; each sample also holds how long it took (`took_s`)."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        while True:
            response = await client.get(f"{server.base_url}/health")
            samples.append({**response.json(), "took_s": response.elapsed.total_seconds()})
            await asyncio.sleep(0.1)


async def wait_for_call(server: LiveServer, timeout_s: float = 20) -> None:
    for _ in range(int(timeout_s * 10)):
        if server.health()["active_calls"] == 1:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the call's stream never connected")


async def test_a_webhook_flood_is_refused_cheaply_while_a_real_call_goes_on(live, tmp_path):
    server, twilio = await live(MAX_CONCURRENT_CALLS="2", SILENCE_TIMEOUT_S="30")
    url = f"{server.base_url}/"
    dial = await dial_in(url, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                         from_=CALLER, to=OUR_NUMBER)
    caller = dial.caller()
    twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
    # Quiet for 2.5 s before hanging up: a stall of the server's audio shorter than that
    # is heard as late audio (underrun), or as a gap too long for one (a long gap).
    call = asyncio.create_task(caller.run([WaitForBot(timeout=20, quiet=2.5), Hangup()]))

    await wait_for_call(server)

    replayed = (dial.form, signed_headers(AUTH_TOKEN, url, dial.form))
    unsigned = [(webhook_form(), {}) for _ in range(1000)]
    health: list[dict] = []
    sampler = asyncio.create_task(sample_health(server, health))
    codes = await flood(url, [replayed] * 1000 + unsigned, tmp_path)
    result = await call
    sampler.cancel()  # after the call: a server stall after the flood shows in it too

    assert codes[:1000] == [409] * 1000  # the real call's own webhook, replayed
    assert codes[1000:] == [403] * 1000
    opening = opening_line(shipped_agent("general"), {"caller_id": CALLER})
    assert server.bot_lines(dial.call_sid) == [opening]
    # The server's audio never stopped for long: a full garbage collection (0.6-0.7 s on a
    # loaded machine) once did. On 2 cores shared with the flood's sender and the other
    # test workers (two at `-n 3`), audio ~0.1 s late happens, and at the comma after
    # "Hello," that is enough to split the opening, so the test counts the stalls, not the
    # splits; and not the stalls of the emulated caller (this test's own process) either,
    # unless there were so many that the caller heard little on time.
    own = total_seconds(result.caller_stalls)
    assert own <= MAX_CALLER_STALLS_S, f"the caller itself stalled {own:.2f} s: no measure"
    stalls = [round(end - start, 2) for start, end in result.server_underruns()]
    assert max(stalls, default=0) <= MAX_AUDIO_STALL_S, (
        f"the opening stalled: {stalls} s; the caller's own stalls: {result.caller_stalls}"
    )
    assert result.bot_long_gaps == 0, "the opening stopped for over 2 s"
    # A stall longer than the caller's 2.5 s of patience shows here instead.
    assert max(h["took_s"] for h in health) <= MAX_HEALTH_S
    assert max(h["active_streams"] for h in health) <= 1
    assert all(h["reserved_calls"] == 0 and h["active_calls"] <= 1 for h in health)
    assert server.wait_for_log(f"Call {dial.call_sid} ended")
    assert sum("started: inbound" in line for line in server.logs) == 1
    refusals = [line for line in server.logs if "Refused" in line]
    assert 1 <= len(refusals) <= 10, "the refusals flooded the log"
    assert server.error_lines() == []
    assert server.health()["active_streams"] == 0


async def test_an_oversized_websocket_message_is_refused_by_uvicorn(live):
    """`ws_max_size`: uvicorn closes with 1009 before the app sees (or buffers) the message."""
    server, _ = await live()
    stream_url = server.base_url.replace("http://", "ws://") + "/ws"
    async with connect(stream_url) as websocket:
        await websocket.send("x" * (MAX_MEDIA_MESSAGE_BYTES + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert server.health()["active_streams"] == 0
