"""The Twilio emulator's conferences, as a warm transfer uses them: the room rules alone,
then the REST emulator over real HTTP and websockets (a tiny in-test bot, no server)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from twilio.base.exceptions import TwilioRestException
from websockets.asyncio.server import ServerConnection, serve

from phonebot import audio
from phonebot.emulator import (
    CallResult,
    Dtmf,
    EmulatedCall,
    MediaStreamCaller,
    Pause,
    Speak,
    TwilioRestEmulator,
    WaitForBot,
    WaitForHangup,
    parse_twiml,
)
from phonebot.emulator.callees import KINDS, LAST_DIGIT_RULE, Callee, CalleeBook
from phonebot.emulator.conference import DEFAULT_WAIT, ConferenceRoom

TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT = "AC" + "1" * 32
BOT_NUMBER, CALLER_NUMBER = "+15550001111", "+15557770000"
ACCEPTS, DECLINES = "+15552220001", "+15552220002"
ROOM = "warm-CA1"
WAIT_URL = "https://bot.example.com/hold-music"


def conference_twiml(start: bool, *, end: bool = True, wait_url: str | None = None) -> str:
    """The TwiML a warm transfer updates a call with (see the module docstring)."""
    wait = f' waitUrl="{wait_url}"' if wait_url else ""
    return (
        f'<Response><Dial><Conference startConferenceOnEnter="{str(start).lower()}" '
        f'endConferenceOnExit="{str(end).lower()}" beep="false"{wait}>{ROOM}</Conference>'
        "</Dial></Response>"
    )


def stream_twiml(url: str, **parameters: str) -> str:
    params = "".join(f'<Parameter name="{k}" value="{v}"/>' for k, v in parameters.items())
    return f'<Response><Connect><Stream url="{url}">{params}</Stream></Connect></Response>'


# ----------------------------------------------------------------- room rules


class Clock:
    """A clock a test moves by hand: the events' times are then exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_a_caller_waits_until_a_participant_who_starts_it_joins() -> None:
    room = ConferenceRoom(ROOM, clock=Clock())
    room.join("CA1", start_on_enter=False, end_on_exit=True, wait_url=WAIT_URL)
    assert not room.started and room.waiting == ["CA1"]
    room.join("CA2", start_on_enter=True, end_on_exit=True)
    assert room.started and room.started_at == 4.0 and room.waiting == []
    assert room.events == [
        (1.0, "CA1", "join", ""),
        (2.0, "CA1", "wait", WAIT_URL),
        (3.0, "CA2", "join", ""),
        (4.0, None, "start", ""),
    ]
    room.join("CA3", start_on_enter=False)  # joins a started conference: no waiting
    assert room.kinds()[-1] == "join" and room.joined == ["CA1", "CA2", "CA3"]


def test_alone_or_without_a_starter_the_room_does_not_start() -> None:
    alone = ConferenceRoom(ROOM)
    alone.join("CA1")  # startConferenceOnEnter defaults to true, but no one else is there
    assert alone.kinds() == ["join", "wait"] and alone.events[1].detail == DEFAULT_WAIT
    nobody_starts = ConferenceRoom(ROOM)
    nobody_starts.join("CA1", start_on_enter=False)
    nobody_starts.join("CA2", start_on_enter=False)
    assert not nobody_starts.started and nobody_starts.waiting == ["CA1", "CA2"]
    alone.join("CA2", start_on_enter=False)  # the one who starts it was already there
    assert alone.started
    with pytest.raises(ValueError, match="already in conference"):
        alone.join("CA2")


def test_end_conference_on_exit_drops_everyone_else_and_ends_the_room() -> None:
    room = ConferenceRoom(ROOM)
    room.join("CA1", start_on_enter=False, end_on_exit=True)
    room.join("CA2", end_on_exit=False)
    room.join("CA3", end_on_exit=False)
    assert room.leave("CA2", "hung up") == [] and not room.ended  # no endConferenceOnExit
    assert room.leave("CA9") == []  # never there
    assert room.leave("CA1", "call completed via REST") == ["CA3"]
    assert room.ended and room.participants == {}
    assert room.kinds()[-3:] == ["leave", "leave", "end"]
    assert "CA1 left with endConferenceOnExit" in room.events[-2].detail
    with pytest.raises(ValueError, match="has ended"):
        room.join("CA4")


