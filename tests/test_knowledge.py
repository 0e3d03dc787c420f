"""An agent's knowledge: split into passages, ranked with FTS5, given to the LLM (in the
prompt when small, through `search_knowledge` when big), and answered from offline.

Two whole calls close the file: with no keys, the shipped general agent answers a caller's
question from its FAQ (agents/knowledge/acme-faq.md); in instant-AI mode, the emulated LLM
calls `search_knowledge` on an agent whose manual is too big for the prompt, and the
passage it gets back is spoken and recorded in the call's transcript.
"""

from __future__ import annotations

import difflib
import json
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from pipecat.processors.aggregators.llm_context import LLMContext

from phonebot.agents.agent import Agent, opening_line
from phonebot.agents.knowledge import (
    PASSAGE_CHARS,
    PHONE_ANSWER_CHARS,
    PROMPT_CHARS,
    SEARCH_KNOWLEDGE,
    KnowledgeBase,
    Passage,
    search_terms,
    split_passages,
)
from phonebot.agents.loader import load_agents
from phonebot.ai.offline import piper_voice
from phonebot.ai.offline.responder import OFFLINE_FALLBACK, OfflineResponder, Reply
from phonebot.ai.offline.stt import normalize_transcript, transcribe
from phonebot.call.knowledge_search import NOTHING_FOUND, register_knowledge_search
from phonebot.call.tools import call_tools
from phonebot.config import SHIPPED_AGENTS_DIR
from phonebot.emulator import Hangup, TwilioRestEmulator, WaitForBot
from phonebot.emulator.caller_voice import caller_pcm
from phonebot.records.call_log import CallLog
from tests.conftest import make_settings, shipped_agent
from tests.live_server import (
    LiveServer,
    ai_api_process,
    free_port,
    instant_services_env,
    twilio_for,
)
from tests.test_calls import CALLER, call_in, dialin_opening, say, server_env
from tests.test_records_calls import ADMIN_KEY, record_of

FAQ = SHIPPED_AGENTS_DIR / "knowledge" / "acme-faq.md"
DELIVERY = (
    "Standard delivery takes three to five working days and is free on orders over fifty "
    "dollars. Express delivery arrives the next working day for nine dollars."
)


@pytest.fixture(scope="module")
def faq() -> KnowledgeBase:
    return KnowledgeBase.from_files([FAQ])


def headings(passages: list[Passage]) -> list[str]:
    return [passage.heading for passage in passages]


# ------------------------------------------------------------------------------ splitting


def test_markdown_sections_become_passages_under_their_headings():
    text = textwrap.dedent("""\
        Opening words before any heading.

        # Shop
        ## Opening hours ##
        Nine to six,
        weekdays.

        ### Empty section
        ## Returns
        Thirty days.
        """)
    passages = split_passages(text, "shop.md")

    assert passages == [
        Passage("", "Opening words before any heading.", "shop.md"),
        Passage("Shop", "", "shop.md"),  # a heading alone is kept: it may be what matches
        Passage("Opening hours", "Nine to six, weekdays.", "shop.md"),
        Passage("Empty section", "", "shop.md"),
        Passage("Returns", "Thirty days.", "shop.md"),
    ]


def test_a_long_section_is_cut_at_paragraphs_under_its_heading():
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(8)]  # ~370 chars each
    passages = split_passages("## Manual\n\n" + "\n\n".join(paragraphs), "manual.md")

    assert len(passages) > 1 and set(headings(passages)) == {"Manual"}
    assert all(len(p.text) <= PASSAGE_CHARS for p in passages)
    # Every paragraph whole, in one passage, in order: cut between paragraphs, never inside.
    joined = [" ".join(p.split()) for p in paragraphs]
    assert " ".join(p.text for p in passages) == " ".join(joined)
    assert all(p.text.startswith("Paragraph") for p in passages)


