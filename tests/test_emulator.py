"""The Twilio emulator's own protocol handling, against tiny in-test servers (no bot)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import socket
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from phonebot import audio
from phonebot.emulator import (
    CallEvent,
    CallResult,
    ClearRecord,
    Dtmf,
    MediaStreamCaller,
    NoBotAudioError,
    NoStreamError,
    Pause,
    ServerNotRunningError,
    Speak,
    StreamClosedError,
    StreamConnectError,
    TwilioRestEmulator,
    TwiMLError,
    Utterance,
    WaitForBot,
    WaitForHangup,
    WebhookHTTPError,
    compute_signature,
    dial_in,
    parse_twiml,
    voice_webhook_form,
)
from phonebot.emulator.client import (
    TranscriptPrinter,
    bot_hung_up_at_the_end,
    build_parser,
    build_script,
    print_summary,
)
from phonebot.emulator.loopback import LoopbackServer
from phonebot.emulator.signature import SharedKey, signed_headers
from phonebot.emulator.twiml import say_seconds
from tests.media_bot import after_each_caller_turn

TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT = "AC" + "1" * 32
Handler = Callable[[ServerConnection], Awaitable[None]]


# ----------------------------------------------------------------- helpers


@asynccontextmanager
async def ws_server(handler: Handler) -> AsyncIterator[str]:
    """A local Media Streams endpoint running `handler`; yields its ws:// URL."""
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


@asynccontextmanager
async def http_app(routes: list[Route]) -> AsyncIterator[str]:
    """A local HTTP app (a fake voice webhook); yields its base URL."""
    server = LoopbackServer(Starlette(routes=routes))
    await server.start()
    try:
        yield server.base_url
    finally:
        await server.stop()


async def read_start(ws: ServerConnection) -> dict[str, Any]:
    """Consume `connected` and `start`; return the `start` message."""
    assert json.loads(await ws.recv())["event"] == "connected"
    start = json.loads(await ws.recv())
    assert start["event"] == "start"
    return start


def media(sid: str, seconds: float, frequency: float = 300.0) -> str:
    """A server→Twilio `media` message carrying a tone."""
    payload = audio.pcm16_to_ulaw(audio.tone(frequency, seconds))
    return json.dumps(
        {
            "event": "media",
            "streamSid": sid,
            "media": {"payload": base64.b64encode(payload).decode()},
        }
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_twiml(url: str, **parameters: str) -> str:
    params = "".join(f'<Parameter name="{k}" value="{v}"/>' for k, v in parameters.items())
    return f'<Response><Connect><Stream url="{url}">{params}</Stream></Connect></Response>'


# ------------------------------------------------------- signature, audio, TwiML


def test_signature_validates_with_twilio_request_validator() -> None:
    url = "https://abc.ngrok.app/?session_type=support"
    form = voice_webhook_form(call_sid="CA" + "a" * 32, account_sid=ACCOUNT, from_="+1555", to="+1")
    signature = compute_signature(TOKEN, url, form)
    assert RequestValidator(TOKEN).validate(url, form, signature)
    assert not RequestValidator("another-token").validate(url, form, signature)
    assert not RequestValidator(TOKEN).validate(url, {**form, "From": "+1666"}, signature)


def test_ulaw_agrees_with_audioop_and_round_trips_within_g711_bounds() -> None:
    audioop = pytest.importorskip("audioop")
    every = np.arange(-32768, 32768)
    pcm = every.astype("<i2").tobytes()
    assert audio.pcm16_to_ulaw(pcm) == audioop.lin2ulaw(pcm, 2)
    codes = bytes(range(256))
    assert audio.ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)
    decoded = audio.pcm16_to_array(audio.ulaw_to_pcm16(audio.pcm16_to_ulaw(pcm))).astype(int)
    error = np.abs(decoded - every)
    in_range = np.abs(every) <= 32124  # beyond it μ-law clips
    assert np.all(error[in_range] <= np.abs(every[in_range]) / 16 + 8)  # half a step
    assert error.max() <= 32768 - 32124


def test_resample_and_wav_helpers(tmp_path: Any) -> None:
    pcm16k = audio.tone(440, 1.0, 16000)
    assert len(audio.resample_pcm16(pcm16k, 16000, 8000)) == 2 * 8000
    path = tmp_path / "in.wav"
    with wave.open(str(path), "wb") as wav:  # stereo 16 kHz in → mono 8 kHz out
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        mono = audio.pcm16_to_array(pcm16k)
        wav.writeframes(np.repeat(mono, 2).astype("<i2").tobytes())
    pcm8k = audio.read_wav(path, 8000)
    assert len(pcm8k) == 2 * 8000 and not audio.is_silent(pcm8k)
    assert audio.is_silent(audio.silence(0.1)) and audio.rms_dbfs(audio.silence(0.1)) == -np.inf
    out = audio.write_stereo_wav(tmp_path / "out.wav", np.ones(10, np.int16), np.ones(4, np.int16))
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getnframes(), wav.getframerate()) == (2, 10, 8000)


