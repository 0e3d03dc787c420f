"""The agent files' own tools: HTTP endpoints and Python functions the LLM calls on a call.

Two layers:
- in-process: `phonebot.agents.tools` (schemas from type hints and docstrings, argument
  checks, the signed POST, answers shaped for the LLM, failures) against a small HTTP
  endpoint on loopback, and `phonebot.call.agent_tools.AgentTool` (filler, record, result);
- live: `python server.py` in instant-test mode with an AGENTS_DIR holding one agent with
  tools, called through the Twilio emulator, the AI emulator answering with scripted
  function calls (`PUT /_emulator/replies`); what the bot says is read from its log.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import importlib.util
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import pytest
from pipecat.frames.frames import TTSSpeakFrame
from pydantic import Field, SecretStr

from phonebot.agents.loader import AgentFileError, agent_from_spec, load_agents
from phonebot.agents.spec import AgentSpec, ToolSpec
from phonebot.agents.tools import (
    TOOL_RESULT_MAX_BYTES,
    ToolCallContext,
    python_tool_problem,
    request_body,
    run_tool,
    tool_schema,
)
from phonebot.call.agent_tools import FILLER_AFTER_S, AgentTool, register_agent_tools
from phonebot.emulator import Hangup, MediaStreamCaller, Pause, WaitForBot, dial_in
from phonebot.emulator.ai_api import reply_for
from phonebot.signing import SIGNATURE_HEADER, signature_header, verify_signature
from phonebot.twilio.stream import CallSession
from tests.conftest import make_settings
from tests.live_server import ROOT, LiveServer, ai_api_process, free_port, instant_services_env
from tests.test_calls import CALLER, OUR_NUMBER, say

SECRET = "test-tools-secret-0123456789"
CALL = ToolCallContext("CA" + "1" * 32, "orders", "check_order_status", {"caller_id": CALLER})
ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order_number": {"type": "string", "pattern": "^[A-Z]-[0-9]+$"}},
    "required": ["order_number"],
}
SHIPPED = {"status": "shipped", "eta": "Friday"}
PRIVATE_BODY = "PRIVATE-BODY stack trace with the caller's address"


# --- a tool endpoint on loopback ---------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ToolEndpoint:
    """A plain HTTP server: each path answers one way; every request is kept."""

    received: list[Received] = field(default_factory=list)
    slow_s: float = 1.8

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a path."""
        if path == "/slow":
            time.sleep(self.slow_s)
            return 200, "application/json", json.dumps({"status": "delivered"}).encode()
        if path == "/hang":
            time.sleep(3)
        answers = {
            "/order-status": (200, "application/json; charset=utf-8", json.dumps(SHIPPED)),
            "/text": (200, "text/plain; charset=utf-8", "Your order is on its way."),
            "/big": (200, "application/json", json.dumps({"rows": ["x" * 100] * 100})),
            "/bad-json": (200, "application/json", "{not json"),
            "/empty": (200, "application/json", "{}"),
            "/fail": (500, "text/plain", PRIVATE_BODY),
            "/missing": (404, "application/json", '{"error": "no such order"}'),
            "/redirect": (302, "text/plain", ""),
        }
        status, kind, text = answers.get(path, (200, "text/plain", "late"))
        return status, kind, text.encode()

    def __post_init__(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                endpoint.received.append(Received(self.path, dict(self.headers), body))
                if self.path == "/endless":
                    self.stream_forever()
                    return
                status, kind, answer = endpoint.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(answer)))
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                self.wfile.write(answer)

            def stream_forever(self) -> None:
                """A JSON answer that never ends (until the client hangs up, or 10 s)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                deadline = time.monotonic() + 10
                try:
                    self.wfile.write(b'{"rows": [')
                    while time.monotonic() < deadline:
                        self.wfile.write(b'"' + b"x" * 1000 + b'",')
                        self.wfile.flush()
                        time.sleep(0.01)
                except OSError:
                    pass  # the client stopped reading

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ToolEndpoint]:
    serving = ToolEndpoint()
    yield serving
    serving.close()


@pytest.fixture(autouse=True)
def _fresh_requests(request: pytest.FixtureRequest) -> None:
    if "endpoint" in request.fixturenames:
        request.getfixturevalue("endpoint").received.clear()


def http_tool(endpoint: ToolEndpoint, path: str, **fields: Any) -> ToolSpec:
    values = {"name": "check_order_status", "description": "Look up an order.",
              "parameters": ORDER_SCHEMA, "url": f"{endpoint.base_url}{path}"}  # fmt: skip
    return ToolSpec(**(values | fields))


# --- Python tools (referenced as tests.test_agent_tools:<name>) ---------------------------


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"


@dataclass
class Address:
    street: str
    city: str = "Springfield"


def book_delivery(
    day: datetime.date,
    size: Size,
    where: Address,
    slot: Literal["morning", "afternoon"] = "morning",
    parcels: Annotated[int, Field(gt=0)] = 1,
    note: str | None = None,
    call: ToolCallContext | None = None,
) -> dict:
    """Book a delivery slot.

    Args:
        day: The day of the delivery.
        size: How big the parcel is.
        where: Where to deliver.
    """
    return {"day": day, "size": size.value, "city": where.city, "slot": slot,
            "parcels": parcels, "thread": threading.current_thread().name,
            "call_sid": call.call_sid if call else None}  # fmt: skip


async def lookup_customer(phone: str) -> dict:
    """Find a customer by phone number.

    :param phone: The phone number, in E.164 form.
    """
    await asyncio.sleep(0)
    return {"name": "Ada Lovelace", "phone": phone}


def slow_sync(order_number: str) -> str:
    time.sleep(1.0)
    return "too late"


def raises(order_number: str) -> str:
    raise ValueError("PRIVATE-DETAIL the caller's card number")


def returns_nothing(order_number: str) -> None:
    return None


def returns_a_loop(order_number: str) -> dict:
    answer: dict = {}
    answer["self"] = answer
    return answer


def no_hint(order_number, day: int) -> None: ...


def socket_hint(order_number: str, connection: socket.socket) -> None: ...


def star_args(*order_numbers: str) -> None: ...


def python_tool(function: str, **fields: Any) -> ToolSpec:
    return ToolSpec(name=function, description="A Python tool.",
                    python=f"tests.test_agent_tools:{function}", **fields)  # fmt: skip


# --- schemas -------------------------------------------------------------------------------


def test_an_http_tools_schema_is_its_files_parameters(endpoint):
    schema = tool_schema(http_tool(endpoint, "/order-status"))
    assert (schema.name, schema.description) == ("check_order_status", "Look up an order.")
    assert schema.properties == ORDER_SCHEMA["properties"]
    assert schema.required == ["order_number"]


def test_a_python_tools_schema_comes_from_its_type_hints_and_docstring():
    schema = tool_schema(python_tool("book_delivery"))
    assert schema.required == ["day", "size", "where"]
    assert "call" not in schema.properties  # the call's context is not the LLM's to give
    assert schema.properties["day"] == {
        "type": "string", "format": "date", "description": "The day of the delivery."
    }  # fmt: skip
    assert schema.properties["size"]["enum"] == ["small", "large"]
    assert schema.properties["size"]["description"] == "How big the parcel is."
    assert schema.properties["where"] == {  # a dataclass, inlined (no $ref, no titles)
        "type": "object", "description": "Where to deliver.",
        "properties": {"street": {"type": "string"},
                       "city": {"type": "string", "default": "Springfield"}},
        "required": ["street"],
    }  # fmt: skip
    assert schema.properties["slot"] == {"type": "string", "enum": ["morning", "afternoon"],
                                         "default": "morning"}  # fmt: skip
    assert schema.properties["parcels"]["exclusiveMinimum"] == 0
    assert {"type": "null"} in schema.properties["note"]["anyOf"]
    lookup = tool_schema(python_tool("lookup_customer"))  # async, reST docstring
    assert lookup.properties == {
        "phone": {"type": "string", "description": "The phone number, in E.164 form."}
    }
    assert lookup.required == ["phone"]


@pytest.mark.parametrize(
    ("function", "named"),
    [
        ("no_hint", "parameter order_number has no type hint"),
        ("socket_hint", "parameter connection: its type socket has no JSON Schema"),
        ("star_args", "parameter order_numbers: *args can't be given by the LLM"),
    ],
)
def test_a_hint_the_llm_could_not_fill_is_a_load_problem_naming_the_parameter(
    tmp_path, function, named
):
    problem = python_tool_problem(python_tool(function))
    assert problem == f"tests.test_agent_tools:{function}: {named}" or named in problem
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "name: shop\ndefault: true\ninstructions: Help.\ngreeting: Hi.\ntools:\n"
        f"  - name: {function}\n    description: A tool.\n"
        f"    python: tests.test_agent_tools:{function}\n"
    )
    with pytest.raises(AgentFileError) as error:
        load_agents(tmp_path, make_settings())
    (line,) = error.value.problems
    assert line.startswith(f"{agent}:8: tools.0.python: ") and named in line, line


# --- running an HTTP tool ------------------------------------------------------------------


async def test_an_http_tool_is_posted_signed_and_its_json_answer_is_the_result(endpoint, logs):
    outcome = await run_tool(
        http_tool(endpoint, "/order-status"), {"order_number": "A-1234"}, CALL, SECRET
    )
    assert outcome.result == SHIPPED and outcome.error is None
    assert 0 <= outcome.duration_s < 2
    (request,) = endpoint.received
    assert request.path == "/order-status"
    assert json.loads(request.body) == {
        "call_sid": CALL.call_sid, "agent": "orders", "tool": "check_order_status",
        "arguments": {"order_number": "A-1234"}, "parameters": {"caller_id": CALLER},
    }  # fmt: skip
    assert request.headers["Content-Type"] == "application/json"
    header = request.headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, header, request.body)  # the receiver's own check
    assert not verify_signature("another-secret", header, request.body)
    assert not [line for line in logs if "WARNING" in line]


async def test_without_a_secret_the_request_goes_unsigned(endpoint):
    outcome = await run_tool(http_tool(endpoint, "/text"), {"order_number": "A-1"}, CALL, None)
    assert outcome.result == "Your order is on its way."  # text/plain: the text
    assert SIGNATURE_HEADER not in endpoint.received[0].headers


async def test_arguments_that_fail_the_schema_are_never_sent_and_the_llm_is_told_why(
    endpoint, logs
):
    tool = http_tool(endpoint, "/order-status")
    wrong_type = await run_tool(tool, {"order_number": 1234}, CALL, SECRET)
    missing = await run_tool(tool, {"order": "A-1"}, CALL, SECRET)
    bad_pattern = await run_tool(tool, {"order_number": "1234"}, CALL, SECRET)
    assert endpoint.received == []
    assert wrong_type.error == "invalid arguments (order_number)"
    told = wrong_type.result["error"]
    assert told.startswith("check_order_status was not run, its arguments are wrong: ")
    assert "order_number: 1234 is not of type 'string'" in told
    assert "'order_number' is a required property" in missing.result["error"]
    assert "does not match '^[A-Z]-[0-9]+$'" in bad_pattern.result["error"]
    failures = [line for line in logs if "tool check_order_status failed" in line]
    assert len(failures) == 3 and "1234" not in failures[0]  # never the arguments
    assert failures[0].startswith(f"WARNING Call {CALL.call_sid}: tool check_order_status "
                                  "failed: invalid arguments (order_number) after 0.0")  # fmt: skip


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/fail", "HTTP 500"),
        ("/missing", "HTTP 404"),
        ("/redirect", "HTTP 302"),  # never followed: the URL is the agent file's only
        ("/bad-json", "invalid JSON"),
        ("/hang", "timed out after 0.5 s"),
    ],
)
async def test_a_failing_http_tool_is_an_error_result_and_one_log_line(
    endpoint, logs, path, reason
):
    started = time.monotonic()
    outcome = await run_tool(
        http_tool(endpoint, path, timeout_s=0.5), {"order_number": "A-1"}, CALL, SECRET
    )
    assert time.monotonic() - started < 1.5
    assert outcome.error == reason
    assert outcome.result == {
        "error": f"check_order_status failed ({reason}); apologise and carry on"
    }
    (line,) = [line for line in logs if "failed" in line]
    assert line.startswith(
        f"WARNING Call {CALL.call_sid}: tool check_order_status failed: {reason} after "
    ) and line.endswith(" s")  # fmt: skip
    assert PRIVATE_BODY not in "\n".join(logs) and len(endpoint.received) == 1


async def test_an_unreachable_tool_fails_without_waiting(logs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    tool = ToolSpec(name="t", description="d", parameters={"type": "object"},
                    url=f"http://127.0.0.1:{closed_port}/x")  # fmt: skip
    outcome = await run_tool(tool, {}, CALL, SECRET)
    assert outcome.error == "no answer: ConnectError"
    assert outcome.result == {"error": "t failed (no answer: ConnectError); apologise and carry on"}


async def test_a_huge_answer_is_cut_and_an_empty_one_still_says_something(endpoint):
    big = await run_tool(http_tool(endpoint, "/big"), {"order_number": "A-1"}, CALL, SECRET)
    assert isinstance(big.result, str) and big.error is None
    assert big.result.endswith(" [cut: the answer was longer]")
    assert len(big.result.encode()) <= TOOL_RESULT_MAX_BYTES + 40
    started = time.monotonic()
    endless = await run_tool(http_tool(endpoint, "/endless"), {"order_number": "A-1"}, CALL,
                             SECRET)  # fmt: skip
    assert time.monotonic() - started < 1.0  # read up to the cap, the rest never downloaded
    assert endless.error is None and endless.result.startswith('{"rows": ["xxx')
    assert endless.result.endswith(" [cut: the answer was longer]")
    empty = await run_tool(http_tool(endpoint, "/empty"), {"order_number": "A-1"}, CALL, SECRET)
    # Pipecat does not ask the LLM again after an empty result: the caller would hear nothing.
    assert empty.result == {"result": {}}


# --- running a Python tool -----------------------------------------------------------------


async def test_a_sync_python_tool_runs_in_a_thread_with_its_arguments_converted():
    arguments = {"day": "2026-03-01", "size": "large", "where": {"street": "1 Main St"}}
    outcome = await run_tool(python_tool("book_delivery"), arguments, CALL, None)
    assert outcome.error is None
    result = outcome.result
    assert result["thread"] != threading.current_thread().name  # not the event loop's
    assert result["day"] == "2026-03-01"  # a date, given back as JSON can hold it
    assert (result["size"], result["city"], result["slot"]) == ("large", "Springfield",
                                                                "morning")  # fmt: skip
    assert result["call_sid"] == CALL.call_sid  # the ToolCallContext parameter


async def test_an_async_python_tool_is_awaited():
    outcome = await run_tool(python_tool("lookup_customer"), {"phone": CALLER}, CALL, None)
    assert outcome.result == {"name": "Ada Lovelace", "phone": CALLER}


async def test_python_tool_failures_follow_the_same_rules(logs):
    args = {"order_number": "A-1"}
    raised = await run_tool(python_tool("raises"), args, CALL, None)
    late = await run_tool(python_tool("slow_sync", timeout_s=0.3), args, CALL, None)
    wrong = await run_tool(python_tool("book_delivery"),
                           {"day": "someday", "size": "large", "where": {"street": "x"}},
                           CALL, None)  # fmt: skip
    nothing = await run_tool(python_tool("returns_nothing"), args, CALL, None)
    loop = await run_tool(python_tool("returns_a_loop"), args, CALL, None)
    assert raised.result == {"error": "raises failed (ValueError); apologise and carry on"}
    assert late.error == "timed out after 0.3 s" and late.duration_s < 0.8
    assert wrong.error == "invalid arguments (day)"  # pydantic's check, after the schema's
    assert nothing.result == {"result": "done"}
    assert loop.error == "its answer can't be written as JSON"
    shown = [line for line in logs if not line.startswith("DEBUG")]
    assert not any("PRIVATE-DETAIL" in line for line in shown)
    assert sum("failed" in line for line in shown) == 4


# --- on a call: filler, record, result -----------------------------------------------------


class FakeWorker:
    def __init__(self) -> None:
        self.queued: list[tuple[float, Any]] = []

    async def queue_frame(self, frame: Any) -> None:
        self.queued.append((time.monotonic(), frame))


class FakeCallLog:
    def __init__(self) -> None:
        self.entries: list[dict] = []

    def function_call(self, name, arguments, result, *, error=None, duration_s=None) -> None:
        self.entries.append({"name": name, "arguments": dict(arguments), "result": result,
                             "error": error, "duration_s": duration_s})  # fmt: skip


@dataclass
class FakeParams:
    arguments: dict
    results: list = field(default_factory=list)

    async def result_callback(self, result: Any, *, properties: Any = None) -> None:
        self.results.append(result)


FILLER = "One moment while I look that up."


async def test_a_slow_tool_gets_its_filler_said_once_then_its_result(endpoint):
    worker, records = FakeWorker(), FakeCallLog()
    tool = http_tool(endpoint, "/slow", filler=FILLER)
    params = FakeParams({"order_number": "A-1"})
    started = time.monotonic()
    await AgentTool(tool, CALL, worker, records, SecretStr(SECRET)).run(params)
    ((said_at, frame),) = worker.queued
    assert isinstance(frame, TTSSpeakFrame) and frame.text == FILLER
    assert FILLER_AFTER_S <= said_at - started < FILLER_AFTER_S + 0.3
    assert params.results == [{"status": "delivered"}]
    (entry,) = records.entries
    assert entry["name"] == "check_order_status" and entry["error"] is None
    assert entry["arguments"] == {"order_number": "A-1"}
    assert entry["result"] == {"status": "delivered"} and entry["duration_s"] >= 1.7
    assert verify_signature(SECRET, endpoint.received[0].headers[SIGNATURE_HEADER],
                            endpoint.received[0].body)  # fmt: skip


async def test_a_quick_tool_says_no_filler_and_a_failure_is_recorded_as_one(endpoint):
    worker, records = FakeWorker(), FakeCallLog()
    quick = FakeParams({"order_number": "A-1"})
    await AgentTool(http_tool(endpoint, "/order-status", filler=FILLER), CALL, worker,
                    records, None).run(quick)  # fmt: skip
    failing = FakeParams({"order_number": "A-1"})
    await AgentTool(http_tool(endpoint, "/fail", filler=FILLER), CALL, worker,
                    records, None).run(failing)  # fmt: skip
    await asyncio.sleep(FILLER_AFTER_S + 0.2)
    assert worker.queued == []
    assert quick.results == [SHIPPED]
    assert failing.results == [records.entries[1]["result"]]
    assert records.entries[1]["error"] == "HTTP 500"
    assert records.entries[1]["result"]["error"].startswith("check_order_status failed")


def test_each_tool_is_registered_uncancellable_with_the_call_parameters_minus_the_token(
    endpoint, logs
):
    registered: dict[str, dict] = {}

    class FakeLLM:
        def register_function(self, name, handler, **options) -> None:
            registered[name] = {"handler": handler, **options}

    spec = AgentSpec(name="orders", default=True, instructions="Help.", greeting="Hi.",
                     tools=(http_tool(endpoint, "/order-status"),
                            python_tool("lookup_customer")))  # fmt: skip
    agent = agent_from_spec(spec)
    session = CallSession("CA" + "2" * 32, "MZ1", {"caller_id": CALLER, "token": "tok-secret"})
    register_agent_tools(FakeLLM(), agent, session, FakeWorker(), FakeCallLog(), None)
    assert set(registered) == {"check_order_status", "lookup_customer"}
    options = registered["check_order_status"]
    assert options["cancel_on_interruption"] is False  # an "uh-huh" must not cancel it
    runner: AgentTool = options["handler"].__self__
    assert runner.call.parameters == {"caller_id": CALLER}
    assert runner.call.call_sid == session.call_sid and runner.call.agent == "orders"
    (warning,) = [line for line in logs if "TOOLS_WEBHOOK_SECRET" in line]
    assert warning.startswith(f"WARNING Call {session.call_sid}: TOOLS_WEBHOOK_SECRET is not")
    registered.clear()
    only_python = agent_from_spec(spec.model_copy(update={"tools": (python_tool("raises"),)}))
    register_agent_tools(FakeLLM(), only_python, session, FakeWorker(), FakeCallLog(), None)
    assert list(registered) == ["raises"]
    assert len([line for line in logs if "TOOLS_WEBHOOK_SECRET" in line]) == 1  # no HTTP tool


# --- live: a real server, the Twilio emulator, the AI emulator ----------------------------

ORDERS_AGENT = """\
name: orders
default: true
instructions: You help callers with their orders.
greeting: Hi.
tools:
  - name: check_order_status
    description: Look up the delivery status of an order by its number.
    parameters: {{type: object, properties: {{order_number: {{type: string}}}},
                 required: [order_number]}}
    url: {base}/order-status
    timeout_s: 3
  - name: track_parcel
    description: Track a parcel; it takes a while.
    parameters: {{type: object, properties: {{order_number: {{type: string}}}}}}
    url: {base}/slow
    filler: {filler}
  - name: broken_lookup
    description: Always fails.
    parameters: {{type: object, properties: {{}}}}
    url: {base}/fail
  - name: hanging_lookup
    description: Never answers in time.
    parameters: {{type: object, properties: {{}}}}
    url: {base}/hang
    timeout_s: 1
  - name: lookup_customer
    description: Find a customer by phone number.
    python: live_tools:lookup_customer
