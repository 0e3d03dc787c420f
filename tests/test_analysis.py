"""Post-call analysis (issue 18): a summary, success against the agent's criterion, fields.

- the analysis itself (phonebot.agents.analysis): the prompt holds the criterion and the
  fields, the LLM's answer is parsed and checked, the extractive analysis reads the first
  caller turn, the outcomes and the end, and judges `success_when`;
- running it (phonebot.call.analysis) against the in-process AI API emulator: a failed try
  is retried, every try failing gives the extractive analysis with the error, a 4xx is not
  retried, a shutdown cuts a running analysis short and stores the extractive one;
- records: the migration, the `analysis` and `success` columns, `GET /calls?success=`, the
  calls page, the signed `call.analyzed` event;
- end to end: the real server and the Twilio emulator, with no keys (a summer-sale
  dial-out: extractive, judged on its outcome) and with the LLM (instant-AI mode: one
  injected failure, then the scripted JSON answer), and a slow analysis that lands well
  after the call has hung up and its record closed.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pipecat.runner.types import WebSocketRunnerArguments
from sqlalchemy import inspect, select, text

from phonebot.agents.analysis import (
    AnalysisError,
    CallFacts,
    analysis_messages,
    answer_shape,
    conversation,
    extractive_analysis,
    parse_analysis,
    transcript_text,
)
from phonebot.agents.spec import AnalysisSpec
from phonebot.call.analysis import (
    CUT_SHORT,
    SHUTDOWN_WAIT_S,
    AnalysisJobs,
    ChatEndpoint,
    PostCallAnalysis,
    llm_analysis,
    post_call_analysis,
)
from phonebot.db.engine import create_engine
from phonebot.db.migrate import alembic_config, head_revision, migrate
from phonebot.emulator import Hangup, MediaStreamCaller, Pause, TwilioRestEmulator, WaitForBot
from phonebot.emulator.ai_api import running_ai_api
from phonebot.emulator.loopback import LoopbackServer
from phonebot.records import Records
from phonebot.records.call_log import CallLog
from phonebot.records.cli import main as records_cli
from phonebot.records.events import SIGNATURE_HEADER, verify_signature
from phonebot.records.schema import EventDelivery
from phonebot.twilio.stream_token import call_token
from phonebot.web.calls_ui import LogQuery, _next_link
from tests.browser import records_app
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, make_settings, shipped_agent
from tests.live_server import LiveServer, ai_api_process, free_port, instant_services_env
from tests.test_calls import CALLER, OUR_NUMBER, call_in, say
from tests.test_records_calls import (
    ADMIN_KEY,
    EVENTS_SECRET,
    EventReceiver,
    dialout,
    record_of,
    records_env,
)

pytest_plugins = ["tests.pg_server"]

SUPPORT = shipped_agent("support").analysis
SUMMER = shipped_agent("summer_sale").analysis
# An analysis with a criterion in words only (no success_when): judged by an LLM alone.
WORDS_ONLY = AnalysisSpec(success="The caller's question was answered.")
CALL_SYSTEM_PROMPT = "You are a patient customer support agent for Acme Outdoor."
MESSAGES = [
    {"role": "system", "content": CALL_SYSTEM_PROMPT},
    {"role": "assistant", "content": "Hello, you've reached Acme Outdoor support."},
    {"role": "user", "content": "my order has not arrived"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "record_outcome", "arguments": '{"topic": "order"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "recorded"},
    {"role": "assistant", "content": "Could you tell me your order number?"},
]  # fmt: skip
GOOD_ANSWER = {
    "summary": "The caller's order is late; the agent asked for the order number.",
    "success": {"value": True, "reason": "The caller knows the next step."},
    "fields": {"topic": "Order", "mood": "calm"},
    "extra": "ignored",
}


def facts(
    messages: list[dict] = MESSAGES, outcomes: dict[str, str] | None = None, **overrides: Any
) -> CallFacts:
    values: dict[str, Any] = {
        "agent": "support", "direction": "inbound", "messages": conversation(messages),
        "end_reason": "caller hung up", "duration_s": 42.4, "outcomes": outcomes or {},
    }  # fmt: skip
    return CallFacts(**{**values, **overrides})


# --- the prompt ---------------------------------------------------------------------------


def test_the_prompt_asks_for_json_with_the_agents_criterion_fields_and_transcript():
    asked = analysis_messages(SUPPORT, facts(outcomes={"topic": "order"}))
    system, user = (message["content"] for message in asked)

    assert "one JSON object and nothing else" in system
    assert '"summary": "<two or three sentences>"' in system
    assert '"success": {"value": <true or false>, "reason": "<one sentence>"}' in system
    assert '"fields": {"topic": "order" or "return" or "appointment" or "other" or null}' in system
    # The agent's own criterion and field, in its words.
    assert f"Success criterion (judge \"success\" against it): {SUPPORT.success}" in user
    assert (
        'Field "topic": What the call was about. Allowed values: order, return, appointment,'
        " other." in user
    )
    assert "How the call ended: caller hung up, after 42 seconds." in user
    assert "Outcomes the agent recorded during the call: topic=order." in user
    transcript = user.split("Transcript:\n")[1]
    assert transcript.splitlines()[:5] == [
        "Agent: Hello, you've reached Acme Outdoor support.",
        "Caller: my order has not arrived",
        'Agent called record_outcome({"topic": "order"})',
        "Result: recorded",
        "Agent: Could you tell me your order number?",
    ]
    assert CALL_SYSTEM_PROMPT not in user + system  # the call's own prompt isn't the call


def test_an_agent_asking_only_for_a_summary_is_asked_only_for_a_summary():
    assert answer_shape(AnalysisSpec()) == '{"summary": "<two or three sentences>"}'
    # success_when alone is judged on the outcomes, never by the LLM.
    assert answer_shape(AnalysisSpec(summary=False, success_when={"interested": "yes"})) == "{}"


def test_a_long_transcript_is_cut_in_the_middle():
    said = [{"role": "user", "content": f"turn {n} " + "x" * 200} for n in range(500)]
    cut = transcript_text(said, limit=5000)
    assert len(cut) < 5100 and "characters left out" in cut
    assert cut.startswith("Caller: turn 0 ") and "turn 499 " in cut


# --- reading the LLM's answer -------------------------------------------------------------


def test_the_answer_is_read_into_the_analysis_keeping_only_what_was_asked():
    expected = {
        "method": "llm",
        "summary": GOOD_ANSWER["summary"],
        "success": {"value": True, "reason": "The caller knows the next step."},
        "fields": {"topic": "order"},  # "Order" is the declared "order"; "mood" not asked
        "error": None,
    }
    assert parse_analysis(json.dumps(GOOD_ANSWER), SUPPORT, facts()) == expected
    fenced = f"```json\n{json.dumps(GOOD_ANSWER)}\n```"
    assert parse_analysis(fenced, SUPPORT, facts()) == expected
    unknown = {**GOOD_ANSWER, "fields": {"topic": None}}
    assert parse_analysis(json.dumps(unknown), SUPPORT, facts())["fields"] == {"topic": None}


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("Sure! Here is the analysis.", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({**GOOD_ANSWER, "summary": ""}), '"summary" must be a non-empty string'),
        (json.dumps({k: v for k, v in GOOD_ANSWER.items() if k != "success"}), '"success"'),
        (json.dumps({**GOOD_ANSWER, "success": {"value": "yes"}}), '"success" must be'),
        (json.dumps({**GOOD_ANSWER, "fields": {"topic": "billing"}}), "must be one of"),
        (json.dumps({**GOOD_ANSWER, "fields": ["order"]}), '"fields" must be an object'),
    ],
)
def test_an_answer_that_is_not_the_analysis_asked_for_is_refused(answer: str, problem: str):
    with pytest.raises(AnalysisError, match=re.escape(problem)):
        parse_analysis(answer, SUPPORT, facts())


def test_with_only_success_when_the_llms_answer_is_judged_on_the_outcomes():
    spec = AnalysisSpec(summary=False, success_when={"interested": "yes"})
    analysis = parse_analysis("{}", spec, facts(outcomes={"interested": "yes"}))
    assert analysis["summary"] is None
    assert analysis["success"] == {"value": True, "reason": "recorded interested=yes"}


# --- the extractive analysis --------------------------------------------------------------


def test_the_extractive_analysis_says_what_was_asked_the_outcomes_and_the_end():
    said = [{"role": "assistant", "content": "Hi, this is Sam."},
            {"role": "user", "content": "yes I would like that"},
            {"role": "user", "content": "goodbye"}]  # fmt: skip
    outbound = facts(said, {"interested": "yes"}, direction="outbound", agent="summer_sale")
    assert extractive_analysis(SUMMER, outbound) == {
        "method": "extractive",
        "summary": "Callee said: yes I would like that. Outcomes: interested=yes. "
        "Ended: caller hung up after 42 s.",
        "success": {"value": True, "reason": "recorded interested=yes"},
        "fields": {},
        "error": None,
    }
    inbound = extractive_analysis(SUPPORT, facts(), error="HTTP 500 (after 3 tries)")
    assert inbound["summary"] == (
        "Caller asked: my order has not arrived. Ended: caller hung up after 42 s."
    )
    assert inbound["error"] == "HTTP 500 (after 3 tries)"
    silent = extractive_analysis(WORDS_ONLY, facts([], end_reason="caller silent"))
    assert silent["summary"] == "Caller said nothing. Ended: caller silent after 42 s."


@pytest.mark.parametrize(
    ("outcomes", "success"),
    [
        ({"interested": "yes"}, {"value": True, "reason": "recorded interested=yes"}),
        ({"interested": "no"}, {"value": False, "reason": "interested is no, not yes"}),
        ({}, {"value": False, "reason": "interested was not recorded (wanted yes)"}),
    ],
)
def test_offline_success_is_success_when_against_the_outcomes(outcomes, success):
    assert extractive_analysis(SUMMER, facts(outcomes=outcomes))["success"] == success


def test_offline_a_criterion_in_words_is_not_judged_and_fields_come_from_outcomes():
    words_only = extractive_analysis(WORDS_ONLY, facts())
    assert words_only["success"] == {
        "value": None, "reason": "no success_when to check without an LLM"
    }  # fmt: skip
    assert extractive_analysis(AnalysisSpec(), facts())["success"] is None  # no criterion
    assert extractive_analysis(SUPPORT, facts(outcomes={"topic": "return"}))["fields"] == {
        "topic": "return"
    }
    # A value the field doesn't allow, or none recorded: null.
    for outcomes in ({"topic": "billing"}, {}):
        assert extractive_analysis(SUPPORT, facts(outcomes=outcomes))["fields"] == {"topic": None}


# --- running it: the request, retries, fallback -------------------------------------------


@pytest.fixture
async def ai_api() -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The in-process AI API emulator: its /v1 URL and a client on its control routes."""
    async with running_ai_api() as controls:
        assert controls.base_url is not None
        root = controls.base_url.removesuffix("/v1")
        async with httpx.AsyncClient(base_url=root, timeout=10) as control:
            yield controls.base_url, control


