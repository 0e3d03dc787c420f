"""Barge-in at the wire: nothing of an interrupted reply after `clear`, and no false alarms.

The transport tests drive Pipecat's websocket output (ours and Pipecat's own, for
contrast) over a fake websocket and read what would reach Twilio, message by message.
The call tests run the real server with the emulator playing Twilio.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketCallbacks,
    FastAPIWebsocketClient,
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner
from starlette.websockets import WebSocketState

from phonebot.audio import ulaw_decode
from phonebot.call.barge_in import vad_params
from phonebot.emulator import Hangup, MediaStreamCaller, Pause, Speak, WaitForBot, dial_in
from phonebot.emulator.timeline import LateMediaWatch, Segment, onset_before
from phonebot.twilio.transport import BargeInOutputTransport, ClearGate, barge_in_transport
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, make_settings
from tests.test_calls import (  # noqa: F401 (rest_port, server, twilio: fixtures)
    CALLER,
    OUR_NUMBER,
    call_in,
    rest_port,
    say,
    server,
    twilio,
)

RATE = 8000
CHUNK = RATE // 10  # the transport's 100 ms chunk (phonebot.twilio.transport)


class FakeTwilioSocket:
    """What the transport needs of a FastAPI websocket; keeps every message sent."""

    def __init__(self) -> None:
        self.client_state = WebSocketState.CONNECTED
        self.application_state = WebSocketState.CONNECTED
        self.headers: dict[str, str] = {}
        self.sent: list[dict] = []
        self.cleared = asyncio.Event()

    async def send_text(self, text: str) -> None:
        message = json.loads(text)
        self.sent.append(message)
        if message["event"] == "clear":
            self.cleared.set()

    async def close(self, code: int = 1000) -> None:
        self.client_state = WebSocketState.DISCONNECTED

    def wire(self) -> list[str]:
        """The messages as Twilio got them: "+"/"-" for media of each reply, "clear"."""
        out = []
        for message in self.sent:
            if message["event"] == "media":
                ulaw = np.frombuffer(base64.b64decode(message["media"]["payload"]), np.uint8)
                out.append("+" if ulaw_decode(ulaw).mean() > 0 else "-")
            else:
                out.append(message["event"])
        return out


def transport_params() -> FastAPIWebsocketParams:
    serializer = TwilioFrameSerializer(
        stream_sid="MZ" + "0" * 32, params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
    )
    return FastAPIWebsocketParams(
        audio_out_enabled=True,
        add_wav_header=False,
        serializer=serializer,
        audio_out_end_silence_secs=0,
        audio_out_10ms_chunks=10,
    )


def holding_output(base: type[FastAPIWebsocketOutputTransport], socket: FakeTwilioSocket):
    """An output transport whose 3rd chunk is in hand when the caller barges in.

    Pipecat's audio task takes a chunk off its queue and then writes it in a new task
    (`asyncio.wait_for`), so an interruption can be handled between the two. This holds
    the 3rd chunk there until the `clear` is out, which makes that race certain.
    """

    class Holding(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.chunks = 0
            self.in_hand = asyncio.Event()

        async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
            self.chunks += 1
            if self.chunks == 3:
                self.in_hand.set()
                await socket.cleared.wait()
            return await super().write_audio_frame(frame)

    params = transport_params()
    transport = FastAPIWebsocketTransport(websocket=socket, params=params)  # type: ignore[arg-type]
    callbacks = FastAPIWebsocketCallbacks(
        on_client_connected=_nothing, on_client_disconnected=_nothing, on_session_timeout=_nothing
    )
    client = FastAPIWebsocketClient(socket, callbacks)  # type: ignore[arg-type]
    return Holding(transport, client, params)


async def _nothing(*_args) -> None:
    return None


def reply(context_id: str, level: int, seconds: float) -> list:
    """A TTS reply: started, `seconds` of constant-`level` audio in 100 ms frames."""
    audio = np.full(CHUNK, level, dtype=np.int16).tobytes()
    frames = [TTSAudioRawFrame(audio, RATE, 1, context_id=context_id)]
    return [TTSStartedFrame(context_id=context_id), *frames * round(seconds * 10)]


async def drive(output, steps: Callable[[PipelineWorker], Awaitable[None]]) -> None:
    """Run `output` alone in a pipeline at 8 kHz while `steps` feeds it."""
    worker = PipelineWorker(
        Pipeline([output]),
        params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    async def feed() -> None:
        await asyncio.wait_for(started.wait(), 5)
        await steps(worker)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), feed()), 20)


async def barge_in_over(output, socket: FakeTwilioSocket) -> list[str]:
    """The bot talks ("+"), the caller barges in, stale audio trails, the bot answers ("-")."""

    async def steps(worker: PipelineWorker) -> None:
        await worker.queue_frames(reply("greeting", 3000, 1.0))
        await asyncio.wait_for(output.in_hand.wait(), 5)
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(0.3)
        # The greeting's audio that was still in a queue behind the interruption (Pipecat
        # hands system frames out first) reaches the output after it.
        await worker.queue_frames(reply("greeting", 3000, 0.3)[1:])
        await asyncio.sleep(0.3)
        await worker.queue_frames([*reply("answer", -3000, 0.3), TTSStoppedFrame("answer")])
        await asyncio.sleep(0.8)

    await drive(output, steps)
    return socket.wire()


async def test_nothing_of_the_interrupted_reply_follows_the_clear() -> None:
    socket = FakeTwilioSocket()
    wire = await barge_in_over(holding_output(BargeInOutputTransport, socket), socket)

    clear = wire.index("clear")
    assert wire[:clear] == ["+", "+"], wire  # the chunk in hand never went out
    assert set(wire[clear + 1 :]) == {"-"}, wire  # after the clear: only the answer
    assert wire.count("-") == 3, wire  # which was not held back


async def test_a_reply_made_before_the_barge_in_that_reaches_the_output_after_it_is_dropped():
    """The TTS had made the next reply's start and audio before the caller cut in, but they
    were still on their way (a processor's queue) when the `clear` went out: new to the
    output, they are still the interrupted bot talking, not its next turn."""
    socket = FakeTwilioSocket()
    output = holding_output(BargeInOutputTransport, socket)

    async def steps(worker: PipelineWorker) -> None:
        await worker.queue_frames(reply("greeting", 3000, 1.0))
        await asyncio.wait_for(output.in_hand.wait(), 5)
        in_flight = [*reply("next", 3000, 0.3), TTSStoppedFrame("next")]  # made first ...
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(0.3)
        await worker.queue_frames(in_flight)  # ... arriving after the clear
        await asyncio.sleep(0.3)
        await worker.queue_frames([*reply("answer", -3000, 0.3), TTSStoppedFrame("answer")])
        await asyncio.sleep(0.8)

    await drive(output, steps)
    wire = socket.wire()
    clear = wire.index("clear")
    assert set(wire[clear + 1 :]) == {"-"}, wire  # after the clear: only the answer
    assert wire.count("-") == 3, wire


async def test_pipecats_own_output_sends_the_interrupted_reply_after_the_clear() -> None:
    """Why BargeInOutputTransport exists: the same barge-in on Pipecat 1.14's output."""
    socket = FakeTwilioSocket()
    wire = await barge_in_over(holding_output(FastAPIWebsocketOutputTransport, socket), socket)

    after_clear = wire[wire.index("clear") + 1 :]
    assert "+" in after_clear, wire


def test_the_gate_lets_uninterruptible_audio_through_and_reopens_for_a_new_reply() -> None:
    gate = ClearGate()
    assert gate.admit(TTSStartedFrame(context_id="a")) == (True, False)
    made_before = OutputAudioRawFrame(bytes(2), RATE, 1)  # of no context: still the old reply
    gate.interrupted(InterruptionFrame().id)
    chunk = OutputAudioRawFrame(bytes(2 * CHUNK), RATE, 1)
    assert not gate.may_send(chunk)
    chunk.interruptible = False  # e.g. a goodbye Pipecat must not cut: still sent
    assert gate.may_send(chunk)
    assert gate.admit(TTSAudioRawFrame(bytes(2), RATE, 1, context_id="a")) == (False, False)
    assert gate.admit(made_before) == (False, False)
    fresh = TTSAudioRawFrame(bytes(2), RATE, 1, context_id="b")
    assert gate.admit(fresh) == (True, True)  # queue the resume marker ahead of it
    assert gate.admit(fresh) == (True, False)  # once
    gate.resumed()
    assert gate.may_send(OutputAudioRawFrame(bytes(2 * CHUNK), RATE, 1))


def test_the_transport_puts_our_output_in_pipecats_place() -> None:
    """Fails if Pipecat renames the private attributes `replace_websocket_output` uses."""
    transport = barge_in_transport(FakeTwilioSocket(), transport_params())  # type: ignore[arg-type]
    assert isinstance(transport.output(), BargeInOutputTransport)
    assert transport.output() is transport.output()


def test_vad_parameters_come_from_the_settings() -> None:
    params = vad_params(make_settings(vad_start_s=0.15, vad_min_volume=0.4, vad_confidence=0.8))
    assert (params.start_secs, params.min_volume, params.confidence) == (0.15, 0.4, 0.8)
    assert params.stop_secs == 0.2  # Pipecat's; turn-taking (phonebot.call.turns) builds on it


def test_late_media_is_charged_to_a_clear_until_the_bots_media_pauses() -> None:
    watch = LateMediaWatch(gap=2000)
    assert watch.media(100) is None  # no clear yet
    watch.cleared(0, 1000)
    assert [watch.media(at) for at in (1500, 2300, 3100)] == [0, 0, 0]
    assert watch.media(5200) is None  # after a pause: the bot's next turn
    assert onset_before([Segment(10, 20), Segment(40, 90)], 50) == 40
    assert onset_before([Segment(40, 90)], 30) is None


# ------------------------------------------------------------------ through the real server


# The live server and the REST emulator are tests/test_calls.py's fixtures (imported above).


async def test_line_hiss_and_a_cough_do_not_cut_the_bot_off(server, twilio) -> None:  # noqa: F811
    noise = Speak.noise(3.0, rms=300, cough_at=1.0, cough_s=0.2, seed=7)
    script = [WaitForBot(until="speech"), Pause(0.3), noise, Hangup()]
    result = await call_in(server, twilio, script)

    assert result.clears == [], f"noise cut the bot off: {result.clears}"
    cough = next(e.t for e in result.events_of("caller_speech")) + 1.0
    heard = result.bot_audio[int((cough + 0.2) * RATE) : int((cough + 1.7) * RATE)]
    assert np.sqrt(np.mean(heard.astype(np.float64) ** 2)) > 300, "the bot stopped talking"


class MediaClock(MediaStreamCaller):
    """The emulator's caller, noting when each bot `media` message arrives (its own record
    only counts the media that trail a `clear` without a pause, `ClearRecord.late_media`)
    and how many had arrived before each `clear`: order, not time, says which came first
    (a `ClearRecord`'s time is rounded down to its sample, so a media message read just
    before the `clear`, in the same 125 µs, would look later than it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.media_at: list[float] = []
        self.media_before_clear: list[int] = []

    def _on_media(self, data: dict) -> None:
        self.media_at.append(self.now)
        super()._on_media(data)

    def _on_clear(self, data: dict) -> None:
        self.media_before_clear.append(len(self.media_at))
        super()._on_clear(data)

    def first_media_after(self, clear: int) -> float:
        """When the first bot media message after the `clear`-th `clear` arrived."""
        return self.media_at[self.media_before_clear[clear]]


async def test_no_bot_media_follows_a_clear_until_the_bots_next_turn(server, twilio):  # noqa: F811
    """The caller talks over the greeting, then again just as the answer starts: after each
    `clear`, not one bot message until the caller has finished and the bot answers."""
    dial = await dial_in(
        f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
        from_=CALLER, to=OUR_NUMBER,
    )  # fmt: skip
    caller = MediaClock(
        dial.stream_url, parameters=dial.parameters, call_sid=dial.call_sid,
        account_sid=dial.account_sid, after_stream=dial.after_stream,
    )  # fmt: skip
    twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
    script = [
        WaitForBot(until="speech"),
        Pause(0.5),
        say("hello there"),
        WaitForBot(until="speech", timeout=20),
        Pause(0.2),
        say("sorry, what are your opening hours"),
        WaitForBot(timeout=20),
        Hangup(),
    ]
    result = await caller.run(script)

    barge_ins = [
        (index, clear)
        for index, clear in enumerate(result.clears)
        if clear.caller_onset is not None and clear.dropped > 0
    ]
    assert len(barge_ins) == 2, result.clears  # both times the bot was cut off
    for index, clear in barge_ins:
        said_end = next(end for start, end in result.caller_segments if start <= clear.t < end)
        answer_at = caller.first_media_after(index)
        assert answer_at > said_end, f"bot media {answer_at - clear.t:.2f} s after {clear}"
    assert len(result.bot_utterances) >= 3  # and the bot did answer each time
