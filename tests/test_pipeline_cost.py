"""What keeps a call's CPU low (phonebot.call.pipeline_cost, phonebot.twilio.transport), and
that it changes nothing heard.

- inbound audio is batched into fewer, larger frames, byte for byte the same audio;
- the caller's audio stops after the user aggregator;
- the call's worker has no observers (each one costs a queue hop per frame push), so the
  idle timeout is PlayoutTracker's watchdog, which must still end an idle call;
- Silero VAD runs inline, without a thread hand-off per chunk.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvicorn
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    BotSpeakingFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    TextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from phonebot.ai.inference import SharedSileroVADAnalyzer
from phonebot.ai.offline.espeak import synthesize_at
from phonebot.call.pipeline import call_worker
from phonebot.call.pipeline_cost import InputAudioStop
from phonebot.call.playout import PlayoutTracker
from phonebot.config import Settings
from phonebot.emulator import Hangup, WaitForBot, dial_in
from phonebot.emulator.ids import new_call_sid
from phonebot.twilio.stream import CallSession, TwilioMarkSerializer, twilio_transport
from phonebot.twilio.transport import (
    INBOUND_BATCH_MS,
    OUTBOUND_CHUNK_10MS,
    ULAW_BYTES_PER_MS,
    AudioBatcher,
)
from phonebot.web.app import create_app
from tests.conftest import make_settings
from tests.live_server import free_port
from tests.test_calls import CALLER, OUR_NUMBER

STREAM_SID = "MZ" + "0" * 32
MESSAGE_BYTES = 20 * ULAW_BYTES_PER_MS  # Twilio's 20 ms media payload


def ulaw_payloads(count: int) -> list[bytes]:
    """Distinct μ-law payloads, so a dropped, repeated or reordered byte shows."""
    return [os.urandom(MESSAGE_BYTES) for _ in range(count)]


def media(payload: bytes) -> str:
    encoded = base64.b64encode(payload).decode()
    return json.dumps({"event": "media", "streamSid": STREAM_SID, "media": {"payload": encoded}})


# --------------------------------------------------------------------- batching


def test_the_batcher_passes_every_byte_in_order_in_batches_of_its_size() -> None:
    size = INBOUND_BATCH_MS * ULAW_BYTES_PER_MS
    batcher = AudioBatcher(size)
    payloads = ulaw_payloads(10)
    batches = [b for p in payloads if (b := batcher.add(p)) is not None]

    per_batch = size // MESSAGE_BYTES
    assert len(batches) == len(payloads) // per_batch
    assert all(len(batch) == size for batch in batches)
    assert b"".join(batches) + b"".join(payloads)[-batcher.pending :] == b"".join(payloads)
    assert batcher.pending == (len(payloads) % per_batch) * MESSAGE_BYTES


async def test_the_serializer_batches_twilio_audio_into_the_same_pcm() -> None:
    serializer = TwilioMarkSerializer(
        stream_sid=STREAM_SID,
        call_sid=new_call_sid(),
        params=TwilioMarkSerializer.InputParams(auto_hang_up=False, sample_rate=8000),
    )
    await serializer.setup(None)
    payloads = ulaw_payloads(3 * INBOUND_BATCH_MS // 20)
    frames = [await serializer.deserialize(media(payload)) for payload in payloads]

    audio = [frame for frame in frames if frame is not None]
    assert len(audio) == 3  # one frame per INBOUND_BATCH_MS, not one per message
    assert all(isinstance(frame, InputAudioRawFrame) for frame in audio)
    assert all(len(frame.audio) == 2 * INBOUND_BATCH_MS * ULAW_BYTES_PER_MS for frame in audio)
    # Exactly the PCM Pipecat's serializer would have produced, message by message.
    assert b"".join(f.audio for f in audio) == audioop.ulaw2lin(b"".join(payloads), 2)
    assert all(frame.sample_rate == 8000 and frame.num_channels == 1 for frame in audio)


async def test_a_key_press_is_not_held_back_by_a_partial_batch() -> None:
    serializer = TwilioMarkSerializer(
        stream_sid=STREAM_SID,
        call_sid=new_call_sid(),
        params=TwilioMarkSerializer.InputParams(auto_hang_up=False, sample_rate=8000),
    )
    await serializer.setup(None)
    assert await serializer.deserialize(media(ulaw_payloads(1)[0])) is None  # batch pending
    dtmf = {"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"digit": "7"}}
    frame = await serializer.deserialize(json.dumps(dtmf))
    assert isinstance(frame, InputDTMFFrame) and frame.button.value == "7"


def test_the_outbound_chunks_are_larger_than_pipecats_default() -> None:
    class Socket:  # what the transport's constructor reads from a FastAPI websocket
        headers: dict[str, str] = {}
        client_state = application_state = None

    call = CallSession(call_sid=new_call_sid(), stream_sid=STREAM_SID)
    transport, _ = twilio_transport(Socket(), call, make_settings())  # type: ignore[arg-type]
    assert transport._params.audio_out_10ms_chunks == OUTBOUND_CHUNK_10MS > 4


# ----------------------------------------------------------- frames in the pipeline


class Recorder(FrameProcessor):
    """Keeps every frame that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)