def test_plain_text_is_split_into_paragraphs():
    text = "Our shop sells tents.\nAnd stoves.\n\n\nWe deliver on Tuesdays.\n"
    assert split_passages(text, "notes.txt") == [
        Passage("", "Our shop sells tents. And stoves. We deliver on Tuesdays.", "notes.txt")
    ]
    long_text = "\n\n".join(f"Note {i}. " + "x " * 300 for i in range(3))
    passages = split_passages(long_text, "notes.txt")
    assert [p.text[:6] for p in passages] == ["Note 0", "Note 1", "Note 2"]


# ------------------------------------------------------------------------------ ranking


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("how long does delivery take", "How long does delivery take?"),
        ("I'd like to send it back, what's your policy on returns", "What is your returns policy?"),
        ("can you repair my tent", "Do you repair tents?"),  # stemmed: tent / tents
        ("where can I park", "Where is your store?"),  # parking, in the text only
        ("GIFT CARDS?", "Do you offer gift cards?"),
    ],
)
def test_bm25_picks_the_passage_that_answers(faq, query, best):
    found = faq.search(query)
    assert found and found[0].heading == best, headings(found)
    assert len(found) <= 3


@pytest.mark.parametrize("query", ["", "what is the how", "  ?!... ---  ", "'\"()*", "and or not"])
def test_stopword_or_punctuation_only_queries_find_nothing(faq, query):
    assert search_terms(query) == []
    assert faq.search(query) == []
    assert faq.best_match(query) is None


@pytest.mark.parametrize(
    "query",
    [
        'delivery "take',  # an unbalanced quote
        '"delivery" AND take',
        "delivery OR NOT take",
        "NEAR(delivery take, 2)",
        "deliv* take*",
        "(delivery) (take",
        "heading: delivery ^take",
        "delivery + take - {heading text}: col",
        "delivery \x00 take",
    ],
)
def test_fts5_syntax_in_a_query_cannot_break_the_search(faq, query):
    found = faq.search(query)  # raises sqlite3.OperationalError if FTS5 read the syntax
    assert found and found[0].heading == "How long does delivery take?"


def test_search_terms_drop_stopwords_and_keep_word_stems():
    assert search_terms("What's the store's address? Don't you deliver?") == [
        "store",
        "address",
        "deliver",
    ]
    assert search_terms("Ölpreis café ÉTÉ") == ["ölpreis", "café", "été"]  # any script


# ------------------------------------------------------------------------------ the LLM


def big_knowledge(tmp_path: Path) -> KnowledgeBase:
    manual = tmp_path / "manual.md"
    manual.write_text(MANUAL, encoding="utf-8")
    return KnowledgeBase.from_files([manual])


def test_small_knowledge_goes_in_the_prompt_with_no_search_tool():
    general = shipped_agent("general")
    assert general.knowledge is not None and not general.knowledge.searched()

    assert DELIVERY in general.system_prompt()
    assert "How long does delivery take?" in general.system_prompt()
    tools = [schema.name for schema in call_tools(make_settings(), None, general)]
    assert SEARCH_KNOWLEDGE not in tools


def test_big_knowledge_is_searched_with_the_tool_and_not_in_the_prompt(tmp_path):
    knowledge = big_knowledge(tmp_path)
    assert knowledge.size() > PROMPT_CHARS and knowledge.searched()
    agent = replace(shipped_agent("general"), knowledge=knowledge)

    assert "seven year warranty" not in agent.system_prompt()
    assert "What you know" not in agent.system_prompt()
    schemas = {schema.name: schema for schema in call_tools(make_settings(), None, agent)}
    assert schemas[SEARCH_KNOWLEDGE].required == ["query"]


class RegisteringLLM:
    """Stands in for the LLM service: keeps what the call registers on it."""

    def __init__(self) -> None:
        self.functions: dict[str, object] = {}

    def register_function(self, name: str, handler: object) -> None:
        self.functions[name] = handler


