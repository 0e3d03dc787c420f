"""Baseline for the load benchmark: Pipecat's own Twilio example, as small as it comes.

The shape of pipecat-examples' `twilio-chatbot` (`inbound/bot.py` run by Pipecat's
development runner, which serves `POST /` with a TwiML `<Connect><Stream>` and the
media-stream websocket `/ws`): parse the Twilio handshake, a `FastAPIWebsocketTransport`
with a `TwilioFrameSerializer` at 8 kHz, and

    transport.input → STT → user aggregator (Silero VAD + Smart Turn v3) → LLM → TTS
        → transport.output → assistant aggregator

greeting on connect through the LLM, as the example does. The user aggregator gets only a
VAD, so its turn strategies are Pipecat 1.14's defaults (`UserTurnStrategies()`): the turn
starts on VAD or transcription, and it ends by `TurnAnalyzerUserTurnStopStrategy` with
`LocalSmartTurnAnalyzerV3`, whose silence fallback (`SmartTurnParams.stop_secs`, 3 s)
applies when the model judges the turn unfinished. So the baseline runs Smart Turn as our
server does; it is not "plain VAD". Only the services differ: the
same OpenAI services our server uses, pointed at the same endpoint (`OPENAI_BASE_URL`, the
instant AI API in the benchmark), so the benchmark compares the servers, not providers.
Auto hang-up is off (there is no Twilio account to call; our server does the same).

Run: `PORT=8001 OPENAI_API_KEY=test OPENAI_BASE_URL=http://127.0.0.1:8100/v1 \
python bench/baseline_server.py`; `WORKERS=K` runs K uvicorn worker processes (uvicorn's
own `workers`, each importing this module as `bench.baseline_server`), as a Pipecat
deployment on one machine would use its cores.
"""

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

API_KEY = os.getenv("OPENAI_API_KEY", "test")
BASE_URL = os.getenv("OPENAI_BASE_URL")
SYSTEM = (
    "You are a helpful assistant in a phone call. Your output will be converted to audio "
    "so don't include special characters in your answers. Keep your answers short."
)


def quiet_logs() -> None:
    """Pipecat logs every frame event at DEBUG; the benchmark runs both servers at WARNING."""
    logger.remove()
    logger.add(sys.stderr, level=os.getenv("LOG_LEVEL", "WARNING"))


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Every process serving the app (each uvicorn worker too) sets its own log level."""
    quiet_logs()
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/")
async def start_call(request: Request) -> HTMLResponse:
    """The runner's Twilio webhook: TwiML that streams the call to `/ws`."""
    host = request.headers.get("host", "localhost")
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Response>
  <Connect>
    <Stream url="wss://{host}/ws"></Stream>
  </Connect>
</Response>"""
    return HTMLResponse(content=xml, media_type="application/xml")


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    _, call_data = await parse_telephony_websocket(websocket)
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    await run_bot(transport)


def user_params() -> LLMUserAggregatorParams:
    """The example's user aggregator settings: a Silero VAD, every turn strategy left to
    Pipecat's default (which ends turns with Smart Turn v3, see the module docstring)."""
    return LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())


async def run_bot(transport: FastAPIWebsocketTransport) -> None:
    """The example's `run_bot`, with the OpenAI services in place of Google/Deepgram/Cartesia."""
    stt = OpenAISTTService(
        api_key=API_KEY,
        base_url=BASE_URL,
        settings=OpenAISTTService.Settings(model="gpt-4o-transcribe"),
    )
    llm = OpenAILLMService(
        api_key=API_KEY,
        base_url=BASE_URL,
        settings=OpenAILLMService.Settings(model="gpt-4.1-mini"),
    )
    tts = OpenAITTSService(
        api_key=API_KEY,
        base_url=BASE_URL,
        settings=OpenAITTSService.Settings(model="gpt-4o-mini-tts", voice="alloy"),
        sample_rate=24000,
    )
    context = LLMContext(messages=[{"role": "system", "content": SYSTEM}])
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context, user_params=user_params()
    )
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            user_aggregator,
            llm,
            tts,
            transport.output(),
            assistant_aggregator,
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=8000,
            audio_out_sample_rate=8000,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        context.add_message({"role": "developer", "content": "Please introduce yourself."})
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False, force_gc=True)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    quiet_logs()
    workers = int(os.getenv("WORKERS", "1"))
    # uvicorn starts several workers only from an import string (PYTHONPATH: the repo root).
    target = "bench.baseline_server:app" if workers > 1 else app
    port = int(os.getenv("PORT", "8001"))
    uvicorn.run(target, host="127.0.0.1", port=port, log_level="warning", workers=workers)
