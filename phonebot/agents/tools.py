"""The user's tools: HTTP endpoints and Python functions an agent file declares.

What the LLM sees (`tool_schema`): the tool's name, its description and the JSON Schema of
its arguments: the file's `parameters`, or for a Python tool without them, a schema read
from the function's type hints (through pydantic, so str, int, float, bool, lists, dicts,
enums, Literal, Annotated constraints, dataclasses, TypedDicts and pydantic models all
work) with each parameter's description from its docstring (Google, NumPy or reST style,
read by docstring_parser). A parameter the LLM could not give (no hint, a hint with no
JSON Schema, *args) is a problem of the agent file when it loads (`python_tool_problem`),
naming the parameter, never a surprise during a call.

Running one (`run_tool`), with the same rules for both kinds:
- The arguments are checked against that schema first. Arguments that don't fit are sent
  nowhere; the LLM is told what was wrong, so it can ask the caller or correct itself.
- HTTP: one POST of `{"call_sid", "agent", "tool", "arguments", "parameters"}` (the call's
  stream parameters, without the stream token) to the file's `url`, and only there: the
  LLM chooses the arguments, never where they go; redirects are not followed. It is
  signed like the events webhook (phonebot.signing) with TOOLS_WEBHOOK_SECRET. With no
  secret set the request goes unsigned, and a call whose agent has HTTP tools says so in
  a warning when it starts (phonebot.call.agent_tools). A 2xx answer with a JSON content
  type is parsed; any other 2xx answer is passed on as text.
- Python (`python: package.module:function`): awaited when async, otherwise run in a
  worker thread so it can't stall the call's audio; a parameter annotated
  `ToolCallContext` receives the call's details (and is not shown to the LLM). The return
  value goes to the LLM as JSON (what JSON can't hold, like dates, as text). The module is
  imported once per process: reloading the agent files does not re-import Python code.
- Both must answer within the tool's `timeout_s`. An answer longer than
  TOOL_RESULT_MAX_BYTES is cut there, so one huge answer can't flood the LLM's context.
- A failure (timeout, no connection, HTTP 4xx/5xx or a redirect, a JSON content type whose
  body isn't JSON, an exception in the function) gives the LLM
  `{"error": "<tool> failed (<reason>); apologise and carry on"}` and logs one warning,
  `Call <CallSid>: tool <tool> failed: <reason> after <seconds> s`: never the arguments,
  the response's body or the exception's message, which may hold the caller's data.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import docstring_parser
import httpx
from jsonschema import Draft202012Validator
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, create_model
from pydantic.errors import PydanticUserError
from pydantic_core import to_jsonable_python

from phonebot import __version__
from phonebot.agents.spec import ToolSpec
from phonebot.signing import SIGNATURE_HEADER, signature_header

# The most of one answer the LLM is given (about a thousand tokens).
TOOL_RESULT_MAX_BYTES = 4096
CUT_NOTE = " [cut: the answer was longer]"
# A bad argument list is told to the LLM in at most this many problems.
MAX_ARGUMENT_PROBLEMS = 3
# `$ref`s followed this deep mean a type that contains itself.
MAX_SCHEMA_DEPTH = 16
# Keys of a JSON Schema whose values are schemas, or lists of schemas (the rest are copied).
SUBSCHEMA_KEYS = ("items", "additionalProperties", "not")
SUBSCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
UNSUPPORTED_KINDS = {
    inspect.Parameter.VAR_POSITIONAL: "*args can't be given by the LLM",
    inspect.Parameter.VAR_KEYWORD: "**kwargs can't be given by the LLM",
    inspect.Parameter.POSITIONAL_ONLY: "positional-only parameters are not supported",
}


@dataclass(frozen=True)
class ToolCallContext:
    """The call a tool runs on: what an HTTP tool's body carries besides the arguments, and
    what a Python tool gets in a parameter annotated with this class."""

    call_sid: str
    agent: str
    tool: str
    # The call's stream parameters (caller_id, called_number, call_type, your own),
    # without the stream token.
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolOutcome:
    """One run of a tool: what the LLM is given, how long it took, and why it failed
    (a short reason such as "HTTP 503"; None when it answered)."""

    result: Any
    duration_s: float
    error: str | None = None


class ToolDefinitionError(ValueError):
    """A Python tool the LLM could not call: its message names the parameter."""


class ToolFailed(Exception):
    """A tool run that gave no usable answer; `reason` is short and safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def for_llm(self, tool: str) -> dict:
        return {"error": f"{tool} failed ({self.reason}); apologise and carry on"}


