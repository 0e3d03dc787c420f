"""A Twilio-compatible REST endpoint for calls, served on loopback.

Point the server's Twilio client at `emulator.base_url` (`TWILIO_API_BASE_URL`) and its
`calls.create` / `calls(sid).update` land here instead of at Twilio:

- `POST /2010-04-01/Accounts/{AccountSid}/Calls.json` creates a call (201, Call JSON), then
  "answers" it in the background: the inline `Twiml`, or the TwiML fetched from `Url` with
  a signed form, gives the `<Connect><Stream>`; a `MediaStreamCaller` for it is handed to
  `on_answer(call, caller)`, which decides what the callee says.
- `POST …/Calls/{CallSid}.json` updates it: `Status=completed` stops the media stream the
  way Twilio does (`stop`, then close); new `Twiml`/`Url` (e.g. a `<Dial>` transfer) ends
  the stream and is recorded. A `<Dial><Conference>` puts the call in that room
  (`conferences`, phonebot.emulator.conference) where it stays, live, until the room drops
  it, it is redirected again or it is completed: a warm transfer.
- `GET …/Calls/{CallSid}.json` fetches it.

The called numbers behave as `outcomes` says: `{"+15551234567": "busy"}` makes that
number busy (or "no-answer", "failed"); other numbers answer. With `callees` (a
`CalleeBook`, phonebot.emulator.callees) a number is a scripted person instead: it answers
and talks, is busy, does not answer, has voicemail (its own AMD verdict) or asks to be
taken off the list, by rule or per number. With `StatusCallback`, the
call's progress is POSTed (signed) as Twilio does: initiated, ringing, answered, and
completed with the final CallStatus and CallDuration.

Basic auth is checked like Twilio's (401, code 20003); every request is recorded in
`requests`; `inject_fault` makes the next N requests fail (any status, with `Retry-After`),
stall (and then fail, or go through as Twilio does when it is slow), or drop the connection
without an answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from phonebot.emulator.callees import Callee, CalleeBook
from phonebot.emulator.calls import API_VERSION, EmulatedCall, twilio_error, utcnow
from phonebot.emulator.conference import ConferenceRoom
from phonebot.emulator.errors import (
    EmulatorError,
    NoStreamError,
    StreamConnectError,
    TwiMLError,
)
from phonebot.emulator.ids import new_account_sid, new_call_sid
from phonebot.emulator.loopback import LoopbackServer
from phonebot.emulator.media_stream import MediaStreamCaller
from phonebot.emulator.script import Pause
from phonebot.emulator.signature import SharedKey
from phonebot.emulator.twiml import ConferenceTarget, TwiML, parse_twiml, stream_url_refusal
from phonebot.emulator.webhook import (
    local_stream_url,
    post_webhook,
    send_signed_form,
    voice_webhook_form,
)

AnswerHandler = Callable[[EmulatedCall, MediaStreamCaller], Awaitable[Any]]
PHONE_NUMBER = re.compile(r"^\+[1-9]\d{6,14}$")
CALLS = "/2010-04-01/Accounts/{account_sid}/Calls.json"
CALL = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
# Where the outermost ASGI wrapper leaves a way to drop the request's connection.
ABORT_SCOPE_KEY = "phonebot.emulator.abort"
DEFAULT_CALL_LIMIT_S = 120.0
# What a called number does instead of answering; the value is the call's final CallStatus
# (https://www.twilio.com/docs/voice/api/call-resource#call-status-values).
UNANSWERED_OUTCOMES = frozenset({"busy", "no-answer", "failed"})
ANSWER = "answer"
# How long Twilio lets a call ring before giving up as no-answer, without `Timeout`.
DEFAULT_RING_TIMEOUT_S = 60.0


@dataclass
class RecordedRequest:
    """One request as received: `form` keeps the last value per field, `form_lists` all."""

    method: str
    path: str
    form: dict[str, str]
    form_lists: dict[str, list[str]]
    query: dict[str, str]
    authorized: bool
    status: int = 0


@dataclass
class Fault:
    """A scripted failure: wait `delay`, then drop the connection (`reset`) or answer `status`
    (Twilio error `code`, with `Retry-After` when `retry_after` is set)."""

    status: int | None
    code: int | None = None
    message: str | None = None
    delay: float = 0.0
    remaining: int = 1
    on: str = "any"  # "create", "update", "fetch" or "any"
    reset: bool = False
    retry_after: float | None = None


@dataclass
class StatusCallback:
    """A status/AMD callback the emulator POSTed, and what came back."""

    url: str
    form: dict[str, str]
    status: int | None = None
    error: str | None = None


def _valid_address(value: str) -> bool:
    """E.164 numbers, plus `client:` and `sip:` addresses that Twilio also dials."""
    return bool(PHONE_NUMBER.match(value)) or value.startswith(("client:", "sip:"))


def _call_form(
    call: EmulatedCall, call_status: str, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """The form Twilio posts about `call` to any of its webhooks."""
    return voice_webhook_form(
        call_sid=call.sid,
        account_sid=call.account_sid,
        from_=call.from_,
        to=call.to,
        direction=call.direction,
        call_status=call_status,
        extra=extra,
    )


def _redirect_reason(twiml: TwiML) -> str:
    """Why a redirect ended the stream, as the caller's hang-up event says it."""
    if twiml.conference is not None:
        return f"call redirected to <Dial><Conference> {twiml.conference.name}"
    if twiml.dials:
        return f"call redirected to <Dial> {', '.join(twiml.dials)}"
    return "call redirected"