def test_twiml_parser_reads_stream_and_reports_other_verbs() -> None:
    twiml = parse_twiml(
        '<?xml version="1.0"?><Response><Say>Hi</Say><Connect><Stream url="wss://h/ws">'
        '<Parameter name="a" value="1"/><Parameter name="b" value="x y"/></Stream></Connect>'
        '<Pause length="40"/></Response>'
    )
    assert twiml.require_stream().url == "wss://h/ws"
    assert twiml.stream is not None and twiml.stream.parameters == {"a": "1", "b": "x y"}
    assert twiml.says == ["Hi"] and twiml.pauses == [40.0]
    other = parse_twiml("<Response><Dial><Number>+15551230000</Number></Dial><Hangup/></Response>")
    assert other.dials == ["+15551230000"] and other.has_hangup
    with pytest.raises(NoStreamError, match=r"TwiML has no <Connect><Stream>"):
        other.require_stream()
    with pytest.raises(NoStreamError):  # a one-way <Start><Stream> fork is not a media call
        parse_twiml('<Response><Start><Stream url="wss://h"/></Start></Response>').require_stream()
    for bad in ("not xml", "<Say>hi</Say>", "<Response><Say>"):
        with pytest.raises(TwiMLError):
            parse_twiml(bad)
    bomb = '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><Response>&a;</Response>'
    with pytest.raises(TwiMLError):
        parse_twiml(bomb)


def test_cli_steps_keep_command_line_order() -> None:
    args = build_parser().parse_args(
        ["--say", "hi", "--pause", "2", "--dtmf", "1", "--say", "yes", "--wait", "--hangup"]
    )
    kinds = [kind for kind, _ in args.steps]
    assert kinds == ["say", "pause", "dtmf", "say", "wait", "hangup"]
    assert args.steps[1] == ("pause", 2.0)


def test_cli_waits_for_the_reply_after_keys_as_after_speech() -> None:
    def script(*argv: str) -> list[Any]:
        return build_script(build_parser().parse_args(argv), dialout=False)[0]

    assert script("--dtmf", "12", "--pause", "1") == [
        WaitForBot(),  # the greeting
        Dtmf("12"),
        WaitForBot(),
        Pause(1.0),
    ]
    assert script("--no-auto-wait", "--no-greeting", "--dtmf", "1") == [Dtmf("1")]


def bot_turn(start: float, end: float, latency: float | None = None) -> Utterance:
    return Utterance(index=0, start=start, end=end, latency=latency, pcm=b"\0\0" * 80)


@pytest.mark.asyncio
async def test_transcript_is_printed_in_time_order() -> None:
    """A bot turn prints only once heard and transcribed; what began after it waits for it."""
    transcribed = asyncio.Event()

    async def slow_stt(pcm: bytes) -> str:
        await transcribed.wait()
        return "hello how can I help"

    out = io.StringIO()
    printer = TranscriptPrinter(slow_stt, out=out)
    greeting, cut_off = bot_turn(0.2, 8.0), bot_turn(12.0, 13.38, latency=1.0)
    printer.on_event(CallEvent(0.2, "bot_speech_start"))
    printer.on_event(CallEvent(8.4, "bot_utterance", {"utterance": greeting}))
    printer.on_event(CallEvent(9.0, "caller_speech", {"text": "my order"}))
    printer.on_event(CallEvent(9.4, "clear", {"dropped": 0.0}))  # a turn start, not a barge-in
    printer.on_event(CallEvent(11.0, "dtmf", {"digit": "1"}))
    printer.on_event(CallEvent(12.0, "bot_speech_start"))
    printer.on_event(CallEvent(13.0, "caller_speech", {"text": "wait"}))
    printer.on_event(CallEvent(13.4, "clear", {"dropped": 0.0}))  # cuts the bot off
    await asyncio.sleep(0.01)
    assert out.getvalue() == ""  # everything waits for the greeting's text
    transcribed.set()
    await asyncio.sleep(0.01)
    assert out.getvalue().splitlines() == [
        "[00:00.20] bot: hello how can I help",
        "[00:09.00] caller: my order",
        "[00:11.00] caller: (DTMF 1)",
    ]  # the second bot turn, still going, holds back the lines after 00:12.00
    printer.on_event(CallEvent(13.8, "bot_utterance", {"utterance": cut_off}))
    await printer.drain()
    assert out.getvalue().splitlines()[3:] == [
        "[00:12.00] bot: hello how can I help   (latency 1.00 s)",
        "[00:13.00] caller: wait",
        "[00:13.40] event: barge-in: the bot was cut off (clear, 0.0 s unplayed)",
    ]


@pytest.mark.asyncio
async def test_transcript_marks_approximate_text_and_falls_back_to_durations() -> None:
    async def stt(pcm: bytes) -> str:
        return "maybe this"

    async def broken(pcm: bytes) -> str:
        raise RuntimeError("no model")

    for transcriber, approximate, expected in [
        (stt, True, "[00:01.00] bot (approx.): maybe this"),
        (stt, False, "[00:01.00] bot: maybe this"),
        (broken, True, "[00:01.00] bot: [bot audio 1.5 s]"),
        (None, False, "[00:01.00] bot: [bot audio 1.5 s]"),
    ]:
        out = io.StringIO()
        printer = TranscriptPrinter(transcriber, approximate=approximate, out=out)
        printer.on_event(CallEvent(1.0, "bot_speech_start"))
        printer.on_event(CallEvent(2.9, "bot_utterance", {"utterance": bot_turn(1.0, 2.5)}))
        await printer.drain()
        assert out.getvalue().splitlines() == [expected]


