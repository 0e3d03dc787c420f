"""Transcripts that say what was said: a bot turn cut off by the caller, or by a hang-up,
keeps its whole text, how much of it was heard, and the page strikes out the rest. And the
bot remembers it: the words spoken before the cut are an assistant message in the LLM's
context, so a greeting the caller talked over is not said again.

The ledger, the heard words and the call log are checked without a server; whole calls
(the real server, the Twilio emulator, the offline engines; once with the AI API emulator
as the LLM, to read what the LLM was asked) check the record and the context end to end,
with figures compared to what the emulator itself played, never to fixed seconds (the
offline voice and its speed may change); the page is rendered in process.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pipecat.frames.frames import (
    AggregatedTextFrame,
    AggregatedTextProgressFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test
from pipecat.utils.text.base_text_aggregator import TextType

from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.call.playout import HeardTurns, heard_speech, heard_text, words_within
from phonebot.emulator import Hangup, Pause, TwilioRestEmulator, WaitForBot
from phonebot.records.call_log import CallLog, HeardSpeech
from phonebot.twilio.transport import PlayoutLedger, SpokenContext, SpokenPart
from tests.browser import records_app
from tests.conftest import make_settings, shipped_agent
from tests.live_server import LiveServer, ai_api_process, records_server, twilio_for
from tests.test_calls import call_in, dialin_opening, say
from tests.test_records_calls import ADMIN_KEY, record_of, records_env

RATE = 8000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def said(context_id: str, text: str, seconds: float, *, complete: bool = True) -> list:
    """What a TTS sends the output for one sentence: its text, its audio, then (once all
    its audio is made) the text again behind it."""
    announced = AggregatedTextFrame(text, TextType.SENTENCE, context_id=context_id)
    announced.will_be_spoken = True
    audio = TTSAudioRawFrame(bytes(round(seconds * RATE) * 2), RATE, 1, context_id=context_id)
    done = TTSTextFrame(text, TextType.SENTENCE, context_id=context_id)
    return [announced, audio, *([done] if complete else [])]


def timed(context_id: str, text: str, seconds: float) -> list:
    """What a TTS that times its words sends the output for one sentence: its text, its
    audio, then each word with the progress through the sentence it makes."""
    announced, audio, _ = said(context_id, text, seconds)
    frames, words = [announced, audio], text.split()
    for i, word in enumerate(words):
        frames.append(TTSTextFrame(word, TextType.WORD, context_id=context_id))
        frames.append(AggregatedTextProgressFrame(
            segment_id=announced.id, context_id=context_id, text=text,
            text_type=TextType.SENTENCE, accumulated_text=" ".join(words[: i + 1]),
            remaining_text="".join(f" {w}" for w in words[i + 1 :]),
        ))  # fmt: skip
    return frames


def play(ledger: PlayoutLedger, clock: Clock, context_id: str, seconds: float) -> None:
    """The output sends `seconds` of the context in 100 ms chunks, twice as fast as real
    time (Pipecat's websocket output runs ahead of the audio; this makes it plain)."""
    ledger.left(TTSStartedFrame(context_id=context_id))
    for _ in range(round(seconds * 10)):
        ledger.wrote(0.1)
        clock.now += 0.05


# --- the ledger and the heard words, without a server ------------------------------------


def test_what_was_heard_is_what_twilio_played_before_the_cut() -> None:
    clock = Clock()
    ledger = PlayoutLedger(clock)
    for frame in [TTSStartedFrame(context_id="a"), *said("a", "One two three four.", 2.0),
                  *said("a", "Five six.", 1.0)]:  # fmt: skip
        ledger.saw(frame)
    play(ledger, clock, "a", 3.0)  # all sent by 1.5 s; Twilio plays until 3.0 s
    clock.now = 1.0
    ledger.cut()  # the caller barges in at 1.0 s: Twilio has played 1.0 s of it

    speech = heard_speech([ledger.context("a")], clock.now + 5)
    assert speech == HeardSpeech(
        text="One two three four. Five six.",
        heard_text="One two",  # half of the first sentence's audio: its first 9.5 letters
        heard_s=1.0,
        spoken_s=3.0,
        cut=True,
        settled=True,
    )
    assert speech.data() == {"heard_s": 1.0, "heard_text": "One two", "spoken_s": 3.0}


def test_a_turn_heard_to_its_end_is_not_cut_even_if_the_caller_speaks_after() -> None:
    clock = Clock()
    ledger = PlayoutLedger(clock)
    for frame in [TTSStartedFrame(context_id="a"), *said("a", "Hello there.", 1.0)]:
        ledger.saw(frame)
    play(ledger, clock, "a", 1.0)
    ledger.left(TTSStoppedFrame(context_id="a"))
    assert not heard_speech([ledger.context("a")], clock.now).settled  # still playing
    clock.now = 1.2
    ledger.cut()  # the caller's turn starts after the bot's audio ended: nothing to cut

    speech = heard_speech([ledger.context("a")], clock.now)
    assert (speech.cut, speech.settled, speech.heard_text) == (False, True, "Hello there.")
    assert ledger.last_cut == []


def test_a_hang_up_cuts_even_uninterruptible_speech() -> None:
    clock = Clock()
    ledger = PlayoutLedger(clock)
    start = TTSStartedFrame(context_id="bye")
    start.interruptible = False
    for frame in [start, *said("bye", "Thanks for calling, goodbye.", 2.0)]:
        ledger.saw(frame)
    play(ledger, clock, "bye", 2.0)
    ledger.cut()  # a barge-in does not stop it
    assert ledger.context("bye").cut_at is None
    ledger.cut(hang_up=True)
    assert heard_speech([ledger.context("bye")], 9.0).heard_s == pytest.approx(1.0)


def test_heard_words_are_a_prefix_that_grows_with_the_audio() -> None:
    context = SpokenContext("a", [SpokenPart("Of course, I can help with that.", 2.0, True),
                                  SpokenPart("What is your order number?", 1.5, True)])  # fmt: skip
    heard = [heard_text(context, tenths / 10) for tenths in range(0, 40)]
    assert all(context.text.startswith(h) for h in heard)
    assert heard == sorted(heard, key=len)  # never fewer words for more audio
    assert heard[0] == "" and heard[-1] == context.text
    assert heard_text(context, 2.0) == "Of course, I can help with that."
    assert words_within("Of course, I can help", 0.5) == "Of course,"  # a word counts whole


def test_text_whose_audio_was_not_all_made_is_timed_by_its_length() -> None:
    """Cut while the TTS was still making a sentence: its length says how long it lasts."""
    clock = Clock()
    ledger = PlayoutLedger(clock)
    text = "I see you're calling from the number ending in four three two one."  # 67 letters
    for frame in [TTSStartedFrame(context_id="a"), *said("a", text, 1.0, complete=False)]:
        ledger.saw(frame)
    play(ledger, clock, "a", 1.0)
    clock.now = 1.0
    ledger.cut()

    speech = heard_speech([ledger.context("a")], clock.now, ledger.chars_per_s())
    assert speech.spoken_s == pytest.approx(len(text) / 15, abs=0.01)  # not the 1.0 s made
    assert speech.heard_text == "I see you're"  # about a quarter, not all of it


def test_a_sentence_whose_words_are_timed_is_measured_once_its_last_word_is() -> None:
    """The offline voice times its words: a sentence it has made all of lasts as long as
    its audio, not as long as its length says (this voice speaks faster than that)."""
    clock = Clock()
    ledger = PlayoutLedger(clock)
    first = "Hello there, how are you doing?"  # 31 letters: 2.1 s by length, 1.5 s made
    frames = [TTSStartedFrame(context_id="a"), *timed("a", first, 1.5),
              *timed("a", "I can help with that.", 1.2)]  # fmt: skip
    for frame in frames:
        ledger.saw(frame)
    play(ledger, clock, "a", 2.7)
    clock.now = 1.55
    ledger.cut()  # the caller barges in just after the first sentence

    speech = heard_speech([ledger.context("a")], clock.now, ledger.chars_per_s())
    assert all(part.complete for part in ledger.context("a").parts)
    assert speech.spoken_s == pytest.approx(2.7)
    assert speech.heard_text == first  # all of it played, so all of it heard


async def test_the_offline_voice_tells_the_output_all_it_made() -> None:
    """The real service's frames, as the output sees them: each sentence complete, lasting
    exactly the audio made of it."""
    text = "Thanks for calling. We open at nine every morning. Is there anything else?"
    down, _ = await run_test(
        OfflineTTSService(chunk_ms=40),
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    ledger = PlayoutLedger(Clock())
    for frame in down:
        ledger.saw(frame)
    (context_id,) = {f.context_id for f in down if isinstance(f, TTSAudioRawFrame)}
    (part,) = ledger.context(context_id).parts  # a TTSSpeakFrame is one text
    made_s = sum(len(f.audio) / 2 / RATE for f in down if isinstance(f, TTSAudioRawFrame))
    assert (part.text, part.complete) == (text, True)
    assert part.lasts_s(ledger.chars_per_s()) == pytest.approx(made_s)


# --- which contexts make a turn ------------------------------------------------------------


def test_a_turn_is_the_contexts_the_aggregator_saw_between_its_start_and_its_end() -> None:
    clock = Clock()
    ledger = PlayoutLedger(clock)
    turns = HeardTurns(ledger)
    for frame in [TTSStartedFrame(context_id="a"), *said("a", "Sure, one moment.", 1.0),
                  TTSStartedFrame(context_id="b"), *said("b", "Here it is.", 1.0)]:  # fmt: skip
        ledger.saw(frame)
    play(ledger, clock, "a", 1.0)
    for frame in [LLMFullResponseStartFrame(), TTSStartedFrame(context_id="a")]:
        turns._on_frame(None, frame)  # type: ignore[arg-type]
    turns._on_frame(None, InterruptionFrame())  # type: ignore[arg-type]
    # A reply whose start never reached the aggregator before the next interruption
    ledger.cut()
    turns._on_frame(None, LLMFullResponseStartFrame())  # type: ignore[arg-type]
    turns._on_frame(None, LLMFullResponseEndFrame())  # type: ignore[arg-type]

    first = turns.turn_stopped(interrupted=True)
    assert first is not None and first().text == "Sure, one moment."
    second = turns.turn_stopped(interrupted=True)  # no context of its own: the one cut next
    assert second is not None and second().text == "Here it is."
    assert turns.turn_stopped(interrupted=False) is None


# --- the call log ------------------------------------------------------------------------


class FakeWriter:
    def __init__(self) -> None:
        self.lines: list[tuple] = []

    def transcript(self, call_sid, kind, text=None, **fields) -> None:
        self.lines.append((kind, text, fields.get("interrupted"), fields.get("data")))

    def call_ended(self, call_sid, **fields) -> None:
        self.lines.append(("ended",))


def speech(heard: str, cut: bool, settled: bool = True) -> HeardSpeech:
    return HeardSpeech("Hello there. How can I help?", heard, 1.2, 3.0, cut, settled)


def test_a_cut_turn_keeps_its_whole_text_and_says_what_was_heard() -> None:
    writer = FakeWriter()
    log = CallLog(writer, "CA1")  # type: ignore[arg-type]
    log.bot_turn("", interrupted=True, heard=lambda: speech("Hello", cut=True))
    assert writer.lines == [
        ("bot", "Hello there. How can I help?", True,
         {"heard_s": 1.2, "heard_text": "Hello", "spoken_s": 3.0}),
    ]  # fmt: skip


def test_a_turn_still_playing_waits_for_the_next_line_then_says_how_it_ended() -> None:
    writer = FakeWriter()
    log = CallLog(writer, "CA1")  # type: ignore[arg-type]
    now: list[HeardSpeech] = [speech("Hello there.", cut=False, settled=False)]
    log.bot_turn("Hello there. How can I help?", heard=lambda: now[0])
    assert writer.lines == []  # Pipecat reported it sent; Twilio is still playing it
    now[0] = speech("Hello there.", cut=True)  # then the caller barged in
    log.caller_turn("wait")
    assert writer.lines == [
        ("bot", "Hello there. How can I help?", True,
         {"heard_s": 1.2, "heard_text": "Hello there.", "spoken_s": 3.0}),
        ("caller", "wait", None, None),
    ]  # fmt: skip
    log.bot_turn("Fine.", heard=lambda: speech("", cut=False, settled=False))
    log.ended("caller hung up")
    assert writer.lines[2:] == [("bot", "Fine.", False, None), ("ended",)]


# --- the page ------------------------------------------------------------------------------


CUT_SID = "CA" + "c" * 32


async def _seed_cut_call(records) -> None:
    writer = records.writer
    writer.call_started(CUT_SID, direction="inbound", from_number="+15550111111")
    heard = {"heard_s": 1.4, "heard_text": "Hello, you reached", "spoken_s": 3.9}
    writer.transcript(CUT_SID, "bot", "Hello, you reached Acme support. How can I help?",
                      at_s=0.2, interrupted=True, data=heard)  # fmt: skip
    writer.transcript(CUT_SID, "caller", "Where is my order?", at_s=1.5)
    writer.call_ended(CUT_SID, end_reason="caller hung up", duration_s=3.0)
    await writer.flush()


def test_the_page_strikes_out_what_the_caller_did_not_hear(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'calls.db'}",
                             admin_api_key=ADMIN_KEY)  # fmt: skip
    with TestClient(records_app(settings, _seed_cut_call), follow_redirects=False) as client:
        client.post("/calls/ui/login", data={"key": ADMIN_KEY})
        page = client.get(f"/calls/ui/{CUT_SID}").text

    bubble = re.search(r'data-seq="0">(.*?)</li>', page, re.S)
    assert bubble is not None, page
    html = " ".join(bubble.group(1).split())
    assert ('<span class="heard">Hello, you reached</span> '
            '<del class="unheard" title="not heard: cut off">Acme support. How can I help?</del>'
            ) in html  # fmt: skip
    assert "heard 1.4 of 3.9 s" in html
    assert "<del" not in page.split('data-seq="1"')[1]  # the caller's line is as it was


# --- whole calls ---------------------------------------------------------------------------


rest_port, server = records_server("interrupted", ADMIN_API_KEY=ADMIN_KEY)


@pytest.fixture
async def twilio(server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(server, rest_port) as emulator:
        yield emulator


def assert_heard_part_of(entry: dict, text: str) -> dict:
    """A bot line cut off: the whole `text`, and a heard part that is a strict prefix."""
    assert entry["kind"] == "bot" and entry["interrupted"], entry
    assert entry["text"] == text, entry
    heard = entry["data"]
    assert 0 < heard["heard_s"] < heard["spoken_s"], heard
    assert text.startswith(heard["heard_text"]) and len(heard["heard_text"]) < len(text), heard
    return heard


async def test_a_reply_the_caller_talks_over_keeps_its_text_and_what_was_heard(server, twilio):
    script = [
        WaitForBot(),
        say("I would like to leave a message for the team"),  # the offline answer: ~7 s
        WaitForBot(until="speech", timeout=20),
        Pause(1.2),
        say("wait a moment"),
        WaitForBot(timeout=20),
        Hangup(),
    ]
    result = await call_in(server, twilio, script)
    record = await record_of(server, result.call_sid, timeout_s=15)

    bots = [e for e in record["transcript"] if e["kind"] == "bot"]
    reply_text = server.bot_lines(result.call_sid)[1]  # what the bot handed its TTS
    heard = assert_heard_part_of(bots[1], reply_text)
    # As much as the emulator played of the reply before the caller's speech cleared it.
    barge = next((c for c in result.clears if c.caller_onset and c.dropped > 0), None)
    assert barge is not None, f"no clear cut the reply off: {result.clears}, {record}"
    asked = max(end for start, end in result.caller_segments if end < barge.caller_onset)
    reply_start = min(u.start for u in result.bot_utterances if u.start > asked)
    assert heard["heard_s"] == pytest.approx(barge.t - reply_start, abs=0.4), (heard, barge)
    assert 2 * heard["heard_s"] < heard["spoken_s"]  # cut early in a long answer ...
    assert len(heard["heard_text"]) < len(reply_text) / 2  # ... so most of it unheard
    assert not bots[0]["interrupted"] and bots[0]["data"] is None  # the greeting, all heard
    assert not bots[-1]["interrupted"]  # the answer to "wait a moment", heard to its end
    assert server.error_lines() == []


async def test_talking_over_the_greeting_then_hanging_up_on_the_reply_keeps_both(server, twilio):
    script = [
        WaitForBot(until="speech"),
        Pause(0.6),
        say("hello I have a question"),
        WaitForBot(until="speech", timeout=20),
        Pause(0.8),
        Hangup(),
    ]
    result = await call_in(server, twilio, script)
    record = await record_of(server, result.call_sid, timeout_s=15)

    lines = server.bot_lines(result.call_sid)
    bots = [e for e in record["transcript"] if e["kind"] == "bot"]
    assert [e["kind"] for e in record["transcript"]] == ["bot", "caller", "bot"], record
    greeting = assert_heard_part_of(bots[0], dialin_opening("general"))
    reply = assert_heard_part_of(bots[1], lines[-1])
    assert greeting["heard_s"] < 2.0 and reply["heard_s"] < 3.0  # cut early, both of them
    assert record["end_reason"] == "caller hung up"
    assert server.error_lines() == []


# --- an interrupted turn in the LLM's context -----------------------------------------------

# The caller talks over the greeting, about a second into it, and asks something.
TALK_OVER_THE_GREETING = [
    WaitForBot(until="speech"),
    Pause(0.6),
    say("hello I have a question"),
    WaitForBot(timeout=20),
    Hangup(),
]


def assert_cut_turn(said: str, text: str) -> None:
    """The assistant message of a turn the caller talked over: the words of it spoken
    before the cut, a strict prefix of it (not nothing, not all of it)."""
    said, text = " ".join(said.split()), " ".join(text.split())
    assert said and text.startswith(said) and len(said) < len(text), (said, text)


async def test_a_greeting_the_caller_talks_over_is_not_said_twice(server, twilio):
    """The offline responder greets while its context has no assistant message: the cut
    greeting must be there, or the reply to the caller is the greeting again."""
    result = await call_in(server, twilio, TALK_OVER_THE_GREETING)
    record = await record_of(server, result.call_sid, timeout_s=15)

    opening, agent = dialin_opening("general"), shipped_agent("general")
    lines = server.bot_lines(result.call_sid)
    assert len(lines) == 2 and lines[0] == opening, lines
    assert agent.greeting not in lines[1], lines  # an answer, not a second greeting
    bots = [e for e in record["transcript"] if e["kind"] == "bot"]
    assert_heard_part_of(bots[0], opening)
    assert server.error_lines() == []


@pytest.fixture(scope="module")
def ai_api() -> Iterator[str]:
    with ai_api_process() as url:
        yield url


@pytest.fixture(scope="module")
def llm_server(
    ai_api: str, rest_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The LLM is the AI API emulator (OpenAI's wire format); speech stays offline (no key)."""
    folder = tmp_path_factory.mktemp("interrupted-llm")
    env = records_env(rest_port, f"sqlite:///{folder / 'records.db'}")
    live = LiveServer(env | {"OPENAI_BASE_URL": f"{ai_api}/v1"}, folder)
    yield live
    live.stop()


@pytest.fixture
async def llm_twilio(llm_server: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(llm_server, rest_port) as emulator:
        yield emulator


def assert_heard_words_in_context(said: str, heard: dict) -> None:
    """The words in the context are Pipecat's (the voice's word times against the output's
    clock); the record's heard part is the output's own measure of Twilio's playout. They
    agree to a word or two: a word is in the context once it has begun, heard once it has
    ended."""
    in_context, heard_words = len(said.split()), len(heard["heard_text"].split())
    assert heard_words - 1 <= in_context <= heard_words + 2, (said, heard)


async def test_the_llm_is_asked_with_the_words_of_each_turn_spoken_before_the_cut(
    llm_server, llm_twilio, ai_api
):
    """What the LLM is given after the caller talks over the greeting, then over the
    second sentence of the reply: each cut turn as an assistant message holding the words
    spoken before the cut, then what the caller said."""
    assert any("LLM=openai" in line and "TTS=offline" in line for line in llm_server.logs)
    script = [
        *TALK_OVER_THE_GREETING[:3],
        WaitForBot(until="speech", timeout=20),
        Pause(2.8),  # into the reply's second sentence
        say("wait a moment"),
        WaitForBot(timeout=20),
        Hangup(),
    ]
    result = await call_in(llm_server, llm_twilio, script)
    record = await record_of(llm_server, result.call_sid, timeout_s=15)
    async with httpx.AsyncClient(base_url=ai_api, timeout=5) as emulator:
        chats = (await emulator.get("/_emulator/chat")).json()

    lines = llm_server.bot_lines(result.call_sid)
    asked = chats[-1]["messages"]
    roles = ["system", "assistant", "user", "assistant", "user"]
    assert [m["role"] for m in asked] == roles, asked
    greeting, reply = asked[1]["content"], asked[3]["content"]
    assert_cut_turn(greeting, lines[0])
    assert "question" in asked[2]["content"].lower(), asked
    assert_cut_turn(reply, lines[1])
    first_sentence = lines[1].split(". ")[0] + "."
    assert reply.startswith(first_sentence) and len(reply) > len(first_sentence), reply
    assert "moment" in asked[4]["content"].lower(), asked
    bots = [e for e in record["transcript"] if e["kind"] == "bot"]
    assert_heard_words_in_context(greeting, assert_heard_part_of(bots[0], lines[0]))
    assert_heard_words_in_context(reply, assert_heard_part_of(bots[1], lines[1]))
    assert llm_server.error_lines() == []
