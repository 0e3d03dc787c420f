"""The OpenAI-compatible test AI endpoint, driven by the real `openai` client and Pipecat."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys

import httpx
import httpx2
import numpy as np
import openai
import pytest
from pipecat.frames.frames import (
    FunctionCallResultFrame,
    LLMContextFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.tests.utils import run_test

from phonebot.ai.providers import build_services, chosen_providers
from phonebot.emulator.ai_api import (
    ANSWER,
    DEFAULT_TRANSCRIPT,
    GREETING,
    ScriptedReply,
    create_ai_app,
    running_ai_api,
)
from phonebot.emulator.ai_speech import SAMPLE_RATE, speech_master, speech_pcm
from tests.conftest import make_settings, shipped_agent

QUESTION = "What time do you open?"


@pytest.fixture
async def api():
    async with running_ai_api() as controls:
        yield controls


def client(api, **options) -> openai.AsyncOpenAI:
    """No retries unless a test asks: each request then meets exactly one fault."""
    return openai.AsyncOpenAI(api_key="test", base_url=api.base_url, max_retries=0, **options)


async def stream_chat(ai: openai.AsyncOpenAI, messages: list) -> list:
    stream = await ai.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    return [chunk async for chunk in stream]


async def speak(ai: openai.AsyncOpenAI, text: str, received: list[bytes] | None = None) -> bytes:
    received = [] if received is None else received
    async with ai.audio.speech.with_streaming_response.create(
        input=text, model="gpt-4o-mini-tts", voice="alloy", response_format="pcm"
    ) as response:
        async for chunk in response.iter_bytes():
            received.append(chunk)
    return b"".join(received)


async def transcribe(ai: openai.AsyncOpenAI, **options):
    audio = ("audio.wav", b"RIFF" + bytes(64), "audio/wav")
    return await ai.audio.transcriptions.create(file=audio, model="gpt-4o-transcribe", **options)


async def test_streamed_completion_echoes_the_last_user_message(api):
    messages = [
        {"role": "system", "content": "You are a receptionist."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    chunks = await stream_chat(client(api), messages)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [piece for piece in pieces if piece]
    assert "".join(pieces) == f"You said: What time do you open. {ANSWER}"
    assert len(pieces) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage  # the include_usage chunk: no choices, word-count tokens
    assert chunks[-1].choices == [] and usage.prompt_tokens == 11
    assert usage.completion_tokens == len("".join(pieces).split()) == 25
    assert usage.total_tokens == 36


async def test_plain_completion_and_greeting_without_a_user_message(api):
    ai = client(api)
    greeting = await ai.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Be brief."}]
    )
    assert greeting.choices[0].message.content == GREETING
    assert greeting.usage.prompt_tokens == 2
    chunks = await stream_chat(ai, [])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GREETING
    async with httpx.AsyncClient() as http:
        bad = await http.post(f"{api.base_url}/chat/completions", json={"model": "m"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


async def test_transcription_returns_the_settable_transcript(api):
    ai = client(api)
    assert (await transcribe(ai, language="en")).text == DEFAULT_TRANSCRIPT
    async with httpx.AsyncClient(base_url=api.base_url.removesuffix("/v1")) as http:
        changed = await http.put("/_emulator/transcript", json={"text": "Goodbye"})
        empty = await http.put("/_emulator/transcript", json={"text": ""})
    assert changed.status_code == 200
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"][-1] == "text"
    assert await transcribe(ai, response_format="text") in ("Goodbye", "Goodbye\n")
    assert (await transcribe(ai, response_format="json", include=["logprobs"])).text == "Goodbye"
    assert (await transcribe(ai, response_format="verbose_json")).text == "Goodbye"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        await transcribe(ai, response_format="srt")
    async with httpx.AsyncClient() as http:
        no_file = await http.post(f"{api.base_url}/audio/transcriptions", data={"model": "m"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"


async def test_speech_is_pcm_proportional_to_the_text(api):
    ai = client(api)
    short = await speak(ai, "x" * 40)
    assert len(short) / 2 / SAMPLE_RATE == pytest.approx(40 * 0.065, abs=0.11)
    assert len(await speak(ai, "y" * 500)) == 8 * SAMPLE_RATE * 2  # capped at 8 s
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        mp3 = await http.post("/audio/speech", json={"input": "hi", "response_format": "mp3"})
        empty = await http.post("/audio/speech", json={"input": " ", "response_format": "pcm"})
    assert mp3.status_code == 400 and mp3.json()["error"]["param"] == "response_format"
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"


def test_speech_sounds_like_speech_not_a_tone_or_silence():
    samples = np.frombuffer(bytes(speech_pcm("z" * 100)), "<i2").astype(float)
    frame_rms = np.sqrt((samples[: len(samples) // 480 * 480].reshape(-1, 480) ** 2).mean(1))
    quiet = frame_rms < 0.05 * frame_rms.max()
    assert frame_rms.max() > 3000 and 0.03 < quiet.mean() < 0.4  # syllables with gaps
    spectrum = np.abs(np.fft.rfft(samples)) ** 2
    bands = spectrum[: len(spectrum) // 2].reshape(-1, 100).sum(1)  # 100-bin bands
    assert np.sort(bands)[-1] < 0.5 * bands.sum()  # energy spread over harmonics
    assert (bands > 0.02 * bands.sum()).sum() >= 4


def test_speech_is_sliced_from_one_cached_signal():
    speech_master()
    before = speech_master.cache_info().misses
    views = [speech_pcm("a" * n) for n in range(1, 200)]
    assert speech_master.cache_info().misses == before
    assert all(view.obj is views[0].obj for view in views)


async def test_500_fault_fails_every_service_once(api):
    ai = client(api)
    for service in ("llm", "stt", "tts"):
        api.inject_fault(service, "status_500")
    with pytest.raises(openai.InternalServerError):
        await stream_chat(ai, [{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.InternalServerError):
        await transcribe(ai)
    with pytest.raises(openai.InternalServerError):
        await speak(ai, "Hello")
    assert (await transcribe(ai)).text == DEFAULT_TRANSCRIPT  # the next request is healthy


async def test_timeout_fault_hangs_until_the_client_gives_up(api):
    ai = client(api, timeout=0.3)
    calls = {
        "llm": lambda: stream_chat(ai, []),
        "stt": lambda: transcribe(ai),
        "tts": lambda: speak(ai, "Hello"),
    }
    for service, call in calls.items():
        api.inject_fault(service, "timeout")
        with pytest.raises(openai.APITimeoutError):
            await call()
        assert api.hanging == 1
        await call()  # the fault was used up
        for _ in range(40):  # the server notices the client left and lets go
            if not api.hanging:
                break
            await asyncio.sleep(0.05)
        assert api.hanging == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def uvicorn_errors():
    """uvicorn's own error log (it does not propagate to the root logger caplog watches)."""
    handler, logger = _Records(), logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