def empty_result() -> CallResult:
    return CallResult(url="", call_sid="CA1", account_sid=ACCOUNT, stream_sid="MZ1", parameters={})


def test_summary_counts_turns_latency_and_only_real_barge_ins() -> None:
    result = empty_result()
    result.duration, result.ended_by = 20.0, "server"
    result.bot_utterances = [bot_turn(0.2, 3.0), bot_turn(5.0, 6.0, 0.5), bot_turn(9.0, 9.9, 1.5)]
    result.clears = [ClearRecord(4.6, 0.0), ClearRecord(9.9, 0.06), ClearRecord(12.0, 0.0)]
    out = io.StringIO()
    print_summary(result, out)
    assert out.getvalue().splitlines() == [
        "call CA1: 20.0 s, ended by server",
        "bot turns: 3; response latency 0.50 / 1.50 s (mean 1.00 s, max 1.50 s)",
        "barge-ins: 1 (clear messages: 3)",
    ]
    result.caller_stalls = [(0.1, 0.25), (7.0, 7.6)]
    result.bot_underrun_spans = [(8.0, 8.1)]  # the caller stalled, but no audio then
    out = io.StringIO()
    print_summary(result, out)
    assert "warning" not in out.getvalue()
    result.bot_underrun_spans = [(7.2, 7.62), (8.0, 8.1)]  # 0.42 s in the stall, 0.1 s not
    out = io.StringIO()
    print_summary(result, out)
    assert out.getvalue().splitlines()[-1] == (
        "warning: this caller itself stalled 2 time(s), the longest 0.60 s; of the bot's "
        "0.52 s of late audio, 0.42 s fell in those stalls (run fewer callers on this machine)"
    )


def test_the_bot_hanging_up_during_the_last_wait_is_not_an_error() -> None:
    result = empty_result()
    script = [WaitForBot(), Speak.tone(0.5), WaitForBot()]
    closed = StreamClosedError("the server closed the media stream", result)
    result.events = [CallEvent(0.0, "wait")]
    assert not bot_hung_up_at_the_end(closed, script)  # mid-script: the call was cut short
    result.events.append(CallEvent(3.0, "wait"))
    assert bot_hung_up_at_the_end(closed, script)
    # --expect-hangup after the last wait: the hang-up it expects came during that wait.
    assert bot_hung_up_at_the_end(closed, [*script, WaitForHangup()])
    assert not bot_hung_up_at_the_end(closed, [*script, Pause(1)])
    assert not bot_hung_up_at_the_end(closed, [*script, Pause(1), WaitForHangup()])
    assert not bot_hung_up_at_the_end(NoBotAudioError("silent", result), script)


# -------------------------------------------------------------------- webhook


