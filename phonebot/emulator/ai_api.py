"""An instant, deterministic OpenAI-compatible AI endpoint: LLM, transcription and speech.

Load benchmarks and provider-failure tests run the bot's REAL Pipecat OpenAI services (and
`openai` client) with only the far side of the network replaced: cheap, instant, repeatable,
and failing on demand. "Instant test services" mode for a server:

    python -m phonebot.emulator.ai_api --port 8100
    OPENAI_API_KEY=test OPENAI_BASE_URL=http://127.0.0.1:8100/v1 \
    OPENAI_STT_BASE_URL=http://127.0.0.1:8100/v1 OPENAI_TTS_BASE_URL=http://127.0.0.1:8100/v1 \
    python server.py

Served routes (OpenAI's wire format, what Pipecat 1.14's OpenAI services send):
- `POST /v1/chat/completions`: "You said: <last user message>. " plus a fixed answer, as SSE
  chunks (with the `include_usage` chunk and `data: [DONE]`) or one JSON body; in JSON
  mode (`response_format` json_object) a JSON object holding it (`json_mode_reply`);
- `POST /v1/audio/transcriptions`: the configured transcript (json, verbose_json or text);
- `POST /v1/audio/speech` (`response_format` pcm): 24 kHz 16-bit mono speech-like
  audio, ~65 ms per input character (at most 8 s), cut from one cached signal (ai_speech).
Control routes (never under /v1): `POST /_emulator/faults` {"service": "llm"|"stt"|"tts",
"kind": "status_500"|"timeout"|"broken_stream", "times": N} fails the next N requests to
that service; `DELETE /_emulator/faults` clears them; `GET /_emulator/requests` counts
requests per service; `PUT /_emulator/transcript` {"text": ...} sets what STT "hears".
An openai client with default options retries 5xx and timeouts twice: a fault meant to
reach the caller of such a client needs `times` = 1 + its retries.

Scripted LLM replies, so a test can drive the bot's function calls end to end:
- `PUT /_emulator/replies` {"replies": [{"text": "..."} | {"function": "name",
  "arguments": {...}}, ...]} appends to a first-in first-out queue; each answered
  `POST /v1/chat/completions` pops one (a request failed by a fault pops none). A function
  reply is sent the way OpenAI sends a tool call: streamed, a first `delta.tool_calls`
  chunk with index/id/type/function.name and empty arguments, then the arguments in
  pieces, then finish_reason "tool_calls" (usage chunk if asked, `[DONE]`); not streamed,
  `message.tool_calls` with finish_reason "tool_calls". Pipecat's OpenAILLMService then
  runs the function registered under that name and asks again with its result.
  `DELETE /_emulator/replies` empties the queue; both answer {"replies": [what is queued]}.
- With the queue empty the answer is the echo above, except after a tool result (the last
  message has role "tool", or only assistant text such as a spoken filler follows it):
  "Here is what I found: <that message's content, whitespace collapsed, first 200
  characters>." so a test can hear the tool's result spoken.
- `GET /_emulator/chat`: the last 20 chat request bodies as received (messages, tools,
  ...), oldest first, so a test can check what the LLM was given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator

from phonebot.emulator.ai_speech import speech_master, speech_pcm
from phonebot.emulator.loopback import LoopbackServer

Service = Literal["llm", "stt", "tts"]
FaultKind = Literal["status_500", "timeout", "broken_stream"]
SERVICES: tuple[Service, ...] = ("llm", "stt", "tts")

DEFAULT_TRANSCRIPT = "I would like to know your opening hours please"
ANSWER = "We are open from nine to five, Monday to Friday. Is there anything else I can help with?"
GREETING = "Hello, thanks for calling. How can I help you today?"
MAX_ECHO_CHARS = 120
MAX_TOOL_ECHO_CHARS = 200
TOOL_ECHO_PREFIX = "Here is what I found: "
CHAT_HISTORY = 20  # chat request bodies kept for GET /_emulator/chat
ARGUMENT_PIECE_CHARS = 16  # streamed tool-call arguments come in pieces, like OpenAI's
SPEECH_CHUNK_BYTES = 9600  # 200 ms per streamed chunk
MAX_HANG_S = 300.0


class _AbruptClose(Exception):
    """Raised mid-stream so uvicorn drops the connection (a `broken_stream` fault)."""


def _hide_abrupt_close(record: logging.LogRecord) -> bool:
    """Injected connection drops are the point, not server errors: keep them out of logs."""
    return not (record.exc_info and isinstance(record.exc_info[1], _AbruptClose))


def _text_of(content: object) -> str:
    """A message's text: a plain string, or the text parts of a multi-part content list."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _tool_result_last(messages: list) -> dict | None:
    """The tool message that ends `messages`, looking past assistant text said since (a
    filler the bot spoke while the tool ran: Pipecat adds it after the tool's result)."""
    for message in reversed(messages):
        if not isinstance(message, dict):
            return None
        if message.get("role") == "assistant" and not message.get("tool_calls"):
            continue
        return message if message.get("role") == "tool" else None
    return None