def endpoint(base_url: str, timeout_s: float = 5.0) -> ChatEndpoint:
    return ChatEndpoint(base_url=base_url, model="test-model", api_key="k", timeout_s=timeout_s)


async def script_reply(control: httpx.AsyncClient, *texts: str) -> None:
    replies = {"replies": [{"text": t} for t in texts]}
    (await control.put("/_emulator/replies", json=replies)).raise_for_status()


async def fail_next(control: httpx.AsyncClient, kind: str, times: int) -> None:
    fault = {"service": "llm", "kind": kind, "times": times}
    (await control.post("/_emulator/faults", json=fault)).raise_for_status()


async def test_one_request_asks_for_json_and_a_failed_try_is_retried(ai_api):
    base_url, control = ai_api
    await fail_next(control, "status_500", 1)
    await script_reply(control, json.dumps(GOOD_ANSWER))

    analysis = await llm_analysis(SUPPORT, facts(), endpoint(base_url), base_backoff_s=0.01)

    assert analysis["method"] == "llm" and analysis["attempts"] == 2
    assert analysis["summary"] == GOOD_ANSWER["summary"]
    assert analysis["success"]["value"] is True and analysis["fields"] == {"topic": "order"}
    assert (await control.get("/_emulator/requests")).json()["llm"] == 2
    (sent,) = (await control.get("/_emulator/chat")).json()  # the one that was answered
    assert sent["messages"] == analysis_messages(SUPPORT, facts())
    assert sent["response_format"] == {"type": "json_object"} and sent["model"] == "test-model"
    assert not sent.get("stream")