@pytest.mark.asyncio
async def test_dial_in_posts_a_signed_twilio_form_and_returns_the_stream() -> None:
    seen: dict[str, Any] = {}

    async def voice(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        signature = request.headers.get("x-twilio-signature", "")
        seen.update(
            form=form, valid=RequestValidator(TOKEN).validate(str(request.url), form, signature)
        )
        twiml = stream_twiml("wss://public.example/ws?x=1", **dict(request.query_params))
        return Response(twiml, media_type="text/xml")

    async with http_app([Route("/", voice, methods=["POST"])]) as base:
        call = await dial_in(f"{base}/", auth_token=TOKEN, query={"session_type": "support"})
    assert seen["valid"]
    form = seen["form"]
    assert re.fullmatch(r"CA[0-9a-f]{32}", form["CallSid"])
    assert re.fullmatch(r"AC[0-9a-f]{32}", form["AccountSid"])
    assert (form["Direction"], form["CallStatus"], form["ApiVersion"]) == (
        "inbound",
        "ringing",
        "2010-04-01",
    )
    assert call.parameters == {"session_type": "support"}
    assert call.stream_url == f"{base.replace('http', 'ws')}/ws?x=1"  # reached on loopback
    assert call.twiml.stream is not None and call.twiml.stream.url.startswith("wss://public")


@pytest.mark.asyncio
async def test_dial_in_errors_are_clear() -> None:
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(ServerNotRunningError, match=re.escape(url)):
        await dial_in(url)

    async def broken(request: Request) -> Response:
        return Response("boom", status_code=500)

    async def say_only(request: Request) -> Response:
        return Response("<Response><Say>bye</Say><Hangup/></Response>", media_type="text/xml")

    routes = [Route("/broken", broken, methods=["POST"]), Route("/say", say_only, methods=["POST"])]
    async with http_app(routes) as base:
        with pytest.raises(WebhookHTTPError) as error:
            await dial_in(f"{base}/broken")
        assert error.value.status == 500 and "boom" in str(error.value)
        with pytest.raises(NoStreamError, match="TwiML has no <Connect><Stream>"):
            await dial_in(f"{base}/say")


# --------------------------------------------------------------- media stream


@pytest.mark.asyncio
async def test_frames_are_paced_at_50_per_second_without_drift() -> None:
    arrivals: list[float] = []

    async def count(ws: ServerConnection) -> None:
        await read_start(ws)
        loop = asyncio.get_running_loop()
        async for message in ws:
            if json.loads(message)["event"] == "media":
                arrivals.append(loop.time())

    async with ws_server(count) as url:
        await MediaStreamCaller(url).run([Pause(10.0)])
    assert len(arrivals) == 500
    start = arrivals[0] - 0.01  # frame k is due at k·20 ms after the first one
    windows = np.bincount([int(t - start) for t in arrivals], minlength=10)[:10]
    assert all(48 <= n <= 52 for n in windows), windows
    assert abs((arrivals[-1] - arrivals[0]) - 499 * 0.02) < 0.05


@pytest.mark.asyncio
async def test_messages_follow_twilio_shapes() -> None:
    received: list[dict[str, Any]] = []

    async def record(ws: ServerConnection) -> None:
        received.append(json.loads(await ws.recv()))
        async for message in ws:
            received.append(json.loads(message))

    async with ws_server(record) as url:
        caller = MediaStreamCaller(
            url, parameters={"k": "v"}, call_sid="CA" + "c" * 32, account_sid=ACCOUNT
        )
        await caller.run([Pause(0.1), Dtmf("1#"), Pause(0.04)])
    events = [m["event"] for m in received]
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    start = received[1]["start"]
    assert re.fullmatch(r"MZ[0-9a-f]{32}", start["streamSid"])
    assert start["customParameters"] == {"k": "v"} and start["callSid"] == "CA" + "c" * 32
    assert start["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    frames = [m for m in received if m["event"] == "media"]
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in frames)
    assert [m["media"]["timestamp"] for m in frames[:3]] == ["0", "20", "40"]
    digits = [m["dtmf"]["digit"] for m in received if m["event"] == "dtmf"]
    assert digits == ["1", "#"]
    sequence = [int(m["sequenceNumber"]) for m in received[1:]]
    assert sequence == list(range(1, len(sequence) + 1))
    assert received[-1]["stop"] == {"accountSid": ACCOUNT, "callSid": "CA" + "c" * 32}


@pytest.mark.asyncio
async def test_clear_drops_audio_not_yet_played() -> None:
    async def burst_then_clear(ws: ServerConnection) -> None:
        sid = (await read_start(ws))["streamSid"]
        await ws.send(media(sid, 3.0))  # 3 s arrive at once; the phone plays them in 3 s
        await asyncio.sleep(0.5)
        await ws.send(json.dumps({"event": "clear", "streamSid": sid}))
        async for _ in ws:
            pass

    async with ws_server(burst_then_clear) as url:
        result = await MediaStreamCaller(url).run([Pause(1.5)])
    assert len(result.clears) == 1
    assert result.clears[0].dropped == pytest.approx(2.5, abs=0.1)
    assert result.bot_audio_received == pytest.approx(3.0)
    assert len(result.bot_utterances) == 1
    assert result.bot_utterances[0].duration == pytest.approx(0.5, abs=0.08)


@pytest.mark.asyncio
async def test_mark_is_echoed_only_once_the_audio_before_it_has_played() -> None:
    delays: dict[str, float] = {}

    async def marks(ws: ServerConnection) -> None:
        sid = (await read_start(ws))["streamSid"]
        loop = asyncio.get_running_loop()
        sent: dict[str, float] = {}

        async def mark(name: str) -> None:
            sent[name] = loop.time()
            await ws.send(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}))

        await ws.send(media(sid, 1.0))
        await mark("after-audio")
        async for message in ws:
            data = json.loads(message)
            if data["event"] != "mark":
                continue
            name = data["mark"]["name"]
            delays[name] = loop.time() - sent[name]
            if name == "after-audio":
                await mark("nothing-queued")
            elif name == "nothing-queued":
                await ws.send(media(sid, 2.0))
                await mark("cleared")
                await asyncio.sleep(0.3)
                sent["cleared"] = loop.time()
                await ws.send(json.dumps({"event": "clear", "streamSid": sid}))

    async with ws_server(marks) as url:
        result = await MediaStreamCaller(url).run([Pause(2.0)])
    assert 0.95 <= delays["after-audio"] <= 1.1
    assert delays["nothing-queued"] < 0.1
    assert delays["cleared"] < 0.1  # Twilio answers pending marks when the buffer is cleared
    assert [m.name for m in result.marks] == ["after-audio", "nothing-queued", "cleared"]


@pytest.mark.asyncio
async def test_response_latency_utterances_and_recording(tmp_path: Any) -> None:
    async def replies(ws: ServerConnection) -> None:
        sid = (await read_start(ws))["streamSid"]

        async def reply() -> None:
            await asyncio.sleep(0.2)
            await ws.send(media(sid, 0.5))

        await after_each_caller_turn(ws, 5, reply)  # 100 ms of silence: caller is done

    async with ws_server(replies) as url:
        result = await MediaStreamCaller(url).run([Speak.tone(0.6), WaitForBot(timeout=3)])
    assert len(result.bot_utterances) == 1
    (reply,) = result.bot_utterances
    assert result.latencies == [reply.latency]
    assert reply.latency is not None and 0.28 <= reply.latency <= 0.45
    assert reply.duration == pytest.approx(0.5, abs=0.05)
    assert result.caller_segments[0] == pytest.approx((0.0, 0.6), abs=0.03)
    path = result.save_wav(tmp_path / "call.wav")
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == 8000
        assert wav.getnframes() == max(len(result.caller_audio), len(result.bot_audio))