def _rebase(url: str, base: str | None) -> str:
    """Same path and query on `base`'s scheme and host (reach the server on loopback)."""
    if not base:
        return url
    target = urlsplit(base)
    return urlunsplit(urlsplit(url)._replace(scheme=target.scheme, netloc=target.netloc))


class TwilioRestEmulator:
    """The REST side of Twilio for calls; see the module docstring.

    `auth_token=None` accepts any Basic credentials (handy when the server's token is
    unknown); `local_server_url` (e.g. `http://127.0.0.1:8000`) is where webhook URLs and
    `wss://` stream URLs naming a public host are really sent (unless
    `rewrite_stream_urls=False`); `caller_options` go to every `MediaStreamCaller` the
    emulator creates. A call created with `MachineDetection` is answered by
    `answered_by`; with `AsyncAmd=true` that verdict is POSTed (signed) to
    `AsyncAmdStatusCallback` `amd_delay` seconds after the TwiML is fetched (as the stream
    starts), standing in for the time Twilio takes to hear a greeting out to its beep.
    `shared_key` signs webhooks as a Webhooks signing rule would (HMAC-SHA256), and
    `webhook_attempts` > 1 retries a webhook that got no answer or a 5xx, as Twilio.
    `outcomes` maps called numbers to "busy", "no-answer" or "failed" (see
    `set_outcome`); a no-answer rings `no_answer_after` seconds (default: the call's
    `Timeout`, else Twilio's 60 s). `callees` scripts the people behind the numbers
    (outcome, AMD verdict and what they say); `outcomes`, `answered_by` given
    explicitly and `on_answer` take precedence over it. `conferences` holds the rooms
    calls were put in, by name (the latest conference of each name).
    """

    def __init__(
        self,
        *,
        account_sid: str | None = None,
        auth_token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_answer: AnswerHandler | None = None,
        local_server_url: str | None = None,
        answer_delay: float = 0.0,
        answered_by: str = "human",
        amd_delay: float = 0.0,
        webhook_timeout: float = 10.0,
        caller_options: Mapping[str, Any] | None = None,
        rewrite_stream_urls: bool = True,
        shared_key: SharedKey | None = None,
        webhook_attempts: int = 1,
        outcomes: Mapping[str, str] | None = None,
        no_answer_after: float | None = None,
        callees: CalleeBook | None = None,
    ) -> None:
        self.account_sid = account_sid or new_account_sid()
        self.shared_key = shared_key
        self.webhook_attempts = webhook_attempts
        self.auth_token = auth_token
        self.on_answer = on_answer
        self.local_server_url = local_server_url
        self.answer_delay = answer_delay
        self.answered_by = answered_by
        self.amd_delay = amd_delay
        self.webhook_timeout = webhook_timeout
        self.caller_options = dict(caller_options or {})
        self.rewrite_stream_urls = rewrite_stream_urls
        self.outcomes: dict[str, str] = {}
        for number, outcome in (outcomes or {}).items():
            self.set_outcome(number, outcome)
        self.no_answer_after = no_answer_after
        self.callees = callees
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, EmulatedCall] = {}
        self.conferences: dict[str, ConferenceRoom] = {}
        self.status_callbacks: list[StatusCallback] = []
        self.faults: list[Fault] = []
        self._created: asyncio.Queue[EmulatedCall] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self.app = Starlette(routes=self._routes())
        self._server = LoopbackServer(self._asgi, host, port, interface="asgi3")

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        """Where to point the Twilio client (`client.api.base_url`), e.g. http://127.0.0.1:8099."""
        return self._server.base_url

    async def start(self) -> TwilioRestEmulator:
        await self._server.start()
        return self

    async def stop(self) -> None:
        """Hang up live streams, finish background work, stop serving.

        A call held in a conference is left as it is (in-progress, in its room) for a test
        to look at; it gets no `completed` callback.
        """
        self._stopping.set()
        for call in self.calls.values():
            if call.caller is not None:
                call.caller.request_hangup("emulator stopping", "rest")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        for task in set(self._tasks):
            task.cancel()
        await self._server.stop()

    async def __aenter__(self) -> TwilioRestEmulator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --------------------------------------------------------------- test hooks

    def inject_fault(
        self,
        status: int | None = 500,
        *,
        code: int | None = None,
        message: str | None = None,
        count: int = 1,
        delay: float = 0.0,
        on: str = "any",
        reset: bool = False,
        retry_after: float | None = None,
    ) -> Fault:
        """Make the next `count` matching requests wait `delay` s, then fail with `status`.

        `status=None` only delays: the request then goes through, as when Twilio is slow but
        acts (a client that gave up never learns it did). `reset=True` closes the
        connection without an answer, after the request was read. Examples:
        `inject_fault(400, code=21211, on="create")`, `inject_fault(503, count=2)`,
        `inject_fault(429, retry_after=1)`, `inject_fault(None, delay=5)`,
        `inject_fault(reset=True, on="update")`.
        """
        fault = Fault(status, code, message, delay, count, on, reset, retry_after)
        self.faults.append(fault)
        return fault

    def set_outcome(self, number: str, outcome: str) -> None:
        """What `number` does when called: "answer" (the default), "busy", "no-answer"
        (rings until the call's timeout) or "failed" (e.g. unreachable)."""
        if outcome != ANSWER and outcome not in UNANSWERED_OUTCOMES:
            choices = ", ".join(sorted(UNANSWERED_OUTCOMES | {ANSWER}))
            raise ValueError(f"outcome must be one of {choices}, not {outcome!r}")
        if outcome == ANSWER:
            self.outcomes.pop(number, None)
        else:
            self.outcomes[number] = outcome

    def register_call(
        self,
        call_sid: str,
        *,
        to: str,
        from_: str,
        caller: MediaStreamCaller | None = None,
        direction: str = "inbound",
    ) -> EmulatedCall:
        """Make a dial-in call known, so the server can update it (e.g. hang it up)."""
        call = EmulatedCall(call_sid, self.account_sid, to, from_, direction, caller=caller)
        if caller is not None:
            call.streams.append(caller)
        call.set_status("in-progress")
        call.answered.set()
        self.calls[call_sid] = call
        return call

    def hang_up(self, call_sid: str, reason: str = "the caller hung up") -> None:
        """The person on `call_sid` hangs up (a call on hold in a conference has no script
        to do it): the call completes and leaves its room, as a hang-up does at Twilio."""
        self._end_call(self.calls[call_sid], "completed", reason, by="caller")

    async def wait_for_call(self, timeout: float = 10.0) -> EmulatedCall:
        """The next call created through the REST API (in creation order)."""
        try:
            return await asyncio.wait_for(self._created.get(), timeout)
        except TimeoutError:
            raise EmulatorError(
                f"no calls.create arrived at {self.base_url} within {timeout:g} s"
            ) from None

    def client(self, *, async_http: bool = False) -> Any:
        """A `twilio.rest.Client` whose API requests go to this emulator."""
        from twilio.http.async_http_client import AsyncTwilioHttpClient
        from twilio.rest import Client

        http_client = AsyncTwilioHttpClient() if async_http else None
        client = Client(
            self.account_sid, self.auth_token or "emulator-token", http_client=http_client
        )
        client.api.base_url = self.base_url
        return client

    # ------------------------------------------------------------------ routing

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The app as served: routes get a way to drop their connection (a `reset` fault).

        ASGI has no "close without answering", so the transport is taken from uvicorn's
        `send` (a bound method of its request cycle).
        """
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is not None:
            scope[ABORT_SCOPE_KEY] = transport.abort
        await self.app(scope, receive, send)

    def _routes(self) -> list[Route]:
        return [
            Route(CALLS, self._create, methods=["POST"]),
            Route(CALLS, self._list, methods=["GET"]),
            Route(CALL, self._update, methods=["POST"]),
            Route(CALL, self._fetch, methods=["GET"]),
            Route("/{path:path}", self._not_found, methods=["GET", "POST", "DELETE"]),
        ]

    async def _record(self, request: Request) -> RecordedRequest:
        form = await request.form() if request.method == "POST" else None
        lists = {key: [str(v) for v in form.getlist(key)] for key in form} if form else {}
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            form={key: values[-1] for key, values in lists.items()},
            form_lists=lists,
            query=dict(request.query_params),
            authorized=self._authorized(request),
        )
        self.requests.append(record)
        return record

    def _authorized(self, request: Request) -> bool:
        """Basic auth as AccountSid:AuthToken; the path's AccountSid must be the same."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        path_account = request.path_params.get("account_sid", user)
        if user != path_account:
            return False
        if self.auth_token is None:
            return True
        return hmac.compare_digest(
            user.encode(), self.account_sid.encode()
        ) and hmac.compare_digest(password.encode(), self.auth_token.encode())

    def _respond(
        self,
        record: RecordedRequest,
        body: dict[str, Any],
        status: int,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        record.status = status
        headers = dict(headers or {})
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return JSONResponse(body, status_code=status, headers=headers)

    def _error(self, record: RecordedRequest, code: int, message: str, status: int) -> JSONResponse:
        return self._respond(record, twilio_error(code, message, status), status)

    async def _guard(
        self, request: Request, kind: str
    ) -> tuple[RecordedRequest, JSONResponse | None]:
        """Record, authenticate, apply faults; a response here short-circuits the route."""
        record = await self._record(request)
        if not record.authorized:
            return record, self._error(record, 20003, "Authenticate", 401)
        fault = self._take_fault(kind)
        if fault is None:
            return record, None
        await asyncio.sleep(fault.delay)
        if fault.reset:
            return record, await self._drop_connection(request)
        if fault.status is None:
            return record, None
        code = fault.code or fault.status
        message = fault.message or f"Injected fault (HTTP {fault.status})"
        body = twilio_error(code, message, fault.status)
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        return record, self._respond(record, body, fault.status, headers)

    @staticmethod
    async def _drop_connection(request: Request) -> JSONResponse:
        """Abort the TCP connection; the response returned after it is never sent.

        `status` stays 0 in the record: nothing was answered.
        """
        abort = request.scope.get(ABORT_SCOPE_KEY)
        if abort is None:
            raise EmulatorError("a reset fault needs the emulator served by uvicorn")
        abort()
        await asyncio.sleep(0)  # let the server see the connection lost, so it stays quiet
        return JSONResponse({}, status_code=599)

    def _take_fault(self, kind: str) -> Fault | None:
        for fault in self.faults:
            if fault.remaining > 0 and fault.on in (kind, "any"):
                fault.remaining -= 1
                return fault
        return None

    def _not_found_error(self, record: RecordedRequest) -> JSONResponse:
        message = f"The requested resource {record.path} was not found"
        return self._error(record, 20404, message, 404)

    async def _not_found(self, request: Request) -> JSONResponse:
        return self._not_found_error(await self._record(request))

    # ------------------------------------------------------------------- routes

    async def _create(self, request: Request) -> JSONResponse:
        record, early = await self._guard(request, "create")
        if early is not None:
            return early
        form = record.form
        problem = self._create_problem(form)
        if problem is not None:
            return self._error(record, *problem, 400)
        call = EmulatedCall(new_call_sid(), self.account_sid, form["To"], form["From"], form=form)
        self.calls[call.sid] = call
        self._created.put_nowait(call)
        self._spawn(self._answer(call, record.form_lists))
        return self._respond(record, call.to_json(), 201)

    @staticmethod
    def _create_problem(form: Mapping[str, str]) -> tuple[int, str] | None:
        """Twilio's 400 for a create it would refuse, as (code, message); None if fine."""
        if not form.get("To"):
            return 21201, "No 'To' number is specified"
        if not _valid_address(form["To"]):
            return 21211, f"Invalid 'To' Phone Number: {form['To']}"
        if not form.get("From"):
            return 21213, "No 'From' number is specified"
        if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
            return 21205, "Url parameter is required."
        return None

    async def _list(self, request: Request) -> JSONResponse:
        record, early = await self._guard(request, "fetch")
        if early is not None:
            return early
        calls = [call.to_json() for call in self.calls.values()]
        body = {
            "calls": calls,
            "end": max(0, len(calls) - 1),
            "page": 0,
            "page_size": 50,
            "start": 0,
            "uri": record.path,
            "first_page_uri": record.path,
            "next_page_uri": None,
            "previous_page_uri": None,
        }
        return self._respond(record, body, 200)

    async def _call_request(
        self, request: Request, kind: str
    ) -> tuple[RecordedRequest, EmulatedCall | None, JSONResponse | None]:
        """Guard a request on one call; an early answer (fault, auth, 404) when it fails."""
        record, early = await self._guard(request, kind)
        if early is not None:
            return record, None, early
        call = self.calls.get(request.path_params["call_sid"])
        if call is None:
            return record, None, self._not_found_error(record)
        return record, call, None

    async def _fetch(self, request: Request) -> JSONResponse:
        record, call, early = await self._call_request(request, "fetch")
        if early is not None or call is None:
            return early
        return self._respond(record, call.to_json(), 200)

    async def _update(self, request: Request) -> JSONResponse:
        record, call, early = await self._call_request(request, "update")
        if early is not None or call is None:
            return early
        call.updates.append(dict(record.form))
        status = record.form.get("Status")
        if status in ("completed", "canceled"):
            self._end_call(call, status)
        elif not call.active and (record.form.get("Twiml") or record.form.get("Url")):
            # https://www.twilio.com/docs/api/errors/21220: a call that is over can't be
            # redirected (e.g. a caller who hung up on hold, then brought back).
            return self._error(record, 21220, "Call is not in-progress. Cannot redirect.", 400)
        elif record.form.get("Twiml"):
            try:
                twiml = parse_twiml(record.form["Twiml"])
            except TwiMLError as error:
                return self._error(record, 12100, f"Document parse failure: {error}", 400)
            self._redirect(call, twiml)
        elif record.form.get("Url"):
            self._spawn(self._redirect_to_url(call, record.form["Url"]))
        return self._respond(record, call.to_json(), 200)

    # --------------------------------------------------------------- call flow

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _end_call(
        self, call: EmulatedCall, status: str, reason: str | None = None, by: str = "rest"
    ) -> None:
        """`Status=completed` hangs up any call; `canceled` only one not yet answered.
        A call in a conference leaves it (which may end the room, see `_leave_conference`)."""
        if not call.active:
            return
        if status == "canceled" and call.status == "in-progress":
            return
        call.set_status(status)
        reason = reason or f"call {status} via REST"
        if call.caller is not None:
            call.caller.request_hangup(reason, by)
        self._leave_conference(call, reason)

    def _redirect(self, call: EmulatedCall, twiml: TwiML) -> None:
        """New TwiML for a live call: the stream ends (Twilio leaves `<Connect>`), and so
        does its place in a conference; a `<Dial><Conference>` puts it in that room."""
        call.twiml = twiml
        call.dialed.extend(twiml.dials)
        self._leave_conference(call, "call redirected to new TwiML")
        if call.caller is not None:
            call.caller.request_hangup(_redirect_reason(twiml), "rest")
        if twiml.stream is not None or twiml.conference is not None:
            call.caller = None  # the old stream's end must not complete the call
        if twiml.conference is not None:
            self._join_conference(call, twiml.conference)
        elif twiml.has_hangup or not (twiml.dials or twiml.stream):
            call.set_status("completed")
        elif twiml.stream is not None:
            self._spawn(self._stream(call, twiml, webhook_url=None))
        elif call.caller is None:
            call.set_status("completed")  # a <Dial> from a room: no stream end will do it

    # -------------------------------------------------------------- conferences

    def _join_conference(self, call: EmulatedCall, target: ConferenceTarget) -> None:
        """Put `call` in the room `target` names, opening it (again, once ended) if need be.

        The call stays in-progress while in the room: Twilio's `<Dial>` holds it
        (https://www.twilio.com/docs/voice/twiml/conference).
        """
        if not call.active:
            return  # over while its TwiML was fetched: nothing to put in the room
        room = self.conferences.get(target.name)
        if room is None or room.ended:
            room = self.conferences[target.name] = ConferenceRoom(target.name)
        room.join(
            call.sid,
            start_on_enter=target.start_on_enter,
            end_on_exit=target.end_on_exit,
            wait_url=target.wait_url,
        )
        call.conference = target.name
        logger.debug(f"emulated call {call.sid} joined conference {target.name!r}")

    def _leave_conference(self, call: EmulatedCall, reason: str) -> None:
        """Take `call` out of its room; complete the calls the room drops because of it.

        A participant with endConferenceOnExit leaving ends the conference, and the others'
        `<Dial>` ends: with nothing after it in their TwiML, Twilio hangs them up
        (https://www.twilio.com/docs/voice/twiml/conference#attributes-endconferenceonexit).
        """
        name, call.conference = call.conference, None
        room = self.conferences.get(name) if name is not None else None
        if room is None:
            return
        for sid in room.leave(call.sid, reason):
            dropped = self.calls.get(sid)
            if dropped is not None:
                dropped.conference = None
                self._end_call(dropped, "completed", f"conference {name!r} ended")

    async def _redirect_to_url(self, call: EmulatedCall, url: str) -> None:
        try:
            twiml = await self._fetch_twiml(call, url, call_status="in-progress")
        except EmulatorError as error:
            call.error = str(error)
            return
        self._redirect(call, twiml)

    async def _answer(self, call: EmulatedCall, form_lists: Mapping[str, list[str]]) -> None:
        """Ring, pick up, get the TwiML, and stream — as Twilio does after a create.

        The `completed` callback waits for the call's end: a stream's end is not it when a
        redirect moved the call on (into a conference, or to another stream). A call held
        in a room is `finished` already: no stream of it runs, its result is final.
        """
        try:
            events = self._callback_events(form_lists)
            await self._status_callback(call, "initiated", events)
            outcome = self._outcome(call.to)
            if outcome in ("busy", "failed"):
                call.set_status(outcome)  # refused at once: it never rings
            else:
                await self._ring(call, events, outcome)
            if call.conference is not None:
                call.finished.set()
            if await self._until_ended(call):
                await self._status_callback(call, "completed", events)
        finally:
            call.finished.set()

    async def _until_ended(self, call: EmulatedCall) -> bool:
        """Until `call` is over (True), or the emulator stops first (False)."""
        if not call.active:
            return True
        ended = asyncio.ensure_future(call.ended.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            stopping.cancel()
        return not call.active

    async def _ring(self, call: EmulatedCall, events: set[str], outcome: str) -> None:
        """Ring; then pick up, or give up as no-answer when the call's timeout is over.
        A call canceled meanwhile (`Status=canceled`) just stops."""
        await asyncio.sleep(self.answer_delay)
        if not call.active:
            return
        call.set_status("ringing")
        await self._status_callback(call, "ringing", events)
        if outcome == "no-answer":
            await asyncio.sleep(self._ring_timeout(call))
            if call.active:
                call.set_status("no-answer")
            return
        await self._pick_up(call, events)

    def _callee(self, number: str) -> Callee | None:
        return self.callees.callee(number) if self.callees is not None else None

    def _outcome(self, number: str) -> str:
        """`outcomes` first, then the scripted callee, else the number answers."""
        if number in self.outcomes:
            return self.outcomes[number]
        callee = self._callee(number)
        return callee.outcome if callee is not None else ANSWER

    def _answered_by(self, call: EmulatedCall) -> str:
        """The AMD verdict: the callee's, unless a test set `answered_by` (or answers the
        call itself with `on_answer`)."""
        callee = self._callee(call.to)
        if callee is None or self.on_answer is not None or self.answered_by != "human":
            return self.answered_by
        return callee.answered_by

    def _ring_timeout(self, call: EmulatedCall) -> float:
        if self.no_answer_after is not None:
            return self.no_answer_after
        timeout = call.form.get("Timeout", "")
        return float(timeout) if timeout.isdigit() else DEFAULT_RING_TIMEOUT_S

    async def _pick_up(self, call: EmulatedCall, events: set[str]) -> None:
        call.set_status("in-progress")
        if call.form.get("MachineDetection"):
            call.answered_by = self._answered_by(call)
        await self._status_callback(call, "answered", events)
        try:
            twiml, webhook_url = await self._initial_twiml(call)
        except EmulatorError as error:
            self._fail(call, error)
            return
        call.twiml = twiml
        self._spawn_amd_callback(call)
        await self._run_twiml(call, twiml, webhook_url)

    async def _initial_twiml(self, call: EmulatedCall) -> tuple[TwiML, str | None]:
        if call.form.get("Twiml"):
            return parse_twiml(call.form["Twiml"]), None
        url = call.form.get("Url")
        if not url:
            raise EmulatorError("calls.create had no Twiml or Url this emulator can run")
        return await self._fetch_twiml(call, url, call_status="in-progress"), url

    async def _run_twiml(self, call: EmulatedCall, twiml: TwiML, webhook_url: str | None) -> None:
        if twiml.stream is not None:
            await self._stream(call, twiml, webhook_url)
            return
        if twiml.conference is not None:
            self._join_conference(call, twiml.conference)
            return
        call.dialed.extend(twiml.dials)
        self._fail(call, NoStreamError(f"found: {twiml.describe()}"), status="completed")

    def _fail(self, call: EmulatedCall, error: EmulatorError, status: str = "failed") -> None:
        logger.warning(f"emulated call {call.sid}: {error}")
        call.error, call.exception = str(error), error
        if call.active:
            call.set_status(status)

    async def _fetch_twiml(self, call: EmulatedCall, url: str, call_status: str) -> TwiML:
        """POST the signed voice-webhook form to `url` (via the local server) for TwiML."""
        extra = {"AnsweredBy": self._answered_by(call)} if self._sync_amd(call) else None
        form = _call_form(call, call_status, extra)
        return await post_webhook(
            _rebase(url, self.local_server_url),
            form,
            auth_token=self.auth_token,
            signed_url=url,
            timeout=self.webhook_timeout,
            shared_key=self.shared_key,
            attempts=self.webhook_attempts,
        )

    def _stream_url(self, url: str, webhook_url: str | None) -> str:
        """A `wss://public-host/…` stream is reached on loopback (see `local_stream_url`)."""
        if not self.rewrite_stream_urls:
            return url
        if self.local_server_url:
            return local_stream_url(url, self.local_server_url)
        if webhook_url:
            return local_stream_url(url, webhook_url)
        return url

    async def _stream(self, call: EmulatedCall, twiml: TwiML, webhook_url: str | None) -> None:
        """Connect the callee's media stream and let `on_answer` (or silence) drive it.

        A stream URL Twilio would refuse (not wss://, error 31922) fails the call; the
        TwiML after `</Connect>` runs when the server closes the stream (see
        `MediaStreamCaller`). The caller's script: `on_answer`'s, else its callee's, else
        silence.
        """
        stream = twiml.require_stream()
        if refusal := stream_url_refusal(stream.url):
            self._fail(call, StreamConnectError(refusal))
            return
        caller = MediaStreamCaller(
            self._stream_url(stream.url, webhook_url),
            parameters=stream.parameters,
            call_sid=call.sid,
            account_sid=call.account_sid,
            **{"after_stream": twiml.after_stream, **self.caller_options},
        )
        call.caller = caller
        call.streams.append(caller)
        call.answered.set()
        try:
            callee = self._callee(call.to)
            if self.on_answer is not None:
                await self.on_answer(call, caller)
            elif callee is not None:
                await caller.run(callee.script(), check=False)
            else:
                await caller.run([Pause(DEFAULT_CALL_LIMIT_S)], check=False)
        except Exception as error:  # the handler's failure is the test's to inspect
            call.exception = error
            call.error = str(error)
        call.result = caller.result
        if call.caller is caller and call.active:
            call.set_status("completed")  # after a <Dial> too: no one is on the other leg

    # -------------------------------------------------------------- callbacks

    @staticmethod
    def _callback_events(form_lists: Mapping[str, list[str]]) -> set[str]:
        """StatusCallbackEvent values (repeated or space-separated); Twilio's default."""
        values = " ".join(form_lists.get("StatusCallbackEvent", [])).split()
        return set(values) or {"completed"}

    async def _status_callback(self, call: EmulatedCall, event: str, events: set[str]) -> None:
        url = call.form.get("StatusCallback")
        if not url or event not in events:
            return
        # Twilio's "Call status callbacks": the call's webhook parameters plus these;
        # SequenceNumber counts this call's callbacks from 0, Timestamp is RFC 2822 UTC.
        form = _call_form(
            call,
            call.status,
            {
                "CallbackSource": "call-progress-events",
                "SequenceNumber": str(call.status_callbacks_sent),
                "Timestamp": format_datetime(utcnow()),
            },
        )
        call.status_callbacks_sent += 1
        if event == "completed":
            form["CallDuration"] = call.to_json()["duration"] or "0"
        await self._post_callback(url, form)

    def _sync_amd(self, call: EmulatedCall) -> bool:
        return bool(call.form.get("MachineDetection")) and call.form.get("AsyncAmd") != "true"

    def _spawn_amd_callback(self, call: EmulatedCall) -> None:
        url = call.form.get("AsyncAmdStatusCallback")
        if not (call.form.get("MachineDetection") and call.form.get("AsyncAmd") == "true" and url):
            return
        self._spawn(self._amd_callback(call, url))

    async def _amd_callback(self, call: EmulatedCall, url: str) -> None:
        """Twilio's async AMD verdict, once detection would have finished (`amd_delay`)."""
        callee = self._callee(call.to)
        delay = callee.amd_delay if callee and self.on_answer is None else self.amd_delay
        await asyncio.sleep(delay)
        if not call.active:
            return  # hung up before detection finished: nothing to report
        form = {
            "AccountSid": call.account_sid,
            "CallSid": call.sid,
            "AnsweredBy": self._answered_by(call),
            "MachineDetectionDuration": str(round(delay * 1000)),
        }
        await self._post_callback(url, form)

    async def _post_callback(self, url: str, form: dict[str, str]) -> None:
        """POST a status/AMD callback; failures are recorded, never raised (as Twilio)."""
        record = StatusCallback(url, form)
        self.status_callbacks.append(record)
        try:
            response = await send_signed_form(
                _rebase(url, self.local_server_url),
                form,
                auth_token=self.auth_token,
                signed_url=url,
                timeout=self.webhook_timeout,
                shared_key=self.shared_key,
            )
            record.status = response.status_code
        except EmulatorError as error:
            record.error = str(error)


__all__ = [
    "API_VERSION",
    "AnswerHandler",
    "RecordedRequest",
    "StatusCallback",
    "TwilioRestEmulator",
]