def test_the_last_participant_leaving_ends_the_room() -> None:
    room = ConferenceRoom(ROOM)
    room.join("CA1", start_on_enter=False, end_on_exit=False)
    assert room.leave("CA1", "redirected") == [] and room.ended
    assert room.events[-1].kind == "end" and room.events[-1].detail == "last participant left"


def test_twiml_reads_a_conference_and_does_not_count_it_as_a_number_dialed() -> None:
    twiml = parse_twiml(conference_twiml(False, wait_url=WAIT_URL))
    assert twiml.conference is not None and twiml.dials == []
    assert (twiml.conference.name, twiml.conference.start_on_enter) == (ROOM, False)
    assert (twiml.conference.end_on_exit, twiml.conference.wait_url) == (True, WAIT_URL)
    assert twiml.conference.attributes["beep"] == "false"
    plain = parse_twiml("<Response><Dial><Conference>room</Conference></Dial></Response>")
    assert plain.conference is not None
    assert (plain.conference.start_on_enter, plain.conference.end_on_exit) == (True, False)
    assert plain.conference.wait_url is None and plain.describe() == "<Dial><Conference 'room'>"
    number = parse_twiml("<Response><Dial><Number>+15559990000</Number></Dial></Response>")
    assert number.conference is None and number.dials == ["+15559990000"]


def test_the_transfer_callees_press_1_or_2_after_the_briefing() -> None:
    assert {"transfer-accept", "transfer-decline"} <= set(KINDS)
    assert not {"transfer-accept", "transfer-decline"} & set(LAST_DIGIT_RULE.values())
    for kind, key in (("transfer-accept", "1"), ("transfer-decline", "2")):
        script = Callee(kind).script()
        assert [type(step) for step in script] == [Speak, WaitForBot, Dtmf, WaitForHangup]
        assert script[0].text == "Hello?" and script[2] == Dtmf(key)
        assert Callee(kind).outcome == "answer"


# ------------------------------------------------------- REST, HTTP, websockets