@pytest.mark.asyncio
async def test_keys_are_on_the_frame_clock_and_their_reply_has_a_latency() -> None:
    async def answer_keys(ws: ServerConnection) -> None:
        sid = (await read_start(ws))["streamSid"]
        async for message in ws:
            if json.loads(message)["event"] == "dtmf":
                await asyncio.sleep(0.3)
                await ws.send(media(sid, 0.5))

    async with ws_server(answer_keys) as url:
        script = [Pause(0.5), Dtmf("7"), WaitForBot(timeout=3)]
        result = await MediaStreamCaller(url).run(script)
    ((t, digit),) = result.dtmf
    assert digit == "7" and t == pytest.approx(0.5, abs=1e-9)  # right after 25 frames
    assert [event.t for event in result.events_of("dtmf")] == [t]
    assert len(result.latencies) == 1 and 0.25 <= result.latencies[0] <= 0.45


@pytest.mark.asyncio
async def test_server_closing_early_and_silence_are_clear_errors() -> None:
    async def close_soon(ws: ServerConnection) -> None:
        await read_start(ws)
        await asyncio.sleep(0.3)
        await ws.close(1011, "boom")

    async def silent(ws: ServerConnection) -> None:
        await read_start(ws)
        async for _ in ws:
            pass

    async with ws_server(close_soon) as url:
        with pytest.raises(StreamClosedError, match="1011") as error:
            await MediaStreamCaller(url).run([Pause(3.0)])
    result = error.value.result
    assert result is not None and result.close is not None
    assert (result.close.by, result.close.code, result.ended_by) == ("server", 1011, "server")
    async with ws_server(silent) as url:
        with pytest.raises(NoBotAudioError, match="no audio from the bot within 0.5 s"):
            await MediaStreamCaller(url).run([WaitForBot(timeout=0.5)])
        quiet = await MediaStreamCaller(url).run([WaitForBot(timeout=0.3)], check=False)
    assert quiet.error is not None and quiet.error.startswith("no audio from the bot")


@pytest.mark.asyncio
async def test_wrong_stream_sid_is_recorded_and_ignored() -> None:
    async def wrong_sid(ws: ServerConnection) -> None:
        await read_start(ws)
        await ws.send(media("MZ" + "0" * 32, 0.5))
        await ws.send(json.dumps({"event": "surprise"}))
        async for _ in ws:
            pass

    async with ws_server(wrong_sid) as url:
        result = await MediaStreamCaller(url).run([Pause(0.3)])
    assert result.streamsid_mismatches == 1 and result.bot_audio_received == 0
    assert result.unknown_events == ["surprise"]


# ----------------------------------------------------------------------- REST


@asynccontextmanager
async def rest_emulator(**kwargs: Any) -> AsyncIterator[TwilioRestEmulator]:
    async with TwilioRestEmulator(account_sid=ACCOUNT, auth_token=TOKEN, **kwargs) as emulator:
        yield emulator


@pytest.mark.asyncio
async def test_rest_create_with_the_real_twilio_client() -> None:
    async with rest_emulator() as emulator:
        client = emulator.client()
        say = "<Response><Say>hi</Say></Response>"
        call = await asyncio.to_thread(
            client.calls.create, to="+15551234567", from_="+15550001111", twiml=say
        )
        assert re.fullmatch(r"CA[0-9a-f]{32}", call.sid or "")
        assert (call.status, call.direction, call.to) == ("queued", "outbound-api", "+15551234567")
        assert call.date_created is not None and call.account_sid == ACCOUNT
        async_client = emulator.client(async_http=True)
        try:
            second = await async_client.calls.create_async(
                to="+15557654321",
                from_="+15550001111",
                twiml=say,
                status_callback_event=["initiated", "completed"],
            )
        finally:
            await async_client.http_client.close()
        assert second.sid in emulator.calls and second.sid != call.sid
        creates = [r for r in emulator.requests if r.path.endswith("/Calls.json")]
        assert [r.form["To"] for r in creates] == ["+15551234567", "+15557654321"]
        assert creates[1].form_lists["StatusCallbackEvent"] == ["initiated", "completed"]
        assert creates[0].status == 201


@pytest.mark.asyncio
async def test_rest_rejects_wrong_credentials_like_twilio() -> None:
    async with rest_emulator() as emulator:
        from twilio.rest import Client

        client = Client(ACCOUNT, "wrong-token")
        client.api.base_url = emulator.base_url
        with pytest.raises(TwilioRestException) as error:
            await asyncio.to_thread(
                client.calls.create, to="+15551234567", from_="+1555", twiml="<Response/>"
            )
        assert (error.value.status, error.value.code) == (401, 20003)
        assert emulator.requests[-1].authorized is False