"""
LIVE_TOOLS = '''\
from phonebot.agents.tools import ToolCallContext


async def lookup_customer(phone: str, call: ToolCallContext) -> dict:
    """Find a customer.

    Args:
        phone: The phone number, in E.164 form.
    """
    return {"name": "Ada Lovelace", "phone": phone, "caller": call.parameters["caller_id"]}
'''
ADMIN_KEY = "test-admin-key-0123456789"
OPENING = f"Hi. I see you're calling from the number ending in {' '.join(CALLER[-4:])}."
QUESTION = "where is my order"


@pytest.fixture(scope="module")
def ai_api() -> Iterator[str]:
    with ai_api_process() as url:
        yield url


@pytest.fixture(scope="module")
def server(ai_api, endpoint, tmp_path_factory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("tools")
    agents = folder / "agents"
    agents.mkdir()
    (agents / "orders.yaml").write_text(ORDERS_AGENT.format(base=endpoint.base_url, filler=FILLER))
    (folder / "live_tools.py").write_text(LIVE_TOOLS)
    env = {
        **instant_services_env(ai_api),
        "AGENTS_DIR": str(agents),
        "PYTHONPATH": str(folder),  # where the agent's Python tool lives
        "TOOLS_WEBHOOK_SECRET": SECRET,
        "ADMIN_API_KEY": ADMIN_KEY,
        "SILENCE_TIMEOUT_S": "30",
    }
    live = LiveServer(env, tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


@pytest.fixture(autouse=True)
def _no_leftover_replies(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "ai_api" in request.fixturenames:
        httpx.delete(f"{request.getfixturevalue('ai_api')}/_emulator/replies", timeout=5)


def script_llm(ai_api: str, *replies: dict) -> None:
    response = httpx.put(f"{ai_api}/_emulator/replies", json={"replies": list(replies)})
    response.raise_for_status()


def chats(ai_api: str) -> list[dict]:
    return httpx.get(f"{ai_api}/_emulator/chat", timeout=5).json()


def tool_messages(ai_api: str) -> list[str]:
    """The tool results the LLM was given in the call's last request (a post-call analysis,
    which carries no tool messages, may come after it)."""
    with_tools = [chat for chat in chats(ai_api) if chat.get("tools")]
    return [m["content"] for m in with_tools[-1]["messages"] if m.get("role") == "tool"]


async def call_with_turns(server: LiveServer, turns: int = 1, last: list | None = None):
    """Greeted, then `turns` questions, each answered; the caller hangs up as soon as the
    last answer starts (unless `last` says otherwise): what the bot says is in its log."""
    caller: MediaStreamCaller = (
        await dial_in(f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER)
    ).caller()
    script = [WaitForBot(timeout=20)]
    for _ in range(turns - 1):
        script += [say(QUESTION), WaitForBot(timeout=20)]
    script += [say(QUESTION), *(last or [WaitForBot(timeout=20, until="speech")])]
    return await caller.run([*script, Hangup()])


async def record_of(server: LiveServer, call_sid: str) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(50):
            response = await client.get(f"{server.base_url}/calls/{call_sid}", headers=headers)
            if response.status_code == 200 and response.json()["ended_at"] is not None:
                return response.json()
            await asyncio.sleep(0.2)
    raise AssertionError(f"no ended record for {call_sid}")


def found(result: Any) -> str:
    """What the AI emulator says after a tool result (its content as Pipecat sends it)."""
    return reply_for([{"role": "tool", "content": json.dumps(result, ensure_ascii=False)}])


async def test_live_an_http_tool_is_called_signed_and_its_answer_spoken(
    server, ai_api, endpoint
):
    order = {"order_number": "A-1234"}
    script_llm(ai_api, {"function": "check_order_status", "arguments": order})
    result = await call_with_turns(server)

    assert server.bot_lines(result.call_sid) == [OPENING, found(SHIPPED)]
    (request,) = endpoint.received
    body = json.loads(request.body)
    assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], request.body)
    assert (body["call_sid"], body["agent"], body["tool"]) == (result.call_sid, "orders",
                                                               "check_order_status")  # fmt: skip
    assert body["arguments"] == order
    assert body["parameters"]["caller_id"] == CALLER and "token" not in body["parameters"]
    first = chats(ai_api)[0]  # the LLM was offered the file's tools, Python's schema read
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert {"check_order_status", "track_parcel", "lookup_customer"} <= set(offered)
    assert offered["lookup_customer"]["parameters"]["properties"] == {
        "phone": {"type": "string", "description": "The phone number, in E.164 form."}
    }

    record = await record_of(server, result.call_sid)
    (entry,) = [e for e in record["transcript"] if e["kind"] == "function"]
    data = entry["data"]
    assert (data["name"], data["arguments"], data["result"]) == ("check_order_status", order,
                                                                 SHIPPED)  # fmt: skip
    assert 0 < data["duration_s"] < 3 and "error" not in data
    kinds = [e["kind"] for e in record["transcript"]]
    assert kinds == ["bot", "caller", "function", "bot"], kinds


async def test_live_arguments_failing_the_schema_send_nothing_and_the_llm_hears_why(
    server, ai_api, endpoint
):
    script_llm(ai_api, {"function": "check_order_status", "arguments": {"order_number": 1234}})
    result = await call_with_turns(server)

    assert endpoint.received == []
    (told,) = tool_messages(ai_api)
    assert "check_order_status was not run" in told and "1234 is not of type" in told
    said = server.bot_lines(result.call_sid)
    assert said[-1].startswith("Here is what I found: {\"error\": \"check_order_status was")


async def test_live_a_slow_tool_says_its_filler_then_the_answer(server, ai_api, endpoint):
    script_llm(ai_api, {"function": "track_parcel", "arguments": {"order_number": "A-1"}})
    # The filler starts; the answer is handed to the TTS once the filler has played.
    result = await call_with_turns(server, last=[WaitForBot(timeout=20, until="speech"),
                                                 Pause(3.5)])  # fmt: skip

    assert server.bot_lines(result.call_sid) == [OPENING, FILLER, found({"status": "delivered"})]
    # The caller's turn ended, a second of silence, then the filler (and the answer right
    # after it: the caller may hear the two as one stretch of speech).
    assert result.bot_utterances[1].latency >= FILLER_AFTER_S


async def test_live_a_failing_tool_is_apologised_for_and_the_call_goes_on(
    server, ai_api, endpoint
):
    apology, again = "Sorry, I can't check that.", "Sorry, not now."
    script_llm(ai_api, {"function": "broken_lookup", "arguments": {}}, {"text": apology},
               {"function": "hanging_lookup", "arguments": {}}, {"text": again})  # fmt: skip
    first_line = len(server.logs)
    result = await call_with_turns(server, turns=2)

    said = server.bot_lines(result.call_sid)
    assert said == [OPENING, apology, again], said  # the call went on to its next turn
    assert result.ended_by == "caller"
    told = [m["content"] for chat in chats(ai_api) for m in chat["messages"]
            if m.get("role") == "tool"]  # fmt: skip
    assert json.dumps(
        {"error": "hanging_lookup failed (timed out after 1 s); apologise and carry on"}
    ) in told and json.dumps(
        {"error": "broken_lookup failed (HTTP 500); apologise and carry on"}
    ) in told  # fmt: skip
    log = server.logs[first_line:]
    failures = [line for line in log if f"Call {result.call_sid}: tool " in line]
    assert len(failures) == 2, failures
    assert "tool broken_lookup failed: HTTP 500 after " in failures[0]
    assert "tool hanging_lookup failed: timed out after 1 s after " in failures[1]
    assert not any(PRIVATE_BODY in line for line in log)
    record = await record_of(server, result.call_sid)
    errors = [e["data"]["error"] for e in record["transcript"] if e["kind"] == "function"]
    assert errors == ["HTTP 500", "timed out after 1 s"]


async def test_live_a_python_tool_answers_with_the_calls_context(server, ai_api):
    script_llm(ai_api, {"function": "lookup_customer", "arguments": {"phone": CALLER}})
    result = await call_with_turns(server)

    customer = {"name": "Ada Lovelace", "phone": CALLER, "caller": CALLER}
    assert server.bot_lines(result.call_sid) == [OPENING, found(customer)]


# --- the example in examples/ ----------------------------------------------------------------

EXAMPLES = ROOT / "examples"


def load_example_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_agent_folder_loads_with_examples_on_the_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    agents = load_agents(EXAMPLES / "agents", make_settings())
    (agent,) = agents.agents
    assert (agent.name, agent.default) == ("orders", True)
    tools = {tool.name: tool for tool in agent.tools}
    assert tools["check_order_status"].filler and tools["check_order_status"].kind == "http"
    lookup = tool_schema(tools["lookup_customer"])
    assert list(lookup.properties) == ["phone"] and lookup.required == []  # not `call`


async def test_the_example_python_tool_finds_the_caller(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    tool = ToolSpec(name="lookup_customer", description="d",
                    python="mycompany.tools:lookup_customer")  # fmt: skip
    call = ToolCallContext("CA1", "orders", "lookup_customer", {"caller_id": "+15550001111"})
    outcome = await run_tool(tool, {}, call, None)
    assert outcome.result["found"] and outcome.result["name"] == "Ada Lovelace"


def test_the_example_service_copies_the_receivers_check_unchanged():
    service = load_example_module("example_tool_service", EXAMPLES / "tool_service.py")
    assert inspect.getsource(service.verify_signature) == inspect.getsource(verify_signature)


@pytest.fixture(scope="module")
def example_service() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "tool_service.py"), "--port", str(port)],
        env={"PATH": os.environ.get("PATH", ""), "TOOLS_WEBHOOK_SECRET": SECRET},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert "Tool service on http://127.0.0.1:" in process.stdout.readline()
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


def test_the_example_service_answers_a_signed_request_and_refuses_a_bad_signature(
    example_service,
):
    url = f"{example_service}/tools/order-status"
    body = request_body(ToolSpec(name="check_order_status", description="d",
                                 parameters=ORDER_SCHEMA, url=url),
                        {"order_number": "A-1001"}, CALL)  # fmt: skip
    now = int(time.time())

    def post(signature: str | None, content: bytes = body) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        return httpx.post(url, content=content, headers=headers, timeout=5)

    signed = post(signature_header(SECRET, body, now))
    assert signed.status_code == 200 and signed.json()["order_number"] == "A1001"
    assert signed.json()["status"] in {"shipped", "out for delivery", "delivered", "being packed"}
    refused = [
        post(None),
        post(signature_header("another-secret", body, now)),
        post(signature_header(SECRET, body, now - 3600)),  # a replayed capture
        post(signature_header(SECRET, body, now), body.replace(b"A-1001", b"A-1002")),
    ]
    assert [r.status_code for r in refused] == [401] * 4
    assert refused[0].json() == {"error": "bad or missing X-Phonebot-Signature"}


def test_the_example_service_will_not_start_without_a_secret():
    process = subprocess.run(
        [sys.executable, str(EXAMPLES / "tool_service.py"), "--port", str(free_port())],
        env={"PATH": os.environ.get("PATH", "")}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert process.returncode == 1 and "Set TOOLS_WEBHOOK_SECRET" in process.stderr


async def test_live_the_example_agent_with_the_example_service(
    ai_api, example_service, tmp_path_factory
):
    """What docs/agents.md has a user run: the example service, the server on
    examples/agents with PYTHONPATH=examples (here the agent file's URL is moved to the
    service's free port), and an LLM that calls both tools."""
    agents = tmp_path_factory.mktemp("example") / "agents"
    shutil.copytree(EXAMPLES / "agents", agents)  # the agent file and its knowledge
    text = (EXAMPLES / "agents" / "orders.yaml").read_text()
    assert "http://127.0.0.1:8300/tools/order-status" in text
    (agents / "orders.yaml").write_text(text.replace("http://127.0.0.1:8300", example_service))
    env = {**instant_services_env(ai_api), "AGENTS_DIR": str(agents),
           "PYTHONPATH": str(EXAMPLES), "TOOLS_WEBHOOK_SECRET": SECRET}  # fmt: skip
    live = LiveServer(env, tmp_path_factory.mktemp("example-server"))
    try:
        # One turn: the LLM looks the caller up, then (told who it is) checks the order.
        script_llm(ai_api, {"function": "lookup_customer", "arguments": {}},
                   {"function": "check_order_status", "arguments": {"order_number": "A-1001"}})
        result = await call_with_turns(live)
        said = live.bot_lines(result.call_sid)
    finally:
        live.stop()
    service = load_example_module("example_tool_service", EXAMPLES / "tool_service.py")
    status = service.order_status("A-1001")
    assert said[1:] == [found(status)]
    customer = {"found": True, "phone": CALLER, "name": "Alan Turing", "tier": "standard",
                "open_orders": []}  # fmt: skip
    assert tool_messages(ai_api) == [json.dumps(customer), json.dumps(status)]