async def test_the_instant_emulator_answers_json_mode_with_an_analysis_at_the_first_try(ai_api):
    """OpenAI's JSON mode only writes a JSON object; the emulator does too (no script), so
    a benchmark's call ends with one analysis request, not three failed ones."""
    base_url, control = ai_api
    analysis = await llm_analysis(SUPPORT, facts(), endpoint(base_url), base_backoff_s=0.01)
    assert (analysis["method"], analysis["attempts"], analysis["error"]) == ("llm", 1, None)
    assert analysis["summary"].startswith("You said: ")
    assert analysis["success"]["value"] is True
    assert analysis["fields"] == {"topic": None}
    assert (await control.get("/_emulator/requests")).json()["llm"] == 1


async def test_an_answer_that_is_not_json_is_tried_again(ai_api):
    base_url, control = ai_api
    await script_reply(control, "Here you go: the caller was happy.", json.dumps(GOOD_ANSWER))
    analysis = await llm_analysis(SUPPORT, facts(), endpoint(base_url), base_backoff_s=0.01)
    assert (analysis["method"], analysis["attempts"]) == ("llm", 2)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("status_500", "HTTP 500 (after 3 tries)"), ("timeout", "timed out (after 3 tries)")],
)
async def test_when_every_try_fails_the_extractive_analysis_says_why(ai_api, kind, error, logs):
    base_url, control = ai_api
    await fail_next(control, kind, 3)

    started = time.monotonic()
    analysis = await llm_analysis(
        SUPPORT, facts(), endpoint(base_url, timeout_s=0.3), call_sid="CA1", base_backoff_s=0.01
    )

    assert time.monotonic() - started < 5  # each try bounded by its timeout
    assert analysis == {**extractive_analysis(SUPPORT, facts(), error=error), "attempts": 3}
    assert (await control.get("/_emulator/requests")).json()["llm"] == 3
    assert [line for line in logs if line.startswith("WARNING")] == [
        f"WARNING Call CA1: the LLM's analysis failed after 3 tries ({error.split(' (')[0]});"
        " storing the extractive analysis"
    ]