@pytest.mark.asyncio
async def test_rest_faults_and_unknown_calls() -> None:
    async with rest_emulator() as emulator:
        client = emulator.client()
        emulator.inject_fault(400, code=21211, message="Invalid 'To' Phone Number", on="create")

        def create() -> Any:
            return client.calls.create(to="+15551234567", from_="+1555", twiml="<Response/>")

        with pytest.raises(TwilioRestException) as error:
            await asyncio.to_thread(create)
        assert (error.value.status, error.value.code) == (400, 21211)
        created = await asyncio.to_thread(create)  # the fault was used up
        emulator.inject_fault(None, delay=0.3, on="fetch")
        started = asyncio.get_running_loop().time()
        fetched = await asyncio.to_thread(client.calls(created.sid).fetch)
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert fetched.sid == created.sid and fetched.to == "+15551234567"
        missing = client.calls("CA" + "f" * 32)
        with pytest.raises(TwilioRestException) as error:
            await asyncio.to_thread(missing.update, status="completed")
        assert (error.value.status, error.value.code) == (404, 20404)


@pytest.mark.asyncio
async def test_rest_dial_out_via_url_and_hang_up_via_update() -> None:
    stream_messages: list[str] = []
    webhook_forms: list[dict[str, str]] = []

    async def bot(ws: ServerConnection) -> None:
        sid = (await read_start(ws))["streamSid"]
        await ws.send(media(sid, 0.4))
        async for message in ws:
            stream_messages.append(json.loads(message)["event"])

    async with ws_server(bot) as ws_url:

        async def outbound(request: Request) -> Response:
            form = {k: str(v) for k, v in (await request.form()).items()}
            signature = request.headers.get("x-twilio-signature", "")
            assert RequestValidator(TOKEN).validate(str(request.url), form, signature)
            webhook_forms.append(form)
            return Response(stream_twiml(ws_url, campaign_id="summer"), media_type="text/xml")

        async def callee(call: Any, caller: MediaStreamCaller) -> None:
            await caller.run([WaitForBot(timeout=3), Pause(30)])

        async with (
            http_app([Route("/outbound", outbound, methods=["POST"])]) as base,
            rest_emulator(on_answer=callee) as emulator,
        ):
            client = emulator.client()
            created = await asyncio.to_thread(
                client.calls.create,
                to="+15551234567",
                from_="+15550001111",
                url=f"{base}/outbound",
            )
            call = await emulator.wait_for_call()
            await call.wait_answered()
            assert call.caller is not None
            await call.caller.wait_for_bot_speech(3, after=0)
            updated = await asyncio.to_thread(client.calls(created.sid).update, status="completed")
            await call.wait_finished(timeout=5)
    assert updated.status == "completed" and call.status == "completed"
    assert call.updates == [{"Status": "completed"}]
    assert webhook_forms[0]["Direction"] == "outbound-api"
    assert webhook_forms[0]["CallSid"] == created.sid
    assert call.result is not None and call.result.parameters == {"campaign_id": "summer"}
    assert call.result.ended_by == "rest" and len(call.result.bot_utterances) == 1
    assert stream_messages[-1] == "stop"


@pytest.mark.asyncio
async def test_rest_update_with_dial_ends_the_stream() -> None:
    stops: list[str] = []

    async def bot(ws: ServerConnection) -> None:
        await read_start(ws)
        async for message in ws:
            if json.loads(message)["event"] == "stop":
                stops.append("stop")

    async with ws_server(bot) as ws_url, rest_emulator() as emulator:
        client = emulator.client()
        created = await asyncio.to_thread(
            client.calls.create,
            to="+15551234567",
            from_="+15550001111",
            twiml=stream_twiml(ws_url),
        )
        call = await emulator.wait_for_call()
        await call.wait_answered()
        dial = "<Response><Dial>+15559990000</Dial></Response>"
        await asyncio.to_thread(client.calls(created.sid).update, twiml=dial)
        await call.wait_finished(timeout=5)
    assert call.dialed == ["+15559990000"] and stops == ["stop"]
    assert call.result is not None and call.result.ended_by == "rest"


# ------------------------------------------- Twilio after the stream, retries, wss


def twiml_then(url: str, after: str) -> str:
    """A `<Connect><Stream>` followed by `after`, the verbs Twilio runs once it closes."""
    return f'<Response><Connect><Stream url="{url}"/></Connect>{after}</Response>'


async def closes_after_start(ws: ServerConnection) -> None:
    """A server that refuses the stream right after `start` (like a bad token)."""
    await read_start(ws)
    await ws.close(1008, "refused")


@pytest.mark.asyncio
async def test_after_the_stream_closes_the_twiml_after_connect_runs_and_pauses_take_time() -> None:
    after = '<Say>Sorry, goodbye.</Say><Pause length="2"/><Hangup/><Say>never</Say>'

    async def voice(request: Request) -> Response:
        return Response(twiml_then(ws_url, after), media_type="text/xml")

    routes = [Route("/", voice, methods=["POST"])]
    async with ws_server(closes_after_start) as ws_url, http_app(routes) as base:
        call = await dial_in(f"{base}/")
        result = await call.caller().run([Pause(10.0)], check=False)

    assert [verb.name for verb in call.after_stream] == ["Say", "Pause", "Hangup", "Say"]
    assert result.close is not None and result.close.by == "server"
    assert result.said == ["Sorry, goodbye."]  # and not "never": <Hangup/> ended the call
    assert result.dead_air_after_stream == 2.0
    (say,) = result.events_of("say")
    (pause,) = result.events_of("twiml_pause")
    (hangup,) = result.events_of("hangup")
    assert say.t == pytest.approx(result.close.t, abs=0.1)
    spoken = say_seconds("Sorry, goodbye.")
    assert pause.t - say.t == pytest.approx(spoken, abs=0.15)  # the <Say> took its time
    assert hangup.t - pause.t == pytest.approx(2.0, abs=0.15)  # and so did the <Pause>
    assert (hangup.data["by"], hangup.data["reason"]) == ("twiml", "<Hangup/> after the stream")
    assert result.duration >= result.close.t + spoken + 2.0 - 0.05
    out = io.StringIO()
    print_summary(result, out)
    assert "Twilio said: Sorry, goodbye." in out.getvalue()
    assert "2 s of silence" in out.getvalue()