def reply_for(messages: list, answer: str = ANSWER) -> str:
    """The deterministic answer: echo the last user message, then the fixed `answer`; right
    after a tool result, that result (so a test hears what the tool answered)."""
    if (tool := _tool_result_last(messages)) is not None:
        found = " ".join(_text_of(tool.get("content")).split())[:MAX_TOOL_ECHO_CHARS]
        return f"{TOOL_ECHO_PREFIX}{found}."
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            said = " ".join(_text_of(message.get("content")).split())[:MAX_ECHO_CHARS]
            return f"You said: {said.rstrip('.?! ')}. {answer}"
    return GREETING


def json_mode_reply(messages: list, answer: str = ANSWER) -> str:
    """The deterministic answer in JSON mode (`response_format: {"type": "json_object"}`),
    where OpenAI's model only writes a JSON object
    (https://platform.openai.com/docs/guides/structured-outputs#json-mode): the shape of a
    post-call analysis (phonebot.agents.analysis), the echo as its summary, and no fields,
    so a benchmark's calls end with one analysis request, as with a real model."""
    summary = reply_for(messages, answer)
    success = {"value": True, "reason": "the instant emulator judges every call a success"}
    return json.dumps({"summary": summary, "success": success, "fields": {}})


def _usage(messages: list, reply: str) -> dict:
    """Token counts approximated by words: stable, and non-zero so metrics show up."""
    prompt = sum(len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict))
    completion = len(reply.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _chunk(base: dict, delta: dict | None, finish: str | None = None, **extra) -> str:
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    ]  # fmt: skip
    body = {**base, "choices": choices, **extra}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _head(body: dict, kind: str) -> dict:
    model = str(body.get("model") or "emulator")
    created, now = int(time.time()), time.monotonic_ns()
    return {"id": f"chatcmpl-emu{now}", "object": kind, "created": created, "model": model,
            "system_fingerprint": None}  # fmt: skip