async def test_a_refusal_such_as_a_wrong_key_is_not_retried():
    refusing = FastAPI()
    calls: list[str] = []

    @refusing.post("/v1/chat/completions")
    async def refuse() -> JSONResponse:
        calls.append("POST")
        return JSONResponse({"error": {"message": "Incorrect API key"}}, status_code=401)

    server = LoopbackServer(refusing)
    await server.start()
    try:
        analysis = await llm_analysis(SUPPORT, facts(), endpoint(f"{server.base_url}/v1"))
    finally:
        await server.stop()
    assert calls == ["POST"]
    assert (analysis["method"], analysis["error"]) == ("extractive", "HTTP 401 (after 1 try)")


class FakeLog(CallLog):
    """A call's log without a writer that keeps the analyses it is handed."""

    def __init__(self) -> None:
        super().__init__(None, "CA" + "a" * 32)
        self.stored: list[tuple[str, dict]] = []

    @property
    def enabled(self) -> bool:
        return True

    def analyzed(self, agent: str, analysis: dict) -> None:
        self.stored.append((agent, analysis))


async def test_a_shutdown_cuts_a_running_analysis_short_and_stores_the_extractive_one(ai_api):
    base_url, control = ai_api
    await fail_next(control, "timeout", 1)  # the LLM never answers
    settings = make_settings(openai_api_key="k", openai_base_url=base_url, llm_timeout_s=30)
    log = FakeLog()
    jobs = AnalysisJobs()
    jobs.submit(PostCallAnalysis(SUPPORT, facts(), settings, log))
    await asyncio.sleep(0.3)
    assert len(jobs) == 1 and log.stored == []

    assert await jobs.drain(timeout_s=0.2) == 1

    assert len(jobs) == 0
    assert log.stored == [
        ("support", {**extractive_analysis(SUPPORT, facts(), error=CUT_SHORT), "attempts": 0})
    ]
    assert await jobs.drain() == 0  # nothing left: returns at once


async def test_with_no_llm_key_the_analysis_is_extractive_and_makes_no_request():
    log = FakeLog()
    log.outcome({"topic": "return"})  # record_outcome during the call
    agent = shipped_agent("support")
    analysis = post_call_analysis(
        agent, make_settings(), log, direction="inbound", messages=MESSAGES,
        end_reason="caller hung up", duration_s=42.4,
    )  # fmt: skip
    assert analysis is not None and analysis.facts.outcomes == {"topic": "return"}
    stored = await analysis.run()
    assert stored["method"] == "extractive" and stored["attempts"] == 0
    assert stored["fields"] == {"topic": "return"} and log.stored == [("support", stored)]


def test_only_calls_with_an_analysis_block_and_a_record_get_one():
    arguments = {"direction": "inbound", "messages": [], "end_reason": "x", "duration_s": 1.0}
    sales = shipped_agent("sales")
    assert sales.analysis is None
    assert post_call_analysis(sales, make_settings(), FakeLog(), **arguments) is None
    no_records = CallLog(None, "CA1")
    assert post_call_analysis(shipped_agent("support"), make_settings(), no_records,
                              **arguments) is None  # fmt: skip
    no_records.outcome({"interested": "yes"})  # still kept for the call's own use
    assert no_records.outcomes == {"interested": "yes"}


# --- records: migration, columns, filter, page, event -------------------------------------