@pytest.mark.asyncio
async def test_the_end_of_the_document_hangs_up_and_a_rest_hang_up_cuts_the_pause_short() -> None:
    async with ws_server(closes_after_start) as ws_url:
        nothing = parse_twiml(twiml_then(ws_url, "")).after_stream
        ended = await MediaStreamCaller(ws_url, after_stream=nothing).run([Pause(5.0)], check=False)
        long_pause = parse_twiml(twiml_then(ws_url, '<Pause length="30"/>')).after_stream
        paused = MediaStreamCaller(ws_url, after_stream=long_pause)
        task = asyncio.create_task(paused.run([Pause(5.0)], check=False))
        await asyncio.sleep(1.0)
        paused.request_hangup("call completed via REST", "rest")
        cut = await asyncio.wait_for(task, 5)
    assert [e.data["reason"] for e in ended.events_of("hangup")] == [
        "end of the TwiML after the stream"
    ]
    assert ended.duration < 1.0
    (hangup,) = cut.events_of("hangup")
    assert hangup.data["by"] == "rest" and cut.duration < 2.0


def test_transcript_shows_what_twilio_said_after_the_stream() -> None:
    out = io.StringIO()
    printer = TranscriptPrinter(None, out=out)
    printer.on_event(CallEvent(3.0, "say", {"text": "Sorry, goodbye.", "duration": 1.0}))
    printer.on_event(CallEvent(4.0, "twiml_pause", {"seconds": 40.0}))
    lines = out.getvalue().splitlines()
    assert lines == [
        "[00:03.00] twilio <Say>: Sorry, goodbye.",
        "[00:04.00] twilio <Pause>: 40 s of silence for the caller",
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stream_url", "refused"),
    [
        ("ws://bot.example.com/ws", True),
        ("ws://10.0.0.5:8000/ws", True),
        ("http://bot.example.com/ws", True),
        ("wss://bot.example.com/ws", False),
        ("ws://127.0.0.1:8000/ws", False),
        ("ws://localhost:8000/ws", False),
    ],
)
async def test_a_stream_url_twilio_would_refuse_fails_with_31922(stream_url, refused) -> None:
    async def voice(request: Request) -> Response:
        return Response(stream_twiml(stream_url), media_type="text/xml")

    async with http_app([Route("/", voice, methods=["POST"])]) as base:
        if refused:
            with pytest.raises(StreamConnectError, match="31922.*PUBLIC_URL"):
                await dial_in(f"{base}/")
        else:
            assert (await dial_in(f"{base}/")).twiml.stream is not None


@pytest.mark.asyncio
async def test_dial_in_retries_a_5xx_like_twilio_with_the_same_idempotency_token() -> None:
    seen: list[tuple[str, str]] = []

    async def flaky(request: Request) -> Response:
        seen.append((request.headers["i-twilio-idempotency-token"],
                     request.headers["x-twilio-signature"]))
        if len(seen) == 1:
            return Response("busy", status_code=503)
        return Response(stream_twiml("ws://127.0.0.1:1/ws"), media_type="text/xml")

    async with http_app([Route("/", flaky, methods=["POST"])]) as base:
        with pytest.raises(WebhookHTTPError):
            await dial_in(f"{base}/", auth_token=TOKEN)  # one attempt: the 503 stands
        seen.clear()
        await dial_in(f"{base}/", auth_token=TOKEN, attempts=3)
        await dial_in(f"{base}/", auth_token=TOKEN)
    assert len(seen) == 3
    assert seen[0] == seen[1], "a retry must carry the same token and signature"
    assert seen[2][0] != seen[0][0], "another request gets its own token"


def test_shared_key_signature_is_hmac_sha256_with_its_settings_header() -> None:
    url = "https://abc.ngrok.app/"
    form = voice_webhook_form(call_sid="CA" + "a" * 32, account_sid=ACCOUNT, from_="+1555", to="+1")
    key = SharedKey("shared-secret", key_id="webhooks_sharedkey_x")
    headers = signed_headers(TOKEN, url, form, key)
    assert headers["X-Twilio-Webhooks-Signature-Settings"] == (
        "key=webhooks_sharedkey_x,algorithm=HMAC_SHA256"
    )
    signature = headers["X-Twilio-Signature"]
    assert RequestValidator("shared-secret").validate(url, form, signature, "HMAC_SHA256")
    assert not RequestValidator(TOKEN).validate(url, form, signature)


