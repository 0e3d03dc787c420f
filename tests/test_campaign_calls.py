"""Campaign calls from the callee's side: outcomes and opt-out, end to end.

The real server dials out through the Twilio emulator, whose scripted callees
(phonebot.emulator.callees) answer with the offline TTS; the bot runs the offline engines.
A callee who asks to be removed lands on the do-not-call list, hears the confirmation and
the call ends "opted out"; an interested callee's answer is recorded on the call record
(`outcomes`) through the offline responder's `record_outcome` function call. The unit tests
below pin the responder's keyword rules and the function schema the LLM sees.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pipecat.processors.aggregators.llm_context import LLMContext
from sqlalchemy import select

from phonebot.agents.agent import outcome_problems
from phonebot.ai.offline.responder import OfflineResponder, Reply
from phonebot.call.control import EndReason, other_party
from phonebot.call.tools import OPT_OUT_TOOL, call_tools, record_outcome_tool
from phonebot.db.engine import create_engine, sessionmaker
from phonebot.db.migrate import migrate
from phonebot.dnc.schema import DoNotCall
from phonebot.emulator import TwilioRestEmulator
from phonebot.records.schema import CallRecord
from phonebot.records.writer import RecordWriter
from phonebot.twilio.stream import CallSession
from tests.conftest import DIALOUT_KEY, make_settings, shipped_agent
from tests.live_server import LiveServer, closed_record, free_port, scripted_callees
from tests.test_calls import server_env

pytest_plugins = ["tests.pg_server"]

ADMIN_KEY = "test-admin-key-campaign-calls"
OPTS_OUT = "+15551230007"
INTERESTED = "+15551230001"
SALE = shipped_agent("summer_sale")


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def db_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("campaign-calls") / "calls.db"


@pytest.fixture(scope="module")
def server(rest_port: int, db_path: Path) -> Iterator[LiveServer]:
    env = server_env(rest_port, ADMIN_API_KEY=ADMIN_KEY, DATABASE_URL=f"sqlite:///{db_path}")
    live = LiveServer(env, db_path.parent)
    yield live
    live.stop()


twilio = scripted_callees({OPTS_OUT: "opt-out", INTERESTED: "interested"})


async def dial(server: LiveServer, twilio: TwilioRestEmulator, to: str) -> str:
    """/dialout to `to` as the summer sale; returns the CallSid once the call is over."""
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(
            f"{server.base_url}/dialout",
            json={"to": to, "parameters": {"campaign_id": "summer_sale"}},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
    assert response.status_code == 201, response.text
    call = await twilio.wait_for_call()
    await call.wait_finished(timeout=90)
    assert call.result is not None and call.result.error is None, call.error or call.result
    return response.json()["call_sid"]


async def record_of(server: LiveServer, call_sid: str) -> dict:
    return await closed_record(server, call_sid, ADMIN_KEY)


def do_not_call(db_path: Path) -> dict[str, str | None]:
    """The do-not-call list, read straight from the server's database: number → source."""
    with sqlite3.connect(db_path) as db:
        return dict(db.execute("SELECT number, source FROM do_not_call").fetchall())


def functions(record: dict) -> list[tuple[str, dict]]:
    entries = [e for e in record["transcript"] if e["kind"] == "function"]
    return [(e["data"]["name"], e["data"]["arguments"]) for e in entries]


# --- end to end ---------------------------------------------------------------------------


async def test_a_callee_who_asks_to_be_removed_is_listed_told_so_and_hung_up_on(
    server: LiveServer, twilio: TwilioRestEmulator, db_path: Path
):
    call_sid = await dial(server, twilio, OPTS_OUT)

    record = await record_of(server, call_sid)
    assert record["end_reason"] == EndReason.OPTED_OUT == "opted out"
    assert functions(record) == [("opt_out", {})]
    assert do_not_call(db_path) == {OPTS_OUT: "opt-out"}
    # What the bot said last, exactly (the "bot says" log), and that the callee heard it
    # before the bot hung up (its closing line waits for Twilio's playback mark).
    said = server.bot_lines(call_sid)
    assert said[-1] == SALE.opt_out_confirmation
    assert "won't be called again" in said[-1]
    assert twilio.calls[call_sid].result.ended_by in ("server", "rest")
    # And it is honoured: the next dial-out to that number is refused, naming the list.
    async with httpx.AsyncClient(timeout=20) as client:
        again = await client.post(
            f"{server.base_url}/dialout",
            json={"to": OPTS_OUT, "parameters": {"campaign_id": "summer_sale"}},
            headers={"Authorization": f"Bearer {DIALOUT_KEY}"},
        )
    assert again.status_code == 403 and "do-not-call" in again.text, again.text


async def test_the_offline_responder_records_an_interested_callee_on_the_call_record(
    server: LiveServer, twilio: TwilioRestEmulator, db_path: Path
):
    call_sid = await dial(server, twilio, INTERESTED)

    record = await record_of(server, call_sid)
    assert record["outcomes"] == {"interested": "yes"}, json.dumps(record["transcript"])
    assert ("record_outcome", {"interested": "yes"}) in functions(record)
    assert record["end_reason"] == "bot ended"  # the callee said goodbye afterwards
    # After recording, the bot answered what the callee said (the rule's answer).
    assert SALE.outcome_rules[1].answer in server.bot_lines(call_sid)
    assert INTERESTED not in do_not_call(db_path)