async def test_the_migration_adds_the_columns_and_keeps_the_records(database_url: str):
    engine = create_engine(database_url)

    def to(revision: str, downgrade: bool = False):
        def run(connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            (command.downgrade if downgrade else command.upgrade)(config, revision)

        return run

    def columns(connection) -> set[str]:
        return {c["name"] for c in inspect(connection).get_columns("calls")}

    async with engine.begin() as connection:
        await connection.run_sync(to("0002"))
        await connection.execute(
            text("INSERT INTO calls (call_sid, created_at) VALUES ('CAold', '2026-11-25')")
        )
    assert await migrate(database_url, engine) == head_revision()
    async with engine.begin() as connection:
        assert {"analysis", "success"} <= await connection.run_sync(columns)
        kept = (await connection.execute(text("SELECT call_sid, success FROM calls"))).all()
        assert [tuple(row) for row in kept] == [("CAold", None)]
        indexes = await connection.run_sync(
            lambda sync: {i["name"] for i in inspect(sync).get_indexes("calls")}
        )
        assert "ix_calls_success" in indexes
        await connection.run_sync(to("0002", downgrade=True))
        assert not {"analysis", "success"} & await connection.run_sync(columns)
    await engine.dispose()


def analysis_of(value: bool | None, summary: str = "A call.") -> dict:
    success = None if value is None else {"value": value, "reason": f"judged {value}"}
    return {"method": "llm", "summary": summary, "success": success,
            "fields": {"topic": "order"}, "error": None, "attempts": 1}  # fmt: skip


HOSTILE = "<script>alert(1)</script> asked about <b>orders</b>"
JUDGED = {"CAyes": True, "CAno": False, "CAnone": None}
KEY = "test-admin-key-0123456789"


@pytest.fixture
def receiver() -> Iterator[EventReceiver]:
    listening = EventReceiver()
    yield listening
    listening.close()


@pytest.fixture
def judged_app(tmp_path: Path, receiver: EventReceiver) -> Iterator[TestClient]:
    """The records API and page over three analysed calls (success true, false, none) and
    one not analysed yet; events go to `receiver`."""
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'calls.db'}", admin_api_key=KEY,
        events_webhook_url=receiver.url, events_webhook_secret=EVENTS_SECRET,
    )  # fmt: skip

    async def seed(records: Records) -> None:
        writer = records.writer
        for sid in [*JUDGED, "CAlater"]:
            writer.call_started(sid, direction="inbound", persona="support")
            writer.call_ended(sid, end_reason="caller hung up")
        for sid, value in JUDGED.items():
            summary = HOSTILE if sid == "CAno" else "A call."
            writer.call_analyzed(sid, agent="support", analysis=analysis_of(value, summary))
        await writer.flush()

    with TestClient(records_app(settings, seed), follow_redirects=False) as client:
        yield client


def test_the_analysis_is_stored_and_success_filters_the_log(judged_app: TestClient):
    auth = {"Authorization": f"Bearer {KEY}"}

    def listed(query: str) -> set[str]:
        response = judged_app.get(f"/calls{query}", headers=auth)
        assert response.status_code == 200, response.text
        return {call["call_sid"] for call in response.json()["calls"]}

    assert listed("?success=true") == {"CAyes"}
    assert listed("?success=false") == {"CAno"}
    assert listed("") == {*JUDGED, "CAlater"}
    assert judged_app.get("/calls?success=maybe", headers=auth).status_code == 422
    call = judged_app.get("/calls/CAyes", headers=auth).json()
    assert call["analysis"] == analysis_of(True) and call["success"] is True
    later = judged_app.get("/calls/CAlater", headers=auth).json()
    assert later["analysis"] is None and later["success"] is None


async def test_call_analyzed_is_sent_signed_with_the_agent_and_the_analysis(
    judged_app: TestClient, receiver: EventReceiver
):
    event = await receiver.wait_for("CAyes", "call.analyzed")  # signature checked
    assert event["data"] == {"call_sid": "CAyes", "agent": "support",
                             "analysis": analysis_of(True)}  # fmt: skip
    ended = await receiver.wait_for("CAyes", "call.ended")
    assert ended["data"]["analysis"] is None  # the call ended before it was analysed