async def run_until_end(worker: PipelineWorker, frames: list[Frame]) -> None:
    await worker.queue_frames([*frames, EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), timeout=20)


async def test_the_callers_audio_stops_after_the_last_listener() -> None:
    recorder = Recorder()
    worker = call_worker(Pipeline([InputAudioStop(), recorder]))
    audio = InputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1)
    await run_until_end(worker, [audio, TextFrame("hello"), BotSpeakingFrame()])

    kinds = [type(frame) for frame in recorder.frames]
    assert InputAudioRawFrame not in kinds
    assert TextFrame in kinds and BotSpeakingFrame in kinds and EndFrame in kinds


async def test_a_real_calls_worker_has_no_observers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each observer would get every frame push of every processor through a queue.

    A whole call runs in this process (server.create_app, offline engines), so whatever
    run_bot attaches to the worker (call control, provider faults, ...) is seen.
    """
    workers: list[PipelineWorker] = []

    def recording_worker(pipeline: Pipeline) -> PipelineWorker:
        workers.append(call_worker(pipeline))
        return workers[-1]

    monkeypatch.setattr("phonebot.call.pipeline.call_worker", recording_worker)
    settings = make_settings(twilio_account_sid=None, twilio_auth_token=None)
    async with in_process_server(settings) as base_url:
        answered = await dial_in(f"{base_url}/", from_=CALLER, to=OUR_NUMBER)
        result = await answered.caller().run([WaitForBot(timeout=30), Hangup()])
    assert result.first_bot_audio is not None
    assert len(workers) == 1
    worker = workers[0]
    assert worker._observer._observers == []
    assert worker._idle_timeout_secs is None and worker._rtvi is None


@asynccontextmanager
async def in_process_server(settings: Settings) -> AsyncIterator[str]:
    """`server.create_app` under uvicorn in this event loop; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


# ------------------------------------------------------------------ idle watchdog


async def test_the_watchdog_ends_a_call_where_no_one_speaks() -> None:
    idle_at: list[float] = []
    worker: PipelineWorker | None = None

    async def on_idle() -> None:
        idle_at.append(time.monotonic())
        assert worker is not None
        await worker.cancel(reason="idle")

    worker = call_worker(Pipeline([PlayoutTracker(0.5, on_idle=on_idle)]))
    started = time.monotonic()
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), timeout=20)  # only the watchdog ends it

    assert len(idle_at) == 1
    assert 0.45 <= idle_at[0] - started < 5


async def test_speaking_keeps_the_watchdog_quiet() -> None:
    idle_at: list[float] = []

    async def on_idle() -> None:
        idle_at.append(time.monotonic())

    worker = call_worker(Pipeline([PlayoutTracker(0.6, on_idle=on_idle)]))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # the bot talks for 2.5 timeouts
            last_spoke = time.monotonic()  # before the frame: the tracker stamps it later
            await worker.queue_frame(BotSpeakingFrame())
            await asyncio.sleep(0.1)
        assert idle_at == []
        await asyncio.sleep(1.2)  # then silence: the watchdog fires once, a timeout later
        assert len(idle_at) == 1 and idle_at[0] - last_spoke >= 0.6
    finally:
        # Even after a failed assertion: a runner left running hangs the loop's teardown.
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(run, timeout=20)


# ---------------------------------------------------------------------- VAD inline


async def test_vad_runs_inline_without_a_thread() -> None:
    analyzer = SharedSileroVADAnalyzer(sample_rate=8000)
    analyzer.set_sample_rate(8000)
    for _ in range(20):
        await analyzer.analyze_audio(bytes(320))
    # Pipecat's analyze_audio hands every chunk to this one-thread executor.
    assert analyzer._executor._threads == set()
    await analyzer.cleanup()


@pytest.mark.parametrize("chunk_ms", [20, INBOUND_BATCH_MS])
async def test_vad_decides_the_same_on_batched_frames(chunk_ms: int) -> None:
    """The VAD cuts audio into its own 32 ms windows, so batching changes no decision:
    after each frame its state is the one a window-by-window run had after as much audio.
    """
    speech = synthesize_at("What are your opening hours?", 8000) + bytes(8000)
    window, size = 512, 2 * ULAW_BYTES_PER_MS * chunk_ms
    reference, batched = SharedSileroVADAnalyzer(), SharedSileroVADAnalyzer()
    for analyzer in (reference, batched):
        analyzer.set_sample_rate(8000)
    by_window = [
        await reference.analyze_audio(speech[i : i + window])
        for i in range(0, len(speech) - window + 1, window)
    ]
    for end in range(size, len(speech) + 1, size):
        state = await batched.analyze_audio(speech[end - size : end])
        if end >= window:
            assert state == by_window[end // window - 1]
    assert VADState.SPEAKING in by_window and by_window[-1] == VADState.QUIET