async def test_broken_stream_fails_mid_response(api, uvicorn_errors):
    ai = client(api)
    api.inject_fault("llm", "broken_stream")
    chunks: list = []
    with pytest.raises(json.JSONDecodeError):
        stream = await ai.chat.completions.create(model="m", messages=[], stream=True)
        async for chunk in stream:
            chunks.append(chunk)
    assert chunks  # valid chunks came first, then garbage

    api.inject_fault("tts", "broken_stream")
    received: list[bytes] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        await speak(ai, "Hello there, how are you today?", received)
    assert 0 < sum(map(len, received)) < len(speech_pcm("Hello there, how are you today?"))

    api.inject_fault("stt", "broken_stream")
    with pytest.raises(json.JSONDecodeError):
        await transcribe(ai)
    assert len(await speak(ai, "Hello")) > 0
    assert not [r for r in uvicorn_errors if r.levelno >= logging.ERROR]  # drops aren't bugs


async def test_times_counts_down_and_the_control_api_validates(api):
    async with httpx.AsyncClient(base_url=api.base_url.removesuffix("/v1")) as http:
        added = await http.post("/_emulator/faults", json={"service": "llm", "kind": "status_500",
                                                           "times": 2})  # fmt: skip
        bad = [
            await http.post("/_emulator/faults", json={"service": "x", "kind": "timeout"}),
            await http.post("/_emulator/faults", json={"service": "tts", "kind": "slow"}),
            await http.post("/_emulator/faults", json={"service": "tts", "kind": "timeout",
                                                       "times": 0}),  # fmt: skip
        ]
        assert added.status_code == 201
        assert [r.status_code for r in bad] == [422] * 3
        assert [r.json()["detail"][0]["loc"][-1] for r in bad] == ["service", "kind", "times"]

        retrying = openai.AsyncOpenAI(api_key="test", base_url=api.base_url, max_retries=2)
        chunks = await stream_chat(retrying, [])  # two failures absorbed by the retries
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GREETING
        assert (await http.get("/_emulator/requests")).json() == {"llm": 3, "stt": 0, "tts": 0}

        api.inject_fault("tts", "status_500", times=5)
        api.inject_fault("tts", "timeout")
        queued = [{"kind": "status_500", "remaining": 5}, {"kind": "timeout", "remaining": 1}]
        assert api.pending()["tts"] == queued
        cleared = await http.delete("/_emulator/faults")
        assert cleared.json() == {"llm": [], "stt": [], "tts": []}
    assert len(await speak(client(api), "Hi")) > 0