class TranscriptWriter:
    """Stands in for the records writer: keeps the transcript lines a `CallLog` writes."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def transcript(self, call_sid: str, kind: str, text: str, **fields) -> None:
        self.lines.append((kind, text, fields.get("data")))


async def search_on_a_call(knowledge: KnowledgeBase | None, arguments: dict):
    """Register the function as a call does, call it as Pipecat does; what came back."""
    llm, writer = RegisteringLLM(), TranscriptWriter()
    register_knowledge_search(llm, knowledge, CallLog(writer, "CA" + "1" * 32))
    if SEARCH_KNOWLEDGE not in llm.functions:
        return None, writer.lines
    results: list = []

    async def result_callback(result, properties=None) -> None:
        results.append(result)

    params = SimpleNamespace(arguments=arguments, result_callback=result_callback)
    await llm.functions[SEARCH_KNOWLEDGE](params)
    return results, writer.lines


async def test_search_knowledge_returns_the_best_three_passages_and_records_them(tmp_path):
    results, lines = await search_on_a_call(
        big_knowledge(tmp_path), {"query": "how long is the kettle warranty"}
    )

    [result] = results
    passages = result["passages"]
    assert 1 <= len(passages) <= 3 and "note" not in result
    assert passages[0] == {
        "heading": "Warranty",
        "text": WARRANTY,
        "source": "manual.md",
    }
    [(kind, text, data)] = lines
    assert (kind, text) == ("function", SEARCH_KNOWLEDGE)
    assert data.pop("duration_s") >= 0  # how long the search took, as for every tool
    assert data == {
        "name": SEARCH_KNOWLEDGE,
        "arguments": {"query": "how long is the kettle warranty"},
        "result": result,
    }


@pytest.mark.parametrize("arguments", [{"query": "who won the match"}, {"query": 42}, {}])
async def test_search_knowledge_with_no_match_tells_the_llm_to_say_it_does_not_know(
    tmp_path, arguments
):
    results, lines = await search_on_a_call(big_knowledge(tmp_path), arguments)

    assert results == [{"passages": [], "note": NOTHING_FOUND}]
    assert "don't know" in NOTHING_FOUND
    assert lines[0][2]["result"] == results[0]


async def test_small_or_no_knowledge_registers_no_search_function():
    assert await search_on_a_call(shipped_agent("general").knowledge, {"query": "x"}) == (None, [])
    assert await search_on_a_call(None, {"query": "x"}) == (None, [])


# ------------------------------------------------------------------------------ offline


def offline_reply(agent: Agent, said: str) -> Reply:
    context = LLMContext(messages=[{"role": "system", "content": "prompt"}])
    context.add_message({"role": "assistant", "content": "Hello, how can I help?"})
    context.add_message({"role": "user", "content": said})
    return OfflineResponder(agent=agent).reply_to(context)


@pytest.mark.parametrize(
    ("said", "answer"),
    [
        ("how long does delivery take", DELIVERY),
        ("how long does delivery you", DELIVERY),  # what the offline STT may hear
        (
            "do you repair tents",
            "Yes. Our workshop repairs tents, sleeping bags and backpacks. A repair usually "
            "takes a week and starts at fifteen dollars.",
        ),
        (
            "what's your returns policy",
            shipped_agent("general").knowledge.search("returns")[0].text,
        ),
    ],
)
def test_offline_a_question_the_knowledge_covers_gets_its_passage(said, answer):
    assert offline_reply(shipped_agent("general"), said) == Reply(answer)


@pytest.mark.parametrize(
    "said",
    [
        "who won the match",
        "I have a question",  # only the FAQ's title (no text) holds "question"
        "is the railway strike over",  # one word of three in a passage is not an answer
        "hello",
    ],
)
def test_offline_an_unrelated_utterance_still_gets_the_offline_fallback(said):
    assert offline_reply(shipped_agent("general"), said) == Reply(OFFLINE_FALLBACK)


def test_offline_the_specific_answers_come_before_the_knowledge():
    general = shipped_agent("general")
    # Its keyword table answers the hours, though the FAQ has a passage on them too.
    hours = offline_reply(general, "what are your opening hours")
    assert hours == Reply(general.answers[0].answer)
    assert offline_reply(general, "delivery takes long, goodbye") == Reply(
        "", "end_call", {"goodbye": general.goodbye}
    )
    assert offline_reply(general, "can a person tell me about delivery") == Reply(
        "", "transfer_call", {}
    )


def test_a_phone_answer_is_a_sentence_or_two_of_plain_speech():
    text = (
        "**Opening**: see [our page](https://example.com/hours) for `hours`. "
        "We open at nine. We close at six. Nobody hears this third sentence."
    )
    assert Passage("H", text, "f.md").phone_answer() == (
        "Opening: see our page for hours. We open at nine."
    )
    assert Passage("H", "- first item - second item", "f.md").phone_answer() == (
        "first item second item"
    )
    rambling = Passage("H", "This goes on " + "and on " * 80 + "forever.", "f.md")
    spoken = rambling.phone_answer()
    assert len(spoken) <= PHONE_ANSWER_CHARS and spoken.endswith(("on...", "and..."))
    long_second = Passage("H", "Short one. " + "Long " * 70 + "two.", "f.md")
    assert long_second.phone_answer() == "Short one."


def test_the_offline_recogniser_hears_the_question_and_the_emulator_the_answer():
    # The caller's question (the emulator's caller voice) and the bot's answer (the bot's
    # voice), both over the phone line, heard by the recogniser the server and the emulator
    # share (Whisper: no vocabulary).
    question = normalize_transcript(transcribe(caller_pcm("How long does delivery take?"), 8000))
    assert question == "how long does delivery take", question
    # The voice's noise off: the same audio every run (with it, tiny.en once heard "three
    # to five" as "35").
    answer = piper_voice.synthesize_at(DELIVERY, 8000, deterministic=True)
    heard = normalize_transcript(transcribe(answer, 8000))
    for fact in ("three to five working days", "fifty dollars", "nine dollars"):
        assert normalize_transcript(fact) in heard, heard
    assert similarity(heard, DELIVERY) > 0.8


def similarity(heard: str, said: str) -> float:
    words = normalize_transcript(said).split()
    return difflib.SequenceMatcher(None, words, heard.split()).ratio()


# ------------------------------------------------------------------------------ whole calls


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def offline_server(
    rest_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`python server.py` with no AI keys and the shipped agents."""
    live = LiveServer(server_env(rest_port), tmp_path_factory.mktemp("offline"))
    yield live
    live.stop()