async def test_the_event_is_staged_in_the_records_transaction(tmp_path: Path):
    """No deliverer running: the row is in the database exactly when the analysis is."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    settings = make_settings(database_url=url, events_webhook_url="http://127.0.0.1:1/hook",
                             events_webhook_secret=EVENTS_SECRET)  # fmt: skip
    records = Records(settings)
    await records.start()
    await records.events.close()  # nothing sent: the rows stay
    records.writer.call_analyzed("CAx", agent="support", analysis=analysis_of(False))
    await records.writer.flush()
    async with records.sessions() as session:
        rows = (await session.scalars(select(EventDelivery))).all()
    stored = await records.store.get("CAx")
    await records.stop()
    assert [row.type for row in rows] == ["call.analyzed"]
    assert rows[0].payload["data"]["analysis"] == analysis_of(False)
    assert stored is not None and stored.success is False


def test_the_page_shows_the_analysis_and_filters_on_success(judged_app: TestClient):
    assert judged_app.post("/calls/ui/login", data={"key": KEY}).status_code == 303
    page = judged_app.get("/calls/ui/CAno").text
    section = page.split('<section class="analysis"', 1)[1].split("</section>", 1)[0]
    assert "<h2>Analysis</h2>" in section
    assert "<strong>no</strong>: judged False" in section
    assert "<dt>topic</dt><dd>order</dd>" in section
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert 'class="analysis"' not in judged_app.get("/calls/ui/CAlater").text

    log = judged_app.get("/calls/ui?success=true").text
    assert re.findall(r'data-call-sid="(\w+)"', log) == ["CAyes"]
    assert '<span class="success yes">yes</span>' in log  # the Success column
    unfiltered = judged_app.get("/calls/ui").text
    assert '<span class="success no">no</span>' in unfiltered
    assert '<option value="true" selected>success</option>' in log
    assert judged_app.get("/calls/ui?success=perhaps").status_code == 422
    # The next page keeps the filter as the form sends it (the select shows it selected).
    assert "success=false" in (_next_link(LogQuery(success="false"), "cursor") or "")


def test_the_command_line_filters_on_success_and_shows_the_analysis(tmp_path: Path, capsys):
    url = f"sqlite:///{tmp_path / 'calls.db'}"

    async def seed() -> None:
        records = Records(make_settings(database_url=url))
        await records.start()
        for sid, value in JUDGED.items():
            records.writer.call_started(sid, direction="inbound", persona="support")
            records.writer.call_ended(sid, end_reason="caller hung up")
            records.writer.call_analyzed(sid, agent="support", analysis=analysis_of(value))
        await records.stop()

    asyncio.run(seed())
    assert records_cli(["--database-url", url, "list", "--success", "false"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "CAno" in line and line.endswith("caller hung up  no success")
    assert records_cli(["--database-url", url, "show", "CAyes"]) == 0
    shown = capsys.readouterr().out
    assert "analysis:              llm\n" in shown
    assert "  success              True: judged True\n" in shown
    assert "  topic                order\n" in shown
    with pytest.raises(SystemExit):
        records_cli(["--database-url", url, "list", "--success", "maybe"])


# --- end to end, no keys ------------------------------------------------------------------

CALLEE = "+15551234560"


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def events() -> Iterator[EventReceiver]:
    listening = EventReceiver()
    yield listening
    listening.close()


@pytest.fixture(scope="module")
def offline_server(
    rest_port: int, events: EventReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("analysis-offline")
    live = LiveServer(records_env(rest_port, f"sqlite:///{folder / 'r.db'}", events.url), folder)
    yield live
    live.stop()


@pytest.fixture
async def twilio(rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    emulator = TwilioRestEmulator(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port)
    async with emulator:
        yield emulator


async def calls_listed(server: LiveServer, query: str) -> set[str]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{server.base_url}/calls{query}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
    assert response.status_code == 200, response.text
    return {call["call_sid"] for call in response.json()["calls"]}


async def test_with_no_keys_a_dialout_is_analysed_stored_filterable_and_sent(
    offline_server: LiveServer, twilio: TwilioRestEmulator, events: EventReceiver
):
    twilio.local_server_url = offline_server.base_url

    async def callee(call, caller: MediaStreamCaller) -> None:
        script = [WaitForBot(timeout=15), say("yes I would like that"),
                  WaitForBot(timeout=15), Hangup()]  # fmt: skip
        call.result = await caller.run(script)

    twilio.on_answer = callee
    call_sid = await dialout(offline_server, {"to": CALLEE,
                                              "parameters": {"campaign_id": "summer_sale"}})
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=40)
    assert call.exception is None, call.error

    record = await record_of(offline_server, call_sid, lambda r: r["analysis"] is not None)
    analysis = record["analysis"]
    heard = next(e["text"] for e in record["transcript"] if e["kind"] == "caller")
    assert record["outcomes"] == {"interested": "yes"}
    assert (analysis["method"], analysis["error"], analysis["attempts"]) == ("extractive", None, 0)
    assert re.fullmatch(
        rf"Callee said: {re.escape(heard.rstrip('.?! '))}\. Outcomes: interested=yes\. "
        r"Ended: caller hung up after \d+ s\.", analysis["summary"],
    ), analysis["summary"]  # fmt: skip
    assert analysis["success"] == {"value": True, "reason": "recorded interested=yes"}
    assert record["success"] is True and record["persona"] == "summer_sale"
    assert call_sid in await calls_listed(offline_server, "?success=true")
    assert call_sid not in await calls_listed(offline_server, "?success=false")

    sent = await events.wait_for(call_sid, "call.analyzed")  # signature checked
    assert sent["data"] == {"call_sid": call_sid, "agent": "summer_sale", "analysis": analysis}
    headers, body = next((h, b) for h, b in events.received if json.loads(b)["id"] == sent["id"])
    assert not verify_signature("another-secret", headers[SIGNATURE_HEADER], body)
    assert offline_server.wait_for_log(f"Call {call_sid} analyzed (extractive): success=True")
    assert offline_server.error_lines() == []


# --- end to end, with the LLM (instant-AI mode) -------------------------------------------

LLM_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def ai_api_url() -> Iterator[str]:
    with ai_api_process() as url:
        yield url


@pytest.fixture(scope="module")
def llm_server(
    rest_port: int, ai_api_url: str, events: EventReceiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:  # fmt: skip
    folder = tmp_path_factory.mktemp("analysis-llm")
    env = {
        **records_env(rest_port, f"sqlite:///{folder / 'r.db'}", events.url),
        **instant_services_env(ai_api_url),
        "LLM_TIMEOUT_S": str(LLM_TIMEOUT_S),
        "SILENCE_TIMEOUT_S": "30",  # no re-prompt may take the analysis's scripted answer
    }
    live = LiveServer(env, folder)
    yield live
    live.stop()


@pytest.fixture
def ai_control(ai_api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ai_api_url, timeout=10) as control:
        yield control
        control.delete("/_emulator/faults")
        control.delete("/_emulator/replies")


def queue_analysis_answer(control: httpx.Client, fault: str, answer: dict) -> None:
    """The next LLM request fails with `fault`; the one after gets `answer` as its text."""
    control.post("/_emulator/faults", json={"service": "llm", "kind": fault, "times": 1})
    control.put("/_emulator/replies", json={"replies": [{"text": json.dumps(answer)}]})


async def test_with_an_llm_the_analysis_is_its_answer_after_one_failed_try(
    llm_server: LiveServer, ai_control: httpx.Client, twilio: TwilioRestEmulator,
    events: EventReceiver,
):  # fmt: skip
    twilio.local_server_url = llm_server.base_url
    first_line = len(llm_server.logs)
    script = [WaitForBot(timeout=20), say("where is my order"), WaitForBot(timeout=20),
              Pause(3.0), Hangup()]  # fmt: skip
    caller = asyncio.create_task(call_in(llm_server, twilio, script, session_type="support"))
    # The bot has answered the caller's turn (the emulator's echo): the next LLM request is
    # the analysis, made once the caller has hung up.
    await until(lambda: any("bot says: \"You said:" in line
                            for line in llm_server.logs[first_line:]), 30)  # fmt: skip
    queue_analysis_answer(ai_control, "status_500", GOOD_ANSWER)
    result = await caller

    record = await record_of(llm_server, result.call_sid, lambda r: r["analysis"] is not None)
    analysis = record["analysis"]
    assert (analysis["method"], analysis["attempts"], analysis["error"]) == ("llm", 2, None)
    assert analysis["summary"] == GOOD_ANSWER["summary"]
    assert analysis["success"] == GOOD_ANSWER["success"] and record["success"] is True
    assert analysis["fields"] == {"topic": "order"}
    assert result.call_sid in await calls_listed(llm_server, "?success=true")
    asked = ai_control.get("/_emulator/chat").json()[-1]
    assert asked["response_format"] == {"type": "json_object"}
    assert SUPPORT.success in asked["messages"][1]["content"]
    assert "Caller: I would like to know your opening hours" in asked["messages"][1]["content"]
    sent = await events.wait_for(result.call_sid, "call.analyzed")
    assert sent["data"]["analysis"] == analysis
    assert llm_server.wait_for_log(f"Call {result.call_sid}: analysis try 1 failed (HTTP 500)")
    assert llm_server.error_lines() == []


async def test_a_slow_analysis_never_holds_up_the_hang_up_or_the_record(
    llm_server: LiveServer, ai_control: httpx.Client, twilio: TwilioRestEmulator
):
    """The analysis's first try hangs for LLM_TIMEOUT_S: by then the caller has hung up,
    the stream is closed, the record is closed and the call's slot is free."""
    twilio.local_server_url = llm_server.base_url
    # No caller turn: the call itself asks the LLM nothing (a dial-in greets from its text).
    queue_analysis_answer(ai_control, "timeout", GOOD_ANSWER)
    result = await call_in(llm_server, twilio, [WaitForBot(timeout=20), Hangup()],
                           session_type="support")  # fmt: skip
    hung_up = time.monotonic()

    closed = await record_of(llm_server, result.call_sid, timeout_s=LLM_TIMEOUT_S)
    assert closed["end_reason"] == "caller hung up" and closed["analysis"] is None
    health = llm_server.health()
    assert health["active_streams"] == 0, health
    record = await record_of(llm_server, result.call_sid, lambda r: r["analysis"] is not None)
    landed = time.monotonic() - hung_up
    assert landed >= LLM_TIMEOUT_S - 0.5, f"the analysis landed {landed:.1f} s after hang-up"
    assert (record["analysis"]["method"], record["analysis"]["attempts"]) == ("llm", 2)
    assert record["ended_at"] == closed["ended_at"]  # the close was not held for it
    assert llm_server.wait_for_log(f"Call {result.call_sid}: analysis try 1 failed (timed out)")