class BadArguments(ToolFailed):
    """The LLM's arguments don't fit the tool's schema: nothing was sent or run."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(f"invalid arguments ({', '.join(where for where, _ in problems)})")
        self.problems = problems

    def for_llm(self, tool: str) -> dict:
        told = "; ".join(f"{where}: {message}" for where, message in self.problems)
        return {"error": f"{tool} was not run, its arguments are wrong: {told}. Ask the "
                         "caller for what is missing, then call it again."}  # fmt: skip


# --- Python tools -------------------------------------------------------------------------


def load_python_function(target: str) -> Callable:
    """`package.module:function` → the function (ImportError/AttributeError if not there)."""
    module_name, _, attribute = target.partition(":")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise TypeError(f"{target} is not callable")
    return function


@dataclass(frozen=True)
class PythonTool:
    """A Python tool ready to run: the function, the model its arguments are converted
    with (None when the file declares `parameters`), the parameter that takes the
    `ToolCallContext` (if any), and the JSON Schema the LLM sees."""

    function: Callable
    model: type[BaseModel] | None
    context_parameter: str | None
    schema: dict[str, Any]

    @classmethod
    def load(cls, tool: ToolSpec) -> PythonTool:
        function = load_python_function(tool.python or "")
        hints = _type_hints(function)
        context = next((name for name, hint in hints.items() if _is_context(hint)), None)
        if tool.parameters is not None:
            return cls(function, None, context, tool.parameters)
        model = _arguments_model(function, hints, context)
        return cls(function, model, context, _inlined(model.model_json_schema()))

    def keyword_arguments(self, arguments: dict, call: ToolCallContext) -> dict[str, Any]:
        """The function's keyword arguments: the LLM's, converted to the hinted types."""
        kwargs = dict(arguments)
        if self.model is not None:
            try:
                given = self.model.model_validate(arguments)
            except ValidationError as error:
                raise BadArguments(_pydantic_problems(error)) from None
            kwargs = {name: getattr(given, name) for name in type(given).model_fields}
        if self.context_parameter is not None:
            kwargs[self.context_parameter] = call
        return kwargs

    async def run(self, arguments: dict, call: ToolCallContext) -> Any:
        """Await an async function; run any other in a thread (the call's audio goes on)."""
        kwargs = self.keyword_arguments(arguments, call)
        try:
            if inspect.iscoroutinefunction(self.function):
                return await self.function(**kwargs)
            return await asyncio.to_thread(self.function, **kwargs)
        except Exception as error:
            # Only the type: the message may quote the caller or a secret of the user's code.
            raise ToolFailed(type(error).__name__) from error


def load_python_tool(tool: ToolSpec) -> tuple[PythonTool | None, str | None]:
    """The Python tool built once, when its agent file loads (its function imported, its
    schema read), or why it can't be used (its module doesn't import, no such function,
    a parameter the LLM couldn't give)."""
    try:
        return PythonTool.load(tool), None
    except ToolDefinitionError as error:
        return None, f"{tool.python}: {error}"
    except Exception as error:  # noqa: BLE001 - any import failure is the file's problem
        return None, f"cannot load {tool.python}: {type(error).__name__}: {error}"


def python_tool_problem(tool: ToolSpec) -> str | None:
    """Why a Python tool can't be used; None when it can."""
    return load_python_tool(tool)[1]


def _type_hints(function: Callable) -> dict[str, Any]:
    try:
        return get_type_hints(function, include_extras=True)
    except Exception as error:  # noqa: BLE001 - a hint naming something not imported
        raise ToolDefinitionError(f"its type hints can't be read ({error})") from None


def _is_context(hint: Any) -> bool:
    """`ToolCallContext`, or an optional one."""
    return hint is ToolCallContext or ToolCallContext in get_args(hint)


def _arguments_model(
    function: Callable, hints: dict[str, Any], context: str | None
) -> type[BaseModel]:
    """A pydantic model of the parameters the LLM gives, described from the docstring."""
    docstring = docstring_parser.parse(inspect.getdoc(function) or "")
    described = {param.arg_name: param.description for param in docstring.params}
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name == context:
            continue
        _check_parameter(name, parameter, hints)
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[name] = (hints[name], Field(default, description=described.get(name)))
    try:
        return create_model(f"{function.__name__}_arguments", **fields)
    except (PydanticUserError, TypeError, ValueError, NameError) as error:
        raise ToolDefinitionError(f"its parameters can't be described ({error})") from None


def _check_parameter(name: str, parameter: inspect.Parameter, hints: dict[str, Any]) -> None:
    if parameter.kind in UNSUPPORTED_KINDS:
        raise ToolDefinitionError(f"parameter {name}: {UNSUPPORTED_KINDS[parameter.kind]}")
    if name not in hints:
        raise ToolDefinitionError(f"parameter {name} has no type hint (the LLM needs its type)")
    try:
        TypeAdapter(hints[name]).json_schema()
    except (PydanticUserError, TypeError, ValueError) as error:
        shown = getattr(hints[name], "__name__", repr(hints[name]))
        raise ToolDefinitionError(
            f"parameter {name}: its type {shown} has no JSON Schema ({type(error).__name__})"
        ) from None


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON Schema as the LLM's function parameters: `$ref`s replaced by their
    definitions (FunctionSchema keeps no `$defs`), pydantic's titles dropped."""
    return _inline(schema, schema.get("$defs", {}), 0)


def _inline(node: Any, definitions: dict[str, Any], depth: int) -> Any:
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        if depth >= MAX_SCHEMA_DEPTH:
            raise ToolDefinitionError("a parameter's type contains itself; not supported")
        target = definitions.get(node["$ref"].rsplit("/", 1)[-1], {})
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **rest}, definitions, depth + 1)
    inlined: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "properties":
            value = {name: _inline(sub, definitions, depth) for name, sub in value.items()}
        elif key in SUBSCHEMA_KEYS:
            value = _inline(value, definitions, depth)
        elif key in SUBSCHEMA_LIST_KEYS:
            value = [_inline(sub, definitions, depth) for sub in value]
        inlined[key] = value
    return inlined