@pytest.fixture
async def offline_twilio(
    offline_server: LiveServer, rest_port: int
) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(offline_server, rest_port) as emulator:
        yield emulator


async def test_a_no_keys_call_answers_a_question_from_the_faq(offline_server, offline_twilio):
    # The answer is in the log once handed to the TTS: the caller hangs up as it starts.
    question = say("how long does delivery take")
    script = [WaitForBot(), question, WaitForBot(timeout=15, until="speech"), Hangup()]
    result = await call_in(offline_server, offline_twilio, script)

    said = offline_server.bot_lines(result.call_sid)
    assert said == [dialin_opening("general"), DELIVERY], said
    assert said[1].startswith("Standard delivery takes three to five working days")
    assert len(result.bot_utterances) >= 2  # the answer's audio reached the caller
    assert offline_server.error_lines() == []


# The instant-AI call: an agent whose manual is too big for the prompt.
WARRANTY = (
    "Every Kettleworks kettle carries a seven year warranty from the day of purchase. "
    "Keep your receipt: we repair or replace a faulty kettle free of charge."
)
MANUAL = (
    "# Kettleworks manual\n\n## Warranty\n\n"
    + WARRANTY
    + "\n\n"
    + "\n\n".join(
        f"## Model K{i} descaling\n\nDescale the K{i} kettle every {i + 2} weeks with citric "
        "acid. Fill it to the line, boil, leave it for an hour, rinse twice and boil once with "
        "fresh water before you make tea with it again."
        for i in range(20)
    )
)
QUERY = "how long is the kettle warranty"
FRONT_DESK = """\
name: front_desk
default: true
instructions: You answer the phone for Kettleworks.
greeting: Hello, Kettleworks here.
question: How can I help?
knowledge: [manual.md]
"""


