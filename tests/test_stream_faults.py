"""Malformed Media Streams traffic: dropped and logged, or the stream closed; never a crash.

The live tests run `python server.py` (offline engines) and, while a well-behaved call
holds a short conversation, open other streams that misbehave: junk during a call, junk
or silence instead of the handshake, a 10 MB message, a flood faster than real time. Each
asserts the effect on the bad stream, that the good call (and the bad one, where it
survives) still converses normally, that /health is fine, and that the server logged the
reason without the payload. The unit tests pin the guard's arithmetic on a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest
from loguru import logger
from pipecat.runner.types import WebSocketRunnerArguments
from pipecat.runner.utils import parse_telephony_websocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import bot
from phonebot.audio import ULAW_SILENCE
from phonebot.emulator import CallResult, Dtmf, Hangup, MediaStreamCaller, WaitForBot, dial_in
from phonebot.twilio import stream_guard
from phonebot.twilio.stream import StreamRejected, TwilioMarkSerializer, accept_twilio_stream
from phonebot.twilio.stream_guard import (
    AUDIO_BURST_S,
    DTMF_BURST,
    FAULT_SUMMARY_INTERVAL_S,
    FAULT_WARNINGS,
    MAX_MEDIA_MESSAGE_BYTES,
    InboundGuard,
)
from phonebot.twilio.stream_token import TOKEN_PARAMETER, call_token
from phonebot.twilio.transport import INBOUND_BATCH_MS
from tests.live_server import LiveServer
from tests.test_calls import CALLER, OUR_NUMBER

HANDSHAKE_TIMEOUT_S = 2
# In every junk message, so the tests can prove no payload reached the log.
MARKER = "PAYLOAD-MARKER-7f3a"
STREAM_SID = "MZ" + "a" * 32
SILENCE = base64.b64encode(bytes([ULAW_SILENCE]) * 160).decode()  # one 20 ms frame
DTMF_REPLY = "You pressed 4 2 pound."
CONVERSATION = [WaitForBot(timeout=15), Dtmf("42#"), WaitForBot(timeout=20), Hangup()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # No Twilio account: the inbound path is the same, and no REST hang-up is involved.
    env = {
        "STREAM_SECRET": "stream-faults-secret",
        "STREAM_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_TIMEOUT_S),
    }
    live = LiveServer(env, tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


# ------------------------------------------------------------------------------ helpers


def media(stream_sid: str, payload: object = SILENCE, **overrides: object) -> str:
    message = {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}
    return json.dumps({**message, **overrides})


async def dial(server: LiveServer) -> MediaStreamCaller:
    answered = await dial_in(f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER)
    return answered.caller()


async def good_call(server: LiveServer) -> CallResult:
    return await (await dial(server)).run(CONVERSATION)


async def bad_call(server: LiveServer, inject) -> CallResult:
    """A call holding the usual conversation while `inject(caller)` misbehaves on its stream.

    The injection starts once the bot's greeting is heard (the pipeline is reading).
    """
    caller = await dial(server)

    async def injector() -> None:
        await caller.wait_started(timeout=15)
        await caller.wait_for_bot_speech(timeout=20)
        await inject(caller)

    injection = asyncio.create_task(injector())
    result = await caller.run(CONVERSATION, check=False)
    await injection
    return result


def assert_conversed(server: LiveServer, result: CallResult) -> None:
    """The call worked end to end: greeting, keypad answered, hung up by the caller."""
    assert result.error is None, result.error
    assert result.bot_audio_received > 1.0
    assert server.bot_lines(result.call_sid)[1:] == [DTMF_REPLY]  # waits for the end line
    assert any(
        f"Call {result.call_sid} ended after" in line and "(caller hung up)" in line
        for line in server.logs
    )


def assert_server_unharmed(server: LiveServer) -> None:
    health = server.health()
    assert health["status"] == "ok"
    deadline = time.monotonic() + 10
    while server.health()["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["active_streams"] == 0
    assert server.error_lines() == [], server.error_lines()
    assert MARKER not in server.log_text(), "a malformed message's payload was logged"


def call_lines(server: LiveServer, call_sid: str) -> list[str]:
    return [line for line in server.logs if f"Call {call_sid}:" in line]


def dropped(server: LiveServer, call_sid: str, kind: str) -> int:
    """How many messages of `kind` the server says it dropped for the call (lines + summaries)."""
    total = 0
    for line in call_lines(server, call_sid):
        if f"dropped a Media Streams message ({kind}" in line:
            total += 1
        elif match := re.search(rf"[(,] ?{re.escape(kind)}: (\d+)", line):
            total += int(match.group(1))
    return total


# ------------------------------------------------------------------- junk during a call


def junk_for(sid: str) -> dict[str, str | bytes]:
    """Malformed messages for a call on stream `sid`, by the reason the server logs."""
    return {
        "not JSON: JSONDecodeError": f"hello {MARKER}",
        "not JSON: nested too deeply": "[" * 60_000,
        "not a JSON object (list)": json.dumps([MARKER]),
        "binary frame": b"\xff\xfe" + MARKER.encode(),
        "wrong streamSid": media("MZ" + "f" * 32),
        "bad base64": media(sid, MARKER + "="),
        "bad media": media(sid, 12345),
        "undecodable dtmf": json.dumps({"event": "dtmf", "streamSid": sid, "dtmf": MARKER}),
    }


async def test_junk_during_a_call_is_dropped_and_logged_and_both_calls_go_on(server):
    async def inject(caller: MediaStreamCaller) -> None:
        unknown_event = json.dumps({"event": MARKER, "streamSid": caller.stream_sid})
        for message in [*junk_for(caller.stream_sid).values(), unknown_event]:
            await caller.send_raw(message)

    good, bad = await asyncio.gather(good_call(server), bad_call(server, inject))

    assert_conversed(server, good)
    assert_conversed(server, bad)  # every junk message was dropped, none ended the call
    text = "\n".join(call_lines(server, bad.call_sid))
    for kind in junk_for(""):  # the first few one by one, the rest summed up at `stop`
        assert kind in text, f"no log line for {kind!r}:\n{text}"
    assert "warnings suppressed" in text
    assert not [line for line in call_lines(server, good.call_sid) if "Media Streams" in line]
    assert_server_unharmed(server)


# ---------------------------------------------------------------------- the handshake


async def rejection(url: str, messages: list[str | bytes]) -> tuple[int | None, float]:
    """Open the stream, send `messages`, and wait for the server to close it."""
    began = time.monotonic()
    async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
        for message in messages:
            await ws.send(message)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout=HANDSHAKE_TIMEOUT_S + 10)
        return ws.close_code, time.monotonic() - began


async def hang_up_early(url: str, message: str) -> None:
    async with connect(url, ping_interval=None, proxy=None) as ws:
        await ws.send(message)


def twilio_start(parameters: dict[str, object], call_sid: str = "CA" + "b" * 32) -> str:
    start = {"streamSid": STREAM_SID, "callSid": call_sid, "customParameters": parameters}
    return json.dumps({"event": "start", "streamSid": STREAM_SID, "start": start})


def started_calls(server: LiveServer) -> int:
    return sum("started: inbound" in line for line in server.logs)


async def test_a_bad_or_missing_handshake_is_rejected_before_any_pipeline(server):
    answered = await dial_in(f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER)
    url = answered.stream_url
    start = {"streamSid": STREAM_SID, "customParameters": answered.parameters}  # no callSid
    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    junk: dict[str, list[str | bytes]] = {
        "binary frame (": [b"\x00" + MARKER.encode()],
        "not JSON:": [MARKER],
        "not a JSON object (list)": [json.dumps([MARKER])],
        "'media' event before 'start'": [connected, media(STREAM_SID, MARKER)],
        "a second 'connected' instead of 'start'": [connected, connected],
        "'start' without callSid": [connected, json.dumps({"event": "start", "start": start})],
        # Pipecat's parser would log these at ERROR (quoting the value) or misread them.
        "'start' before 'connected'": [twilio_start(answered.parameters)],
        "'start' with a customParameters value that is not a string": [
            connected,
            twilio_start({**answered.parameters, "from_number": [MARKER]}),
        ],
    }
    silent: list[list[str | bytes]] = [[], [connected]]  # says nothing; stops after hello
    before = started_calls(server)

    good, _, *closes = await asyncio.gather(
        good_call(server),
        hang_up_early(url, connected),
        *(rejection(url, messages) for messages in [*junk.values(), *silent]),
    )

    assert_conversed(server, good)
    for reason, (code, _) in zip(junk, closes, strict=False):
        assert code == 1008, reason
        assert server.wait_for_log(f"rejected: no valid Media Streams handshake ({reason}")
    for code, elapsed in closes[len(junk):]:  # waited out the deadline, and no longer
        assert code == 1008
        assert HANDSHAKE_TIMEOUT_S - 0.5 < elapsed < HANDSHAKE_TIMEOUT_S + 5
    timeout = f"handshake (no 'start' within {HANDSHAKE_TIMEOUT_S} s)"
    assert sum(timeout in line for line in server.logs) == len(silent)
    assert server.wait_for_log("handshake (closed before 'start')")
    assert started_calls(server) - before == 1, "a pipeline was built for a rejected stream"
    assert_server_unharmed(server)


# -------------------------------------------------------------------- size and flood


async def test_a_10_mb_message_closes_its_stream_with_1009_and_nothing_else_notices(server):
    """uvicorn's `ws_max_size` is set to the cap (server.py), so the frame is refused as it
    arrives, without being buffered: the stream is closed with 1009 (message too big) and
    its call ends, before the guard could see it (its own cap, for a server run without
    that setting, is pinned by the serializer's unit test below)."""

    async def inject(caller: MediaStreamCaller) -> None:
        with suppress(ConnectionClosed):  # the server may close before the send completes
            await caller.send_raw(media(caller.stream_sid, MARKER * (10 * 2**20 // len(MARKER))))

    good, bad = await asyncio.gather(good_call(server), bad_call(server, inject))

    assert_conversed(server, good)
    assert bad.close is not None, "the stream of the 10 MB message stayed open"
    assert (bad.close.by, bad.close.code) == ("server", 1009)
    assert server.wait_for_log(f"Call {bad.call_sid} ended after")
    assert dropped(server, bad.call_sid, "oversized") == 0  # refused before the guard
    assert_server_unharmed(server)


async def test_a_flood_is_cut_to_real_time_with_a_bounded_log_and_both_calls_go_on(server):
    frames, junk = 1500, 300  # 30 s of audio in well under a second, plus junk
    flood: dict[str, float] = {}

    async def inject(caller: MediaStreamCaller) -> None:
        message = media(caller.stream_sid)
        began = time.monotonic()
        for index in range(frames):
            await caller.send_raw(message)
            if index % 5 == 0 and index // 5 < junk:
                await caller.send_raw(f"junk {MARKER}")
        flood["seconds"] = time.monotonic() - began

    good, bad = await asyncio.gather(good_call(server), bad_call(server, inject))

    assert_conversed(server, good)
    assert_conversed(server, bad)  # keypad and replies still work for the flooder
    # At most the burst plus real time got through; the rest never reached the pipeline.
    admitted_at_most = (AUDIO_BURST_S + flood["seconds"] + 1.0) * 50
    assert dropped(server, bad.call_sid, "audio faster than real time") >= frames - admitted_at_most
    assert dropped(server, bad.call_sid, "not JSON") == junk
    warnings = [line for line in call_lines(server, bad.call_sid) if "WARNING" in line]
    assert len(warnings) <= FAULT_WARNINGS + bad.duration / FAULT_SUMMARY_INTERVAL_S + 2
    assert_server_unharmed(server)


# ------------------------------------------------------------------ the guard, unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    yield lines
    logger.remove(sink)


def twilio_arrivals(seconds: float, backlog_s: float, stalls: list[float]) -> list[float]:
    """When the server reads each 20 ms frame Twilio sends in real time from t = 0.

    Frames sent before the pipeline starts reading (`backlog_s`) are read at once; each
    frame has 0-50 ms of network jitter; a 1.5 s stall at each of `stalls` holds frames
    back, then delivers them together. TCP keeps them in order.
    """
    arrivals, last = [], 0.0
    for k in range(round(seconds / 0.02)):
        sent = k * 0.02
        ready = max(sent + 0.0125 * ((k * 37) % 5), backlog_s)
        for stall in stalls:
            if stall <= sent < stall + 1.5:
                ready = max(ready, stall + 1.5)
        last = max(last, ready)
        arrivals.append(last)
    return arrivals


def test_legit_twilio_audio_is_never_dropped_despite_backlog_and_jitter(warnings):
    clock = FakeClock()
    guard = InboundGuard("CA1", STREAM_SID, clock=clock)
    frame = media(STREAM_SID)
    start = clock.now
    for t in twilio_arrivals(120, backlog_s=3.0, stalls=[40.0, 90.0]):
        clock.now = start + t
        assert guard.screen(frame) is not None, f"a frame read at {t:.2f} s was dropped"
    assert guard.faults.total == 0
    assert warnings == []


def test_a_flood_is_admitted_only_up_to_the_burst_then_at_real_time(warnings):
    clock = FakeClock()
    guard = InboundGuard("CA1", STREAM_SID, clock=clock)
    frame = media(STREAM_SID)
    admitted = sum(guard.screen(frame) is not None for _ in range(1000))
    assert admitted == round(AUDIO_BURST_S / 0.02)
    clock.now += 1.0
    assert sum(guard.screen(frame) is not None for _ in range(1000)) == 50
    # One 10 s media message is never real time, whatever the credit.
    clock.now += 60
    big = base64.b64encode(bytes(80_000)).decode()
    assert guard.screen(media(STREAM_SID, big)) is None


def test_a_keypad_flood_is_cut_to_a_person_s_pace(warnings):
    clock = FakeClock()
    guard = InboundGuard("CA1", STREAM_SID, clock=clock)
    key = json.dumps({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"digit": "#"}})
    assert sum(guard.screen(key) is not None for _ in range(500)) == DTMF_BURST
    for _ in range(60):  # a fast typist: 8 keys a second for a minute
        clock.now += 1.0
        assert all(guard.screen(key) is not None for _ in range(8))
    assert "keys faster than a person presses them" in warnings[0]


def test_warnings_are_rate_limited_per_call_with_a_summary(warnings):
    clock = FakeClock()
    guard, other = InboundGuard("CA1", STREAM_SID, clock), InboundGuard("CA2", STREAM_SID, clock)
    for _ in range(1000):
        guard.screen(f"junk {MARKER}")
    assert len(warnings) == FAULT_WARNINGS
    clock.now += FAULT_SUMMARY_INTERVAL_S
    guard.screen(media(STREAM_SID))  # any message lets a due summary out
    assert warnings[-1].startswith("Call CA1: 995 more Media Streams messages dropped (not JSON")
    other.screen(b"\x00")  # another call's first fault is not suppressed by this one's
    assert warnings[-1].startswith("Call CA2: dropped a Media Streams message (binary frame")
    assert all(MARKER not in line for line in warnings)


async def test_the_serializer_never_raises_and_still_decodes_twilio(warnings):
    serializer = TwilioMarkSerializer(
        stream_sid=STREAM_SID,
        call_sid="CA1",
        params=TwilioMarkSerializer.InputParams(auto_hang_up=False, sample_rate=8000),
    )
    await serializer.setup(None)
    junk: list[str | bytes] = [
        b"\x80\x81",
        "x" * (MAX_MEDIA_MESSAGE_BYTES + 1),
        "[" * 60_000,
        "42",
        json.dumps({"event": "media", "streamSid": STREAM_SID, "media": [1]}),
        media(STREAM_SID, "abc"),  # incorrect padding
        json.dumps({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": 7}),  # raises in Pipecat
        json.dumps({"event": "mark", "streamSid": "MZother", "mark": {"name": "x"}}),
    ]
    for message in junk:
        assert await serializer.deserialize(message) is None
    assert "oversized: 65537 characters" in " ".join(warnings)
    batch = INBOUND_BATCH_MS // 20  # 20 ms messages per frame (phonebot.twilio.transport)
    frames = [await serializer.deserialize(media(STREAM_SID)) for _ in range(batch)]
    assert frames[:-1] == [None] * (batch - 1)
    assert frames[-1] is not None and len(frames[-1].audio) == 320 * batch
    mark = json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "m1"}})
    assert (await serializer.deserialize(mark)).message["mark"]["name"] == "m1"
    dtmf = {"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"digit": "5"}}
    assert (await serializer.deserialize(json.dumps(dtmf))).button.value == "5"
    assert serializer.dropped_messages == len(junk)


# ------------------------------------------------------------- the handshake, unit


class FakeSocket:
    """The part of Starlette's WebSocket the handshake reads: ASGI events, in order."""

    def __init__(self, *messages: str | bytes) -> None:
        self.events = [
            {"type": "websocket.receive", "text": m}
            if isinstance(m, str)
            else {"type": "websocket.receive", "bytes": m}
            for m in messages
        ]
        self.reads = 0

    async def receive(self) -> dict:
        if self.reads >= len(self.events):
            await asyncio.sleep(3600)  # a peer that says nothing more
        self.reads += 1
        return self.events[self.reads - 1]

    def iter_text(self):  # what Pipecat's parser calls on an unscreened socket
        async def texts():
            while self.reads < len(self.events):
                yield (await self.receive())["text"]

        return texts()


CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
CALL_SID = "CA" + "c" * 32


def signed_start(settings, call_sid: str = CALL_SID, **parameters: str) -> str:
    parameters = {"call_type": "inbound", **parameters}
    token = call_token(call_sid, settings.stream_token_secret, parameters, time.time() + 30)
    return twilio_start({**parameters, TOKEN_PARAMETER: token}, call_sid)


@pytest.fixture
def errors() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    yield lines
    logger.remove(sink)


async def test_the_handshake_is_read_by_pipecat_and_cached_for_the_runner_and_the_bot(settings):
    socket = FakeSocket(CONNECTED, signed_start(settings, caller_id="+15551230000"))

    call = await accept_twilio_stream(socket, settings)

    assert (call.call_sid, call.stream_sid) == (CALL_SID, STREAM_SID)
    assert call.parameters["caller_id"] == "+15551230000"
    # Pipecat's own parser on the same socket gets the same handshake without reading again.
    transport_type, call_data = await parse_telephony_websocket(socket)
    assert (transport_type, call_data.call_id, socket.reads) == ("twilio", CALL_SID, 2)
    assert (await accept_twilio_stream(socket, settings)).call_sid == CALL_SID


async def test_a_handshake_the_runner_parsed_first_is_accepted_and_still_checked(settings):
    # Pipecat's create_transport parses before the bot; the bot must not read again.
    socket = FakeSocket(CONNECTED, signed_start(settings))
    parsed = await parse_telephony_websocket(socket)
    assert (await accept_twilio_stream(socket, settings, parsed)).call_sid == CALL_SID
    assert socket.reads == 2

    # Unscreened, Pipecat skips junk; the token and the checks on its result still apply.
    forged = twilio_start({TOKEN_PARAMETER: "0" * 64})
    for messages, reason in [
        ((f"junk {MARKER}", forged), "missing or invalid stream token"),
        ((CONNECTED, media(STREAM_SID)), "not a Twilio Media Stream (Pipecat detected 'unknown')"),
    ]:
        socket = FakeSocket(*messages)
        parsed = await parse_telephony_websocket(socket)
        with pytest.raises(StreamRejected, match=re.escape(reason)):
            await accept_twilio_stream(socket, settings, parsed)


async def test_bot_passes_on_what_the_runner_parsed(monkeypatch, settings):
    served: list[object] = []

    async def serve(websocket, settings, admit=None, handshake=None, records=None, **app):
        served.append(handshake)

    monkeypatch.setattr(bot, "serve_call", serve)
    socket = FakeSocket(CONNECTED, signed_start(settings))
    await bot.bot(WebSocketRunnerArguments(websocket=socket))  # the dev runner: unread
    parsed = await parse_telephony_websocket(socket)
    runner_args = WebSocketRunnerArguments(websocket=socket, call_data=parsed[1])
    runner_args.transport_type = parsed[0]  # as create_transport leaves it
    await bot.bot(runner_args)
    assert served == [None, parsed]


@pytest.mark.parametrize(
    "start",
    [
        {"streamSid": STREAM_SID, "callSid": 5},
        {"streamSid": STREAM_SID, "callSid": CALL_SID, "customParameters": [MARKER]},
        {"streamSid": STREAM_SID, "callSid": CALL_SID, "customParameters": {"to_number": 7}},
        "streamSid callSid",
    ],
)
async def test_a_malformed_start_is_refused_before_pipecat_logs_an_error(settings, errors, start):
    socket = FakeSocket(CONNECTED, json.dumps({"event": "start", "start": start}))
    with pytest.raises(StreamRejected, match="no valid Media Streams handshake"):
        await accept_twilio_stream(socket, settings)
    assert errors == []


async def test_a_value_a_newer_pipecat_rejects_is_a_refusal_not_a_crash(monkeypatch, settings):
    async def rejects(websocket):
        raise ValueError("a field Pipecat 2 validates")

    monkeypatch.setattr(stream_guard, "parse_telephony_websocket", rejects)
    with pytest.raises(StreamRejected, match="Pipecat could not parse it"):
        await accept_twilio_stream(FakeSocket(), settings)