def _stream(body: dict, deltas: list[dict], finish: str, completion: str) -> list[str]:
    """OpenAI's chunk sequence: `deltas`, the finish chunk, optional usage, [DONE]."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = _head(body, "chat.completion.chunk")
    usage = {"usage": None} if include_usage else {}
    events = [_chunk(base, delta, **usage) for delta in deltas]
    events.append(_chunk(base, {}, finish, **usage))
    if include_usage:
        events.append(_chunk(base, None, usage=_usage(body.get("messages", []), completion)))
    return [*events, "data: [DONE]\n\n"]


def sse_events(body: dict, reply: str) -> list[str]:
    """A text answer streamed: role, content pieces, finish, optional usage, [DONE]."""
    words = re.findall(r"\S+\s*", reply)
    pieces = ["".join(words[i : i + 5]) for i in range(0, len(words), 5)]  # a few chunks
    deltas = [{"role": "assistant", "content": ""}, *({"content": p} for p in pieces)]
    return _stream(body, deltas, "stop", reply)


def tool_call_events(body: dict, call: ToolCall) -> list[str]:
    """A function call streamed the way OpenAI does it: the first `delta.tool_calls` chunk
    names the function (index, id, type, empty arguments), the next ones carry the JSON
    arguments in pieces, and finish_reason is "tool_calls"
    (https://platform.openai.com/docs/guides/function-calling#streaming)."""
    named = {"index": 0, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": ""}}  # fmt: skip
    text, step = call.arguments, ARGUMENT_PIECE_CHARS
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    deltas = [{"role": "assistant", "content": None, "tool_calls": [named]}]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    return _stream(body, deltas, "tool_calls", text)


def _completion(body: dict, reply: str | ToolCall) -> dict:
    """One JSON body: the answer's text, or its function call in `message.tool_calls`."""
    message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
    finish, completion = "stop", reply
    if isinstance(reply, ToolCall):
        function = {"name": reply.name, "arguments": reply.arguments}
        message["content"], finish, completion = None, "tool_calls", reply.arguments
        message["tool_calls"] = [{"id": reply.id, "type": "function", "function": function}]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    usage = _usage(body.get("messages", []), completion)
    return {**_head(body, "chat.completion"), "choices": [choice], "usage": usage}


class ScriptedReply(BaseModel):
    """One queued LLM answer: a text, or a call of `function` with `arguments`."""

    text: str | None = Field(default=None, max_length=10_000)
    function: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _text_or_function(self) -> ScriptedReply:
        if (self.text is None) == (self.function is None):
            raise ValueError("give either text or function")
        return self

    def shown(self) -> dict:
        """As the control API shows it (what was PUT)."""
        if self.function is None:
            return {"text": self.text}
        return {"function": self.function, "arguments": self.arguments}


@dataclass(frozen=True)
class ToolCall:
    """A function call the LLM answers with: OpenAI's id, the name, the JSON arguments."""

    id: str
    name: str
    arguments: str


@dataclass
class AIApiControls:
    """One app's state: pending faults, request counts, the transcript; `base_url` once served."""

    transcript: str = DEFAULT_TRANSCRIPT
    fixed_answer: str = ANSWER  # said after the echo (--answer: a load test's shorter reply)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0))
    faults: dict[str, list[list]] = field(default_factory=lambda: {s: [] for s in SERVICES})
    closing: bool = False
    hanging: int = 0  # `timeout` requests still held open
    base_url: str | None = None
    replies: deque[ScriptedReply] = field(default_factory=deque)
    chats: deque[dict] = field(default_factory=lambda: deque(maxlen=CHAT_HISTORY))
    tool_calls: int = 0  # numbers the tool-call ids

    def script(self, replies: list[ScriptedReply]) -> None:
        """Queue `replies` after those already waiting; each chat completion takes one."""
        self.replies.extend(replies)

    def scripted(self) -> list[dict]:
        return [reply.shown() for reply in self.replies]

    def answer(self, messages: list, *, json_mode: bool = False) -> str | ToolCall:
        """The next scripted reply if one waits, else the deterministic one (in JSON mode,
        `json_mode_reply`)."""
        if not self.replies:
            if json_mode:
                return json_mode_reply(messages, self.fixed_answer)
            return reply_for(messages, self.fixed_answer)
        reply = self.replies.popleft()
        if reply.function is None:
            return str(reply.text)
        self.tool_calls += 1
        arguments = json.dumps(reply.arguments, separators=(",", ":"))
        return ToolCall(f"call_emu{self.tool_calls}", reply.function, arguments)

    def inject_fault(self, service: Service, kind: FaultKind, times: int = 1) -> None:
        """Fail the next `times` requests to `service` with `kind` (queued after others)."""
        self.faults[service].append([kind, times])

    def clear_faults(self) -> None:
        for pending in self.faults.values():
            pending.clear()

    def pending(self) -> dict[str, list[dict]]:
        """The queued faults, as the control API shows them."""
        return {s: [{"kind": k, "remaining": n} for k, n in q] for s, q in self.faults.items()}

    def take(self, service: Service) -> FaultKind | None:
        """Count one request to `service` and return the fault it must suffer, if any."""
        self.counts[service] += 1
        pending = self.faults[service]
        if not pending:
            return None
        kind, pending[0][1] = pending[0][0], pending[0][1] - 1
        if pending[0][1] <= 0:
            pending.pop(0)
        return kind


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": None}
    return JSONResponse({"error": error}, status_code=status)


async def _hang(request: Request, controls: AIApiControls) -> Response:
    """A `timeout` fault: answer nothing until the client gives up (or the app stops)."""
    deadline, controls.hanging = time.monotonic() + MAX_HANG_S, controls.hanging + 1
    while time.monotonic() < deadline and not (controls.closing or await request.is_disconnected()):
        await asyncio.sleep(0.25)
    controls.hanging -= 1
    return _error(504, "emulated timeout")


async def _send(parts: list, broken: bool = False) -> AsyncIterator:
    """Stream `parts`; a broken stream then drops the connection mid-body."""
    for part in parts:
        yield part
    if broken:
        raise _AbruptClose("emulated broken stream")


def _json_object(body: bytes) -> dict:
    """The request's JSON object, or {} (then the missing field is what gets reported)."""
    with contextlib.suppress(ValueError):
        if isinstance(payload := json.loads(body), dict):
            return payload
    return {}


async def _fault_response(service: Service, kind: FaultKind, request: Request) -> Response:
    controls: AIApiControls = request.app.state.controls
    if kind == "status_500":
        return _error(500, f"emulated {service} server error")
    if kind == "timeout":
        return await _hang(request, controls)
    if service == "stt":
        return Response('{"text": "I would li', media_type="application/json")
    if service == "llm":
        garbage = 'data: {"id": "chatcmpl-broken", "choices": [{\n\n'
        events = [*sse_events({"model": "emulator"}, GREETING)[:2], garbage]
        return StreamingResponse(_send(events, broken=True), media_type="text/event-stream")
    return StreamingResponse(_send([speech_pcm("broken")[:960]], broken=True))


async def chat_completions(request: Request) -> Response:
    body = await request.body()
    if kind := request.app.state.controls.take("llm"):
        return await _fault_response("llm", kind, request)
    payload = _json_object(body)
    if not isinstance(payload.get("messages"), list):
        return _error(400, "messages: expected a list of messages", "messages")
    controls: AIApiControls = request.app.state.controls
    controls.chats.append(payload)
    response_format = payload.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") == "json_object"
    reply = controls.answer(payload["messages"], json_mode=json_mode)
    if not payload.get("stream"):
        return JSONResponse(_completion(payload, reply))
    if isinstance(reply, ToolCall):
        events = tool_call_events(payload, reply)
    else:
        events = sse_events(payload, reply)
    return StreamingResponse(_send(events), media_type="text/event-stream")


async def transcriptions(request: Request) -> Response:
    form = await request.form()
    controls: AIApiControls = request.app.state.controls
    if kind := controls.take("stt"):
        return await _fault_response("stt", kind, request)
    if not hasattr(form.get("file"), "read"):
        return _error(400, "file: an audio file is required", "file")
    text, fmt = controls.transcript, form.get("response_format") or "json"
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt not in ("json", "verbose_json"):
        return _error(400, "response_format: use json, verbose_json or text", "response_format")
    extra = {"logprobs": []} if "logprobs" in form.getlist("include[]") else {}
    if fmt == "verbose_json":  # Pipecat asks for it from whisper models with logprobs
        extra = {"task": "transcribe", "language": "english", "duration": 1.0, "segments": []}
    return JSONResponse({"text": text, **extra})


async def speech(request: Request) -> Response:
    body = await request.body()
    if kind := request.app.state.controls.take("tts"):
        return await _fault_response("tts", kind, request)
    payload = _json_object(body)
    text = payload.get("input")
    if not isinstance(text, str) or not text.strip():
        return _error(400, "input: non-empty text is required", "input")
    if payload.get("response_format", "pcm") != "pcm":
        return _error(400, "response_format: the emulator speaks pcm only", "response_format")
    pcm = speech_pcm(text)
    parts = [pcm[i : i + SPEECH_CHUNK_BYTES] for i in range(0, len(pcm), SPEECH_CHUNK_BYTES)]
    return StreamingResponse(_send(parts), media_type="audio/pcm")


class FaultRequest(BaseModel):
    service: Service
    kind: FaultKind
    times: int = Field(default=1, ge=1, le=1_000_000)


class TranscriptRequest(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class RepliesRequest(BaseModel):
    replies: list[ScriptedReply] = Field(max_length=1000)


def create_ai_app(transcript: str = DEFAULT_TRANSCRIPT, answer: str = ANSWER) -> FastAPI:
    """A fresh emulator app; its state (`app.state.controls`) belongs to it alone."""
    logging.getLogger("uvicorn.error").addFilter(_hide_abrupt_close)
    speech_master()  # build the audio now, not inside the first request
    app = FastAPI(title="phonebot AI API emulator", docs_url=None, redoc_url=None)
    controls = app.state.controls = AIApiControls(transcript=transcript, fixed_answer=answer)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/audio/transcriptions", transcriptions, methods=["POST"])
    app.add_api_route("/v1/audio/speech", speech, methods=["POST"])

    @app.post("/_emulator/faults", status_code=201)
    async def add_fault(fault: FaultRequest) -> dict:
        controls.inject_fault(fault.service, fault.kind, fault.times)
        return controls.pending()

    @app.delete("/_emulator/faults")
    async def clear_faults() -> dict:
        controls.clear_faults()
        return controls.pending()

    @app.get("/_emulator/requests")
    async def request_counts() -> dict:
        return controls.counts

    @app.put("/_emulator/transcript")
    async def set_transcript(body: TranscriptRequest) -> dict:
        controls.transcript = body.text
        return {"text": controls.transcript}

    @app.put("/_emulator/replies")
    async def add_replies(body: RepliesRequest) -> dict:
        controls.script(body.replies)
        return {"replies": controls.scripted()}

    @app.delete("/_emulator/replies")
    async def clear_replies() -> dict:
        controls.replies.clear()
        return {"replies": []}

    @app.get("/_emulator/chat")
    async def recent_chats() -> list[dict]:
        return list(controls.chats)

    return app


@contextlib.asynccontextmanager
async def running_ai_api(transcript: str = DEFAULT_TRANSCRIPT) -> AsyncIterator[AIApiControls]:
    """Serve a fresh app on a free loopback port in this loop; yields its controls."""
    app = create_ai_app(transcript)
    controls: AIApiControls = app.state.controls
    server = LoopbackServer(app)
    await server.start()
    controls.base_url = f"{server.base_url}/v1"
    try:
        yield controls
    finally:
        controls.closing = True  # release hung `timeout` requests so uvicorn can stop
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--transcript", default=DEFAULT_TRANSCRIPT)
    parser.add_argument("--answer", default=ANSWER, help="what every reply says after the echo")
    args = parser.parse_args(argv)
    uvicorn.run(create_ai_app(args.transcript, args.answer), host=args.host, port=args.port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=1)  # fmt: skip


if __name__ == "__main__":
    main()