@dataclass
class Stream:
    """What the in-test bot saw on one media stream."""

    call_sid: str
    parameters: dict[str, str]
    digits: list[str] = field(default_factory=list)
    stopped: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Bot:
    """A Media Streams endpoint that answers each caller turn with a short tone, records the
    keys pressed, and closes the stream on `hang_up_on` (the server hanging up)."""

    def __init__(self, hang_up_on: str | None = None) -> None:
        self.streams: list[Stream] = []
        self.hang_up_on = hang_up_on

    def of(self, call_sid: str) -> list[Stream]:
        return [stream for stream in self.streams if stream.call_sid == call_sid]

    async def keys(self, call_sid: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Until `count` keys were pressed on `call_sid`'s streams."""
        async with asyncio.timeout(timeout):
            while len(pressed := [d for s in self.of(call_sid) for d in s.digits]) < count:
                await asyncio.sleep(0.05)
        return pressed

    async def __call__(self, ws: ServerConnection) -> None:
        assert json.loads(await ws.recv())["event"] == "connected"
        start = json.loads(await ws.recv())
        sid, info = start["streamSid"], start["start"]
        stream = Stream(info["callSid"], info["customParameters"])
        self.streams.append(stream)
        spoke, quiet = False, 0
        try:
            async for message in ws:
                data = json.loads(message)
                if data["event"] == "dtmf":
                    stream.digits.append(data["dtmf"]["digit"])
                    if data["dtmf"]["digit"] == self.hang_up_on:
                        await ws.close()
                elif data["event"] == "stop":
                    stream.stopped = True
                elif data["event"] == "media":
                    pcm = audio.ulaw_to_pcm16(base64.b64decode(data["media"]["payload"]))
                    if not audio.is_silent(pcm):
                        spoke, quiet = True, 0
                    elif spoke and (quiet := quiet + 1) == 10:
                        spoke = False
                        await ws.send(tone(sid, 0.4))
        finally:
            stream.closed.set()


def tone(stream_sid: str, seconds: float) -> str:
    payload = audio.pcm16_to_ulaw(audio.tone(300.0, seconds))
    media = {"payload": base64.b64encode(payload).decode()}
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": media})


@asynccontextmanager
async def twilio_and_bot(bot: Bot) -> AsyncIterator[tuple[TwilioRestEmulator, str]]:
    """The REST emulator with the transfer callees, and the bot's ws:// URL."""
    callees = CalleeBook({ACCEPTS: "transfer-accept", DECLINES: "transfer-decline"}, rule=None)
    async with (
        serve(bot, "127.0.0.1", 0, compression=None) as server,
        TwilioRestEmulator(account_sid=ACCOUNT, auth_token=TOKEN, callees=callees) as twilio,
    ):
        port = server.sockets[0].getsockname()[1]
        yield twilio, f"ws://127.0.0.1:{port}/ws"


async def dial_in(
    twilio: TwilioRestEmulator, ws_url: str, **options: Any
) -> tuple[EmulatedCall, asyncio.Task[Any]]:
    """The caller's live call CA1, streaming to the bot (as `register_call` is used)."""
    caller = MediaStreamCaller(ws_url, account_sid=ACCOUNT, parameters={"leg": "first"})
    call = twilio.register_call(
        caller.call_sid, to=BOT_NUMBER, from_=CALLER_NUMBER, caller=caller, **options
    )
    task = asyncio.create_task(caller.run([Pause(60.0)], check=False))
    await caller.wait_started()
    return call, task


async def on_hold(
    twilio: TwilioRestEmulator, ws_url: str, wait_url: str | None = None
) -> tuple[EmulatedCall, CallResult]:
    """CA1, streaming, then moved into ROOM to wait (startConferenceOnEnter false): the
    call and its first stream's result."""
    first, first_run = await dial_in(twilio, ws_url)
    hold = conference_twiml(False, wait_url=wait_url)
    await asyncio.to_thread(twilio.client().calls(first.sid).update, twiml=hold)
    return first, await asyncio.wait_for(first_run, 5)


async def ring(twilio: TwilioRestEmulator, client: Any, ws_url: str, number: str) -> Any:
    """The server ringing the person (CA2), as `calls.create` with a status callback."""
    created = await asyncio.to_thread(
        client.calls.create,
        to=number,
        from_=BOT_NUMBER,
        twiml=stream_twiml(ws_url, leg="person"),
        status_callback="http://127.0.0.1:9/status",
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        timeout=20,
    )
    return twilio.calls[created.sid]


def statuses(twilio: TwilioRestEmulator, call: EmulatedCall) -> list[str]:
    forms = [cb.form for cb in twilio.status_callbacks if cb.form["CallSid"] == call.sid]
    return [form["CallStatus"] for form in forms]


async def settle(seconds: float = 0.3) -> None:
    """Let redirected streams close (a frame or two) before looking."""
    await asyncio.sleep(seconds)


@pytest.mark.asyncio
async def test_a_warm_transfer_accepted_then_ended_by_the_caller() -> None:
    """CA1 waits on hold; CA2 accepts (key 1) and joins: the conference starts with both
    calls live though their streams ended. CA1 completed via REST ends it and drops CA2."""
    bot = Bot()
    async with twilio_and_bot(bot) as (twilio, ws_url):
        client = twilio.client()
        first, held = await on_hold(twilio, ws_url, wait_url=WAIT_URL)
        await settle()
        room = twilio.conferences[ROOM]
        assert first.status == "in-progress" and first.conference == ROOM
        assert first.caller is None and held.ended_by == "rest" and bot.of(first.sid)[0].stopped
        (hangup,) = held.events_of("hangup")
        assert hangup.data["reason"] == f"call redirected to <Dial><Conference> {ROOM}"
        assert room.kinds() == ["join", "wait"] and room.events[1].detail == WAIT_URL

        person = await ring(twilio, client, ws_url, ACCEPTS)
        assert await bot.keys(person.sid) == ["1"]
        join = conference_twiml(True)
        await asyncio.to_thread(client.calls(person.sid).update, twiml=join)
        await settle()
        assert room.started and room.kinds() == ["join", "wait", "join", "start"]
        assert (first.status, person.status) == ("in-progress", "in-progress")
        assert person.result is not None and person.result.ended_by == "rest"
        assert person.result.error is None  # the WaitForHangup took the redirect for it
        assert bot.of(person.sid)[0].stopped and person.conference == ROOM
        assert "completed" not in statuses(twilio, person)  # its stream's end is not its end

        await asyncio.to_thread(client.calls(first.sid).update, status="completed")
        await person.wait_finished(timeout=5)
        assert room.ended and room.participants == {}
        assert (first.status, person.status) == ("completed", "completed")
        assert (first.conference, person.conference) == (None, None)
        assert statuses(twilio, person)[-1] == "completed"
        assert room.kinds()[-3:] == ["leave", "leave", "end"]


@pytest.mark.asyncio
async def test_a_call_redirected_from_a_room_to_a_stream_leaves_it_on_a_new_stream() -> None:
    """CA2 declines (key 2; the bot hangs up on it); CA1, redirected from the room to a
    `<Connect><Stream>`, leaves the room (which ends) and streams again, live."""
    bot = Bot(hang_up_on="2")
    async with twilio_and_bot(bot) as (twilio, ws_url):
        client = twilio.client()
        first, _ = await on_hold(twilio, ws_url)
        room = twilio.conferences[ROOM]
        assert room.events[1] == (room.events[1].t, first.sid, "wait", DEFAULT_WAIT)

        person = await ring(twilio, client, ws_url, DECLINES)
        assert await bot.keys(person.sid) == ["2"]
        await person.wait_finished(timeout=10)
        assert person.status == "completed" and person.result is not None
        assert person.result.ended_by == "server" and person.conference is None

        resume = stream_twiml(ws_url, leg="second")
        await asyncio.to_thread(client.calls(first.sid).update, twiml=resume)
        assert room.ended and first.conference is None and first.status == "in-progress"
        await settle(1.0)
        assert [s.parameters["leg"] for s in bot.of(first.sid)] == ["first", "second"]
        assert len(first.streams) == 2 and first.caller is first.streams[1]
        await asyncio.to_thread(client.calls(first.sid).update, status="completed")
        await first.wait_ended(timeout=5)
        assert room.kinds() == ["join", "wait", "leave", "end"]
        assert room.events[2].detail == "call redirected to new TwiML"


@pytest.mark.asyncio
async def test_a_caller_hanging_up_on_hold_ends_the_room_and_cannot_be_redirected() -> None:
    """A person joining with startConferenceOnEnter (the create's own TwiML here) while the
    caller waits starts the conference; the caller hanging up ends it (endConferenceOnExit)
    and a redirect of the call that is over is Twilio's 21220."""
    bot = Bot()
    async with twilio_and_bot(bot) as (twilio, ws_url):
        client = twilio.client()
        first, _ = await on_hold(twilio, ws_url)
        created = await asyncio.to_thread(
            client.calls.create, to="+15553330000", from_=BOT_NUMBER, twiml=conference_twiml(True)
        )
        person = twilio.calls[created.sid]
        await settle(0.5)
        room = twilio.conferences[ROOM]
        assert room.started and room.joined == [first.sid, person.sid]
        twilio.hang_up(first.sid)
        await person.wait_finished(timeout=5)
        assert room.ended and person.status == "completed"
        with pytest.raises(TwilioRestException) as error:
            resume = stream_twiml(ws_url)
            await asyncio.to_thread(client.calls(first.sid).update, twiml=resume)
        assert (error.value.status, error.value.code) == (400, 21220)
    assert len(first.streams) == 1 and first.conference is None


@pytest.mark.asyncio
async def test_calls_held_in_a_room_are_left_there_when_the_emulator_stops() -> None:
    """For a test to look at after the `async with`; stopping does not wait on them."""
    async with twilio_and_bot(Bot()) as (twilio, ws_url):
        client = twilio.client()
        first, _ = await on_hold(twilio, ws_url)
        created = await asyncio.to_thread(
            client.calls.create,
            to="+15553330000",
            from_=BOT_NUMBER,
            twiml=conference_twiml(True),
            status_callback="http://127.0.0.1:9/status",
        )
        joined = twilio.calls[created.sid]
        await joined.wait_finished(timeout=5)  # held in the room: no stream runs
        stopping = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - stopping < 3.0
    assert (first.status, joined.status) == ("in-progress", "in-progress")
    assert set(twilio.conferences[ROOM].participants) == {first.sid, joined.sid}
    assert "completed" not in statuses(twilio, joined)


@pytest.mark.asyncio
async def test_a_call_sent_from_a_room_to_a_number_leaves_it_and_ends() -> None:
    """No stream's end completes it there (a cold transfer from hold): the redirect does."""
    async with twilio_and_bot(Bot()) as (twilio, ws_url):
        client = twilio.client()
        first, _ = await on_hold(twilio, ws_url)
        dial = "<Response><Dial>+15559990000</Dial></Response>"
        await asyncio.to_thread(client.calls(first.sid).update, twiml=dial)
        assert first.status == "completed" and first.dialed == ["+15559990000"]
        assert twilio.conferences[ROOM].ended and first.conference is None