@pytest.mark.asyncio
async def test_a_dial_out_runs_the_twiml_after_its_stream_and_refuses_ws_urls() -> None:
    async with ws_server(closes_after_start) as ws_url, rest_emulator() as emulator:
        client = emulator.client()
        for twiml in (twiml_then(ws_url, "<Say>Sorry.</Say><Hangup/>"),
                      stream_twiml("ws://bot.example.com/ws")):
            await asyncio.to_thread(
                client.calls.create, to="+15551234567", from_="+15550001111", twiml=twiml
            )
        streamed, refused = await emulator.wait_for_call(), await emulator.wait_for_call()
        await streamed.wait_finished(timeout=10)
        await refused.wait_finished(timeout=10)
    assert streamed.result is not None and streamed.result.said == ["Sorry."]
    assert streamed.status == "completed"
    assert refused.status == "failed" and "31922" in (refused.error or "")


# ------------------------------------------------------------ scripted callees


def test_callees_by_last_digit_per_number_or_one_for_all() -> None:
    from phonebot.emulator.callees import LAST_DIGIT_RULE, Callee, CalleeBook

    rules = CalleeBook.parse("rules", ["+15551230000=opt-out"])
    callees = {d: rules.callee(f"+1555123000{d}") for d in "0123456789"}
    kinds = {d: callee.kind for d, callee in callees.items() if callee}
    assert kinds == {**LAST_DIGIT_RULE, "0": "opt-out"}
    assert set(kinds.values()) >= {"busy", "no-answer", "failed", "voicemail", "opt-out"}
    assert CalleeBook.parse("busy").callee("+15551230000") == Callee("busy")
    assert CalleeBook({"+15551230000": "voicemail"}, rule=None).callee("+1555") is None
    voicemail, person = Callee("voicemail"), Callee("opt-out")
    assert (voicemail.answered_by, person.answered_by) == ("machine_end_beep", "human")
    assert voicemail.amd_delay > 2.0  # its greeting, then the beep
    lines = [step.text for step in person.script() if isinstance(step, Speak)]
    assert lines == ["Hello?", "please stop calling me remove me from your list"]
    with pytest.raises(ValueError, match="callee must be one of"):
        CalleeBook.parse("rules", ["+15551230004=angry"])
    with pytest.raises(ValueError, match="NUMBER=KIND"):
        CalleeBook.parse("rules", ["opt-out"])


@pytest.mark.asyncio
async def test_scripted_callees_are_busy_unanswered_unreachable_or_a_voicemail() -> None:
    """By the last-digit rule: …4 busy, …5 no answer, …8 failed, each with its final status
    callback; …6 is a voicemail whose greeting is streamed and whose async AMD verdict is
    machine_end_beep, once its greeting would have been heard."""
    from phonebot.emulator.callees import CalleeBook

    heard: list[int] = []

    async def bot(ws: ServerConnection) -> None:  # listens to the greeting, then hangs up
        await read_start(ws)
        frames = 0
        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
            async with asyncio.timeout(6.0):
                async for message in ws:
                    frames += json.loads(message)["event"] == "media"
        heard.append(frames)
        await ws.close()

    async with ws_server(bot) as ws_url, rest_emulator(
        callees=CalleeBook(), no_answer_after=0.2
    ) as emulator:
        client = emulator.client(async_http=True)
        options = {
            "from_": "+15550001111",
            "twiml": stream_twiml(ws_url),
            "status_callback": "http://127.0.0.1:9/status",
            "machine_detection": "DetectMessageEnd",
            "async_amd": "true",
            "async_amd_status_callback": "http://127.0.0.1:9/amd",
        }
        try:
            for number in ("+15551230004", "+15551230005", "+15551230008", "+15551230006"):
                await client.calls.create_async(to=number, **options)
        finally:
            await client.http_client.close()
        calls = [await emulator.wait_for_call() for _ in range(4)]
        for call in calls:
            await call.wait_finished(timeout=20)
    busy, unanswered, failed, voicemail = calls
    assert [c.status for c in calls] == ["busy", "no-answer", "failed", "completed"]
    assert busy.answered.is_set() is False and voicemail.answered_by == "machine_end_beep"
    finals = {cb.form["CallSid"]: cb.form["CallStatus"] for cb in emulator.status_callbacks
              if cb.url.endswith("/status")}
    assert finals == {c.sid: c.status for c in calls}
    amd = [cb.form for cb in emulator.status_callbacks if cb.url.endswith("/amd")]
    assert [(f["CallSid"], f["AnsweredBy"]) for f in amd] == [(voicemail.sid, "machine_end_beep")]
    assert int(amd[0]["MachineDetectionDuration"]) > 2000
    assert heard and heard[0] > 100  # over 2 s of the greeting's 20 ms frames


def test_a_dial_out_can_be_a_scripted_callee() -> None:
    from phonebot.emulator.callees import Callee
    from phonebot.emulator.client import callee_options

    args = build_parser().parse_args(["--dialout", "+15551230007", "--callee", "opt-out"])
    script, _ = build_script(args, dialout=True)
    assert script == Callee("opt-out").script()
    assert callee_options("+15551230004", Callee("busy"))["outcomes"] == {"+15551230004": "busy"}
    assert callee_options("+1555", Callee("voicemail"))["answered_by"] == "machine_end_beep"