@pytest.fixture(scope="module")
def ai_api() -> Iterator[str]:
    with ai_api_process() as url:
        yield url


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AGENTS_DIR whose one agent, the default, has the Kettleworks manual."""
    agents = tmp_path_factory.mktemp("agents")
    (agents / "front_desk.yaml").write_text(FRONT_DESK, encoding="utf-8")
    (agents / "manual.md").write_text(MANUAL, encoding="utf-8")
    return agents


@pytest.fixture(scope="module")
def llm_server(
    ai_api: str, agents_dir: Path, rest_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Instant-AI mode (every provider the AI API emulator) with the Kettleworks agent."""
    agents = agents_dir
    env = server_env(rest_port, AGENTS_DIR=str(agents), ADMIN_API_KEY=ADMIN_KEY)
    live = LiveServer(env | instant_services_env(ai_api), tmp_path_factory.mktemp("llm"))
    yield live
    live.stop()


@pytest.fixture
async def llm_twilio(llm_server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(llm_server, rest_port) as emulator:
        yield emulator


async def test_the_llm_searches_big_knowledge_and_speaks_the_passage(
    llm_server, llm_twilio, ai_api, agents_dir
):
    assert len(MANUAL) > PROMPT_CHARS
    function_call = {"function": SEARCH_KNOWLEDGE, "arguments": {"query": QUERY}}
    async with httpx.AsyncClient(base_url=ai_api, timeout=5) as emulator:
        queued = await emulator.put("/_emulator/replies", json={"replies": [function_call]})
        assert queued.status_code == 200, queued.text
        answer = WaitForBot(timeout=20, until="speech")
        script = [WaitForBot(timeout=20), say(QUERY), answer, Hangup()]
        result = await call_in(llm_server, llm_twilio, script)
        chats = (await emulator.get("/_emulator/chat")).json()

    said = llm_server.bot_lines(result.call_sid)
    assert said[0] == opening_line(
        load_agents(agents_dir, make_settings()).agents[0], {"caller_id": CALLER}
    )
    # The LLM's second answer is the function's result (the emulator reads it back): the
    # warranty passage, found for the LLM's query and handed back to it.
    assert len(said) == 2 and said[1].startswith("Here is what I found: "), said
    assert "seven year warranty" in said[1]
    # What the LLM was given: the function among its tools, the manual not in its prompt.
    answered = next(i for i, chat in enumerate(chats) if chat["messages"][-1]["role"] == "tool")
    asked = chats[answered - 1]  # the request the function call answered
    assert SEARCH_KNOWLEDGE in [tool["function"]["name"] for tool in asked["tools"]]
    assert "seven year warranty" not in json.dumps(asked["messages"])
    tool_message = chats[answered]["messages"][-1]
    assert WARRANTY in tool_message["content"]

    record = await record_of(llm_server, result.call_sid)
    entries = [e for e in record["transcript"] if e["kind"] == "function"]
    assert [e["text"] for e in entries] == [SEARCH_KNOWLEDGE]
    data = entries[0]["data"]
    assert data["name"] == SEARCH_KNOWLEDGE and data["arguments"] == {"query": QUERY}
    assert data["result"]["passages"][0] == {
        "heading": "Warranty",
        "text": WARRANTY,
        "source": "manual.md",
    }
    assert llm_server.error_lines() == []