async def until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_a_shutdown_gives_running_analyses_a_bounded_wait_then_stores_extractive_ones(
    rest_port: int, ai_api_url: str, ai_control: httpx.Client, twilio: TwilioRestEmulator,
    tmp_path: Path,
):  # fmt: skip
    """SIGTERM just after a call whose analysis hangs: the drain finds no call left, the
    analysis gets SHUTDOWN_WAIT_S, is cut short, and its extractive stand-in is written
    before the records close; the server exits 0."""
    database = f"sqlite:///{tmp_path / 'r.db'}"
    env = {**records_env(rest_port, database), **instant_services_env(ai_api_url),
           "LLM_TIMEOUT_S": "60"}  # fmt: skip
    live = LiveServer(env, tmp_path)
    try:
        twilio.local_server_url = live.base_url
        ai_control.post("/_emulator/faults", json={"service": "llm", "kind": "timeout"})
        script = [WaitForBot(timeout=20), Hangup()]
        result = await call_in(live, twilio, script, session_type="support")
        assert live.wait_for_log(f"Call {result.call_sid} ended")
        await until(lambda: ai_control.get("/_emulator/requests").json()["llm"] >= 1, 10)
        live.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(live.wait_exit, 30) == 0
    finally:
        live.stop()
    log = live.log_text()
    assert f"Shutdown: waiting up to {SHUTDOWN_WAIT_S:g} s for 1 call analyses" in log
    assert "Shutdown: 1 call analyses cut short" in log
    records = Records(make_settings(database_url=database))
    try:
        stored = await records.store.get(result.call_sid)
    finally:
        await records.engine.dispose()
    assert stored is not None and stored.ended_at is not None and stored.analysis is not None
    assert (stored.analysis.method, stored.analysis.error) == ("extractive", CUT_SHORT)