async def test_each_app_has_its_own_state():
    first, second = create_ai_app(), create_ai_app()
    first.state.controls.inject_fault("llm", "status_500")
    transport = httpx.ASGITransport(app=second)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as http:
        reply = await http.post("/v1/chat/completions", json={"messages": []})
    assert reply.status_code == 200 and first.state.controls.faults["llm"]
    assert second.state.controls.counts["llm"] == 1 and first.state.controls.counts["llm"] == 0


async def test_the_answer_after_the_echo_can_be_chosen():
    """`--answer`: the load benchmark's shorter reply (a steady caller's 6-10 s turn)."""
    app = create_ai_app(answer="We are open nine to five.")
    transport = httpx.ASGITransport(app=app)
    body = {"messages": [{"role": "user", "content": "when are you open"}]}
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as http:
        reply = await http.post("/v1/chat/completions", json=body)
    text = reply.json()["choices"][0]["message"]["content"]
    assert text == "You said: when are you open. We are open nine to five."


def test_instant_settings_choose_openai_everywhere_with_the_emulator_urls():
    url = "http://127.0.0.1:8100/v1"
    settings = make_settings(
        openai_api_key="test",
        openai_base_url=url,
        openai_stt_base_url=url + "/",
        openai_tts_base_url=url + "/",
    )
    assert settings.openai_stt_base_url == settings.openai_tts_base_url == url
    assert chosen_providers(settings).describe() == "STT=openai LLM=openai TTS=openai"
    services = build_services(settings, shipped_agent("general"))
    for service in (services.stt, services.llm, services.tts):
        assert str(service._client.base_url) == url + "/"
    default = build_services(make_settings(openai_api_key="test"), shipped_agent("general"))
    assert str(default.stt._client.base_url) == "https://api.openai.com/v1/"
    assert str(default.tts._client.base_url) == "https://api.openai.com/v1/"


async def test_pipecat_openai_services_run_against_it(api):
    llm = OpenAILLMService(api_key="test", base_url=api.base_url)
    context = LLMContext(messages=[{"role": "user", "content": QUESTION}])
    metered = PipelineParams(enable_usage_metrics=True)
    down, _ = await run_test(llm, frames_to_send=[LLMContextFrame(context)],
                             pipeline_params=metered)  # fmt: skip
    text = "".join(f.text for f in down if isinstance(f, LLMTextFrame))
    assert text == f"You said: What time do you open. {ANSWER}"
    usage = [d.value for f in down if isinstance(f, MetricsFrame) for d in f.data
             if isinstance(d, LLMUsageMetricsData)]  # fmt: skip
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(5, 25)]

    tts = OpenAITTSService(api_key="test", base_url=api.base_url, sample_rate=SAMPLE_RATE)
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there, caller.")])
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert len(audio) == len(speech_pcm("Hello there, caller."))

    stt = OpenAISTTService(api_key="test", base_url=api.base_url)
    frames = [frame async for frame in stt.run_stt(b"RIFF" + bytes(640))]
    assert [frame.text for frame in frames] == [DEFAULT_TRANSCRIPT]
    assert api.counts == {"llm": 1, "stt": 1, "tts": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_cli_serves_the_api():
    port = _free_port()
    cmd = [sys.executable, "-m", "phonebot.emulator.ai_api", "--port", str(port),
           "--transcript", "Yes please"]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(200):
                try:
                    counts = await http.get("/_emulator/requests")
                    break
                except httpx.ConnectError:
                    assert process.poll() is None, process.stderr.read().decode()
                    await asyncio.sleep(0.05)
            assert counts.json() == {"llm": 0, "stt": 0, "tts": 0}
            heard = await http.post("/v1/audio/transcriptions", files={"file": b"RIFF"})
            assert heard.json() == {"text": "Yes please"}
    finally:
        process.terminate()
        process.wait(timeout=10)


ORDER = {"order_number": "A-1234", "details": {"express": True, "note": "leave at door"}}


async def test_scripted_function_calls_come_as_openai_sends_them(api):
    """PUT /_emulator/replies queues function calls: streamed (name first, then argument
    pieces, finish_reason tool_calls) and plain (message.tool_calls); bad entries refused."""
    ai = client(api)
    async with httpx.AsyncClient(base_url=api.base_url.removesuffix("/v1")) as http:
        queued = await http.put("/_emulator/replies", json={"replies": [
            {"function": "check_order_status", "arguments": ORDER},
            {"function": "lookup_customer", "arguments": {"phone": "+15550001"}},
        ]})  # fmt: skip
        bad = [await http.put("/_emulator/replies", json={"replies": [reply]})
               for reply in ({}, {"text": "x", "function": "f"}, {"function": "no spaces"})]
    assert queued.json()["replies"][0] == {"function": "check_order_status", "arguments": ORDER}
    assert [r.status_code for r in bad] == [422] * 3
    chunks = [c async for c in await ai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Where is my order?"}], stream=True,
        stream_options={"include_usage": True})]  # fmt: skip
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
    calls = [call[0] for call in calls if call]
    assert len(calls) > 2  # the name first, then the arguments in pieces
    assert (calls[0].index, calls[0].id, calls[0].type) == (0, "call_emu1", "function")
    assert calls[0].function.name == "check_order_status" and calls[0].function.arguments == ""
    assert json.loads("".join(c.function.arguments for c in calls)) == ORDER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0

    plain = await ai.chat.completions.create(model="m", messages=[])
    assert plain.choices[0].finish_reason == "tool_calls"
    assert plain.choices[0].message.content is None
    (call,) = plain.choices[0].message.tool_calls
    assert (call.id, call.function.name) == ("call_emu2", "lookup_customer")
    assert json.loads(call.function.arguments) == {"phone": "+15550001"}