# --- the record writer's ops ---------------------------------------------------------------


async def test_the_writer_merges_outcomes_and_lists_an_opted_out_number_once(database_url):
    """On SQLite and PostgreSQL: later outcome values replace earlier ones, other fields
    stay; the same number opted out on two calls is listed once, and neither batch fails
    (ON CONFLICT DO NOTHING: a second process listing it at once can't fail ours)."""
    await migrate(database_url)
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    writer = RecordWriter(sessions, queue_size=100, linger_s=0)
    writer.start()
    try:
        writer.outcome("CA1", {"interested": "no"})
        writer.outcome("CA1", {"interested": "yes", "callback_at": "tomorrow"})
        writer.opt_out("CA1", OPTS_OUT)
        await writer.flush()
        writer.opt_out("CA2", OPTS_OUT)
        writer.opt_out("CA3", None)  # a withheld number: the record still says why it ended
        await writer.flush()
        assert (writer.written, writer.failed_writes) == (5, 0)
        async with sessions() as session:
            first = await session.get(CallRecord, "CA1")
            third = await session.get(CallRecord, "CA3")
            listed = (await session.scalars(select(DoNotCall))).all()
        assert first.outcomes == {"interested": "yes", "callback_at": "tomorrow"}
        assert first.end_reason == third.end_reason == "opted out"
        assert [(row.number, row.source) for row in listed] == [(OPTS_OUT, "opt-out")]
    finally:
        await writer.close()
        await engine.dispose()


def test_the_number_to_list_is_the_other_party_and_only_a_real_number():
    outbound = {"call_type": "outbound", "called_number": OPTS_OUT, "caller_id": "+15550001111"}
    assert other_party(CallSession("CA1", "MZ1", outbound)) == OPTS_OUT
    assert other_party(CallSession("CA1", "MZ1", {"caller_id": INTERESTED})) == INTERESTED
    for withheld in ("anonymous", "", "sip:alice@example.com", "client:alice"):
        assert other_party(CallSession("CA1", "MZ1", {"caller_id": withheld})) is None


# --- the responder's rules and the schema the LLM sees -----------------------------------


def reply_to(persona, *messages: dict) -> Reply:
    context = LLMContext(messages=[{"role": "system", "content": "prompt"}, *messages])
    return OfflineResponder(agent=persona).reply_to(context)


HI = {"role": "assistant", "content": "hi"}


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        ("please stop calling me, remove me from your list", Reply("", "opt_out", {})),
        ("don't call me again, bye", Reply("", "opt_out", {})),
        ("yes I would like that", Reply("", "record_outcome", {"interested": "yes"})),
        ("I'm not interested", Reply("", "record_outcome", {"interested": "no"})),
        ("no I don't want it", Reply("", "record_outcome", {"interested": "no"})),
        ("hello back tomorrow", Reply("", "record_outcome", {"callback_at": "tomorrow"})),
        ("sure I have a minute", Reply(SALE.answers[0].answer)),
    ],
    ids=["opt-out", "opt-out-goodbye", "yes", "not-interested", "dont-want", "callback", "none"],
)
def test_the_offline_responder_maps_keywords_to_function_calls(said, expected):
    assert reply_to(SALE, HI, {"role": "user", "content": said}) == expected


def test_a_callee_who_opts_out_before_the_opening_is_not_pitched_first():
    said = {"role": "user", "content": "who is this stop calling me"}
    assert reply_to(SALE, said) == Reply("", "opt_out", {})


def test_after_recording_the_responder_answers_instead_of_recording_again():
    call = {"id": "t1", "type": "function", "function": {"name": "record_outcome"}}
    messages = (
        HI,
        {"role": "user", "content": "yes I would like that"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "t1", "content": json.dumps({"status": "recorded"})},
    )
    assert reply_to(SALE, *messages) == Reply(SALE.outcome_rules[1].answer or "")


def test_record_outcome_offers_the_persona_fields_and_refuses_others():
    schema = record_outcome_tool(SALE)
    assert schema is not None and schema.name == "record_outcome"
    assert schema.properties["interested"]["enum"] == ["yes", "no"]
    assert "enum" not in schema.properties["callback_at"]  # free text
    assert record_outcome_tool(shipped_agent("support")) is None
    assert outcome_problems(SALE, {"interested": "yes", "callback_at": "friday 10am"}) == []
    assert outcome_problems(SALE, {"interested": "maybe"}) == [
        "interested must be one of ['yes', 'no'], not 'maybe'"
    ]
    assert "unknown outcome field 'budget'" in outcome_problems(SALE, {"budget": "1"})[0]
    names = [t.name for t in call_tools(make_settings(), None, SALE)]
    assert names == ["end_call", "opt_out", "record_outcome"]
    assert OPT_OUT_TOOL.name in [t.name for t in call_tools(make_settings(), None)]