# --- Pipecat Cloud: no app, the analysis is awaited after the call -------------------------


async def test_on_pipecat_cloud_the_analysis_is_stored_before_the_session_ends(
    postgres_server, monkeypatch: pytest.MonkeyPatch
):
    """`bot()` has no app and no background jobs: its call awaits its own analysis once it
    has ended, so the record holds it by the time the session is over."""
    import bot

    settings = make_settings(database_url=postgres_server.create_database())
    monkeypatch.setattr(bot, "get_settings", lambda: settings)
    sessions: list[str] = []
    app = FastAPI()

    @app.websocket("/ws")
    async def cloud(websocket: WebSocket) -> None:
        await websocket.accept()
        await bot.bot(WebSocketRunnerArguments(websocket=websocket))
        sessions.append("over")

    server = LoopbackServer(app, ws="auto")
    await server.start()
    call_sid = "CA" + "c" * 32
    parameters = {"caller_id": CALLER, "called_number": OUR_NUMBER, "call_type": "inbound",
                  "session_type": "support"}  # fmt: skip
    token = call_token(call_sid, settings.stream_token_secret, parameters, time.time() + 30)
    try:
        caller = MediaStreamCaller(
            f"ws://127.0.0.1:{server.port}/ws",
            parameters={**parameters, "token": token}, call_sid=call_sid,
        )  # fmt: skip
        result = await caller.run([WaitForBot(timeout=20), Hangup()])
        await until(lambda: sessions == ["over"], 30)
    finally:
        await server.stop()
    assert result.bot_utterances  # the support agent greeted
    records = Records(settings)
    try:
        stored = await records.store.get(call_sid)
    finally:
        await records.engine.dispose()
    assert stored is not None and stored.persona == "support" and stored.analysis is not None
    assert stored.analysis.method == "extractive"
    assert re.fullmatch(r"Caller said nothing\. Ended: caller hung up after \d+ s\.",
                        stored.analysis.summary or "")  # fmt: skip