# --- What the LLM sees --------------------------------------------------------------------


def tool_parameters(tool: ToolSpec, python: PythonTool | None = None) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments: the file's, or read from the function
    (`python`, the tool as its file's loading built it; loaded now when not given)."""
    if tool.parameters is not None:
        return tool.parameters
    return (python or PythonTool.load(tool)).schema


def tool_schema(tool: ToolSpec, python: PythonTool | None = None) -> FunctionSchema:
    """The function the LLM sees for a tool: its name, description and argument schema."""
    parameters = tool_parameters(tool, python)
    return FunctionSchema(
        name=tool.name,
        description=tool.description,
        properties=parameters.get("properties", {}),
        required=list(parameters.get("required", [])),
    )


def argument_problems(schema: dict[str, Any], arguments: Mapping[str, Any]) -> list[tuple]:
    """What is wrong with `arguments` for `schema`, as (where, message) pairs; [] if
    nothing is."""
    errors = Draft202012Validator(schema).iter_errors(dict(arguments))
    ordered = sorted(errors, key=lambda error: [str(part) for part in error.absolute_path])
    problems = [(_where(error.absolute_path), error.message) for error in ordered]
    return problems[:MAX_ARGUMENT_PROBLEMS]


def _where(path: Any) -> str:
    return ".".join(str(part) for part in path) or "arguments"


def _pydantic_problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = [(_where(item["loc"]), item["msg"]) for item in error.errors()]
    return problems[:MAX_ARGUMENT_PROBLEMS]


# --- Running one --------------------------------------------------------------------------


async def run_tool(
    tool: ToolSpec,
    arguments: Mapping[str, Any],
    call: ToolCallContext,
    secret: str | None,
    python: PythonTool | None = None,
) -> ToolOutcome:
    """Check the arguments, run the tool within its timeout, and shape its answer for the
    LLM; a failure is an outcome too (logged once here), never an exception. `python` is
    a Python tool as its file's loading built it (Agent.python_tools)."""
    started = time.monotonic()
    try:
        result = await _checked_run(tool, dict(arguments), call, secret, python)
    except ToolFailed as failure:
        took = time.monotonic() - started
        logger.warning(
            f"Call {call.call_sid}: tool {tool.name} failed: {failure.reason} after {took:.2f} s"
        )
        return ToolOutcome(failure.for_llm(tool.name), round(took, 3), failure.reason)
    return ToolOutcome(result, round(time.monotonic() - started, 3))


async def _checked_run(
    tool: ToolSpec,
    arguments: dict,
    call: ToolCallContext,
    secret: str | None,
    python: PythonTool | None,
) -> Any:
    if tool.kind == "python" and python is None:
        python = _loaded(tool)
    schema = python.schema if python is not None else tool_parameters(tool)
    if problems := argument_problems(schema, arguments):
        raise BadArguments(problems)
    timeout = asyncio.timeout(tool.timeout_s)
    try:
        async with timeout:
            if python is not None:
                answer = await python.run(arguments, call)
            else:
                answer = await post_tool_request(tool, arguments, call, secret)
    except (TimeoutError, httpx.TimeoutException) as error:
        if isinstance(error, TimeoutError) and not timeout.expired():
            raise ToolFailed("TimeoutError") from error  # raised by the function itself
        raise ToolFailed(f"timed out after {tool.timeout_s:g} s") from None
    try:
        return for_llm(answer)
    except (TypeError, ValueError):  # e.g. a value that contains itself
        raise ToolFailed("its answer can't be written as JSON") from None


def _loaded(tool: ToolSpec) -> PythonTool:
    """A Python tool not built with its agent file (a script's or a test's ToolSpec)."""
    try:
        return PythonTool.load(tool)
    except Exception as error:  # noqa: BLE001 - whatever it is, the call goes on
        raise ToolFailed(f"cannot load: {type(error).__name__}") from None


def request_body(tool: ToolSpec, arguments: Mapping[str, Any], call: ToolCallContext) -> bytes:
    """The exact bytes an HTTP tool is sent (and signed)."""
    body = {
        "call_sid": call.call_sid,
        "agent": call.agent,
        "tool": tool.name,
        "arguments": dict(arguments),
        "parameters": dict(call.parameters),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


async def post_tool_request(
    tool: ToolSpec, arguments: Mapping[str, Any], call: ToolCallContext, secret: str | None
) -> Any:
    """POST the call and the arguments to the tool's URL; its answer (JSON or text)."""
    body = request_body(tool, arguments, call)
    headers = {"Content-Type": "application/json", "User-Agent": f"phonebot/{__version__}"}
    if secret:
        headers[SIGNATURE_HEADER] = signature_header(secret, body, int(time.time()))
    try:
        async with (
            httpx.AsyncClient(timeout=tool.timeout_s, follow_redirects=False) as client,
            client.stream("POST", str(tool.url), content=body, headers=headers) as response,
        ):
            if not 200 <= response.status_code < 300:
                raise ToolFailed(f"HTTP {response.status_code}")
            raw = await _read_capped(response)
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as error:
        raise ToolFailed(f"no answer: {type(error).__name__}") from None
    return _decoded(raw, response.headers.get("content-type", ""), response.encoding)


async def _read_capped(response: httpx.Response) -> bytes:
    """The body, or its first TOOL_RESULT_MAX_BYTES + 1 bytes: the rest is never read."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > TOOL_RESULT_MAX_BYTES:
            break
    return b"".join(chunks)


def _decoded(raw: bytes, content_type: str, encoding: str | None) -> Any:
    """JSON for a JSON content type (a body that isn't JSON is a failure), else text; an
    empty body (a 204, or a 200 with nothing) is "no answer", which `for_llm` says as
    {"result": "done"}."""
    if not raw.strip():
        return None
    try:
        text = raw.decode(encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python doesn't know
        text = raw.decode("utf-8", errors="replace")
    if len(raw) > TOOL_RESULT_MAX_BYTES:
        return _cut(text)
    mime = content_type.split(";")[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            raise ToolFailed("invalid JSON") from None
    return text


def for_llm(answer: Any) -> Any:
    """A tool's answer as the LLM's function result: JSON-able, at most
    TOOL_RESULT_MAX_BYTES, and never empty: Pipecat runs the LLM again only after a
    truthy result (LLMAssistantAggregator._handle_function_call_result, pipecat 1.14), so
    an empty one would leave the caller in silence."""
    value = to_jsonable_python(answer, fallback=str)
    if value is None:
        return {"result": "done"}
    if not value:  # False, 0, "", [], {}
        return {"result": value}
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text.encode()) > TOOL_RESULT_MAX_BYTES:
        return _cut(text)
    return value


def _cut(text: str) -> str:
    return text.encode()[:TOOL_RESULT_MAX_BYTES].decode("utf-8", errors="ignore") + CUT_NOTE