async def test_scripted_text_tool_echo_clearing_and_the_chat_log(api):
    """A scripted text is said as is; with the queue empty, a tool result is echoed; DELETE
    empties the queue; GET /_emulator/chat shows the requests' messages and tools."""
    ai = client(api)
    tools = [{"type": "function", "function": {"name": "check_order_status",
                                               "parameters": {"type": "object"}}}]  # fmt: skip
    tool_message = {"role": "tool", "tool_call_id": "call_emu1",
                    "content": '{"status":  "shipped",\n "eta": "Friday"}' + " x" * 150}
    async with httpx.AsyncClient(base_url=api.base_url.removesuffix("/v1")) as http:
        await http.put("/_emulator/replies", json={"replies": [{"text": "All done."}]})
        text = await stream_chat(ai, [])
        echoed = await ai.chat.completions.create(model="m", messages=[tool_message])
        filler = {"role": "assistant", "content": "One moment please."}
        past_filler = await ai.chat.completions.create(model="m", messages=[tool_message, filler])
        asked_again = await ai.chat.completions.create(
            model="m", messages=[tool_message, filler, {"role": "user", "content": "Thanks"}]
        )
        await http.put("/_emulator/replies", json={"replies": [{"text": "never said"}]})
        cleared = await http.delete("/_emulator/replies")
        after_clear = await ai.chat.completions.create(
            model="m", messages=[{"role": "system", "content": "Hi"}], tools=tools
        )
        chats = (await http.get("/_emulator/chat")).json()
    assert "".join(c.choices[0].delta.content or "" for c in text if c.choices) == "All done."
    found = echoed.choices[0].message.content
    assert found.startswith('Here is what I found: {"status": "shipped", "eta": "Friday"} x x')
    assert len(found) == len("Here is what I found: ") + 200 + 1 and found.endswith(".")
    assert past_filler.choices[0].message.content == found  # a spoken filler came after it
    assert asked_again.choices[0].message.content.startswith("You said: Thanks. ")
    assert cleared.json() == {"replies": []}
    assert after_clear.choices[0].message.content == GREETING
    assert len(chats) == 5 and chats[1]["messages"] == [tool_message]
    assert chats[4]["tools"] == tools


async def test_a_faulted_request_leaves_the_scripted_reply_queued(api):
    api.script([ScriptedReply(text="Scripted.")])
    api.inject_fault("llm", "status_500")
    with pytest.raises(openai.InternalServerError):
        await client(api).chat.completions.create(model="m", messages=[])
    reply = await client(api).chat.completions.create(model="m", messages=[])
    assert reply.choices[0].message.content == "Scripted."


async def test_the_chat_log_keeps_the_last_twenty_requests():
    app = create_ai_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as http:
        for n in range(25):
            await http.post("/v1/chat/completions", json={"messages": [], "n": n})
        chats = (await http.get("/_emulator/chat")).json()
    assert [chat["n"] for chat in chats] == list(range(5, 25))


async def test_pipecat_runs_the_function_a_scripted_reply_calls(api):
    """Pipecat 1.14's OpenAILLMService parses the emulator's streamed tool call and runs the
    handler registered under its name, with the arguments."""
    api.script([ScriptedReply(function="check_order_status", arguments={"order_number": "42"})])
    llm = OpenAILLMService(api_key="test", base_url=api.base_url)
    called: list[FunctionCallParams] = []

    async def check_order_status(params: FunctionCallParams) -> None:
        called.append(params)
        await params.result_callback({"status": "shipped"})

    llm.register_function("check_order_status", check_order_status)
    context = LLMContext(messages=[{"role": "user", "content": "Where is order 42?"}])
    down, _ = await run_test(llm, frames_to_send=[LLMContextFrame(context)])
    assert [(p.function_name, dict(p.arguments), p.tool_call_id) for p in called] == [
        ("check_order_status", {"order_number": "42"}, "call_emu1")
    ]
    results = [f for f in down if isinstance(f, FunctionCallResultFrame)]
    assert [r.result for r in results] == [{"status": "shipped"}]
