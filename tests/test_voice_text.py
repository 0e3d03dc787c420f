"""Voice-ready text: what reaches TTS is only what can be said on a phone line."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator

import pytest
from loguru import logger
from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.ai.voice_text import EXCERPT_CHARS, VoiceTextFilter, voice_text_filters

# (written by the LLM, spoken on the phone)
CASES = [
    # Plain text, numbers and punctuation are left exactly as they are.
    ("Your table for 2 is booked at 7:30, okay?", "Your table for 2 is booked at 7:30, okay?"),
    ("It costs $1,250.99 (plus tax); call 1-800-555-0199!", None),
    ("Press * then #. 3*4 = 12. It's 25°C outside.", None),
    ("It costs $100000.", None),  # Pipecat's MarkdownTextFilter turns this into "$1."
    ("Email jane.doe@example.com today.", None),
    ("Type <your name> here.", None),
    ("Node.js, file.txt and v1.2.3 stay.", None),
    # Markdown.
    ("**Bold** and *italic* and __strong__ text.", "Bold and italic and strong text."),
    ("## Opening hours\nWe open at 9.", "Opening hours.\nWe open at 9."),
    ("# Hours:\nDaily.", "Hours:\nDaily."),
    ("- first item\n- second item", "first item\nsecond item"),
    ("* star item\n  + nested item", "star item\n  nested item"),
    ("• bullet item", "bullet item"),
    ("1. Call us.", None),
    ("Your code is `AB12`.", "Your code is AB12."),
    ("Run this:\n```python\nprint('hi')\n```\nThat's all.", "Run this:\nThat's all."),
    (
        "See [our hours page](https://example.com/hours) for details.",
        "See our hours page for details.",
    ),
    ("> Quoted text\n---\nAfter the rule.", "Quoted text\nAfter the rule."),
    ("Come ~~Tuesday~~ Wednesday.", "Come Wednesday."),
    ("Hi <b>there</b>, <em>welcome</em>.", "Hi there, welcome."),
    # Emphasis cut in two by the sentence aggregator.
    ("This is **very important.", "This is very important."),
    ("Really** important.", "Really important."),
    # Emojis and pictographs.
    ("Great news 🎉🎉 your order shipped! 👍🏽", "Great news your order shipped!"),
    ("Bye 👋.", "Bye."),
    ("👨\u200d👩\u200d👧 Family plan ✅ ready ⭐", "Family plan ready"),
    ("😀", ""),
    # URLs.
    ("Visit https://example.com/hours?day=mon today.", "Visit today."),
    ("Go to http://example.com.", "Go to."),
    ("Or www.shop.example.co.uk/a, or not.", "Or, or not."),
    ("See example.com/path for more.", "See for more."),
    ("Go to <https://x.com> now.", "Go to now."),
    ("Plans (see https://x.com/plans) start at 5.", "Plans start at 5."),
    (
        "Plans (listed at https://x.com/plans on our site) start at 5.",
        "Plans (listed at on our site) start at 5.",
    ),
    ("[https://example.com](https://example.com)", ""),
    # Images.
    ("![Our logo](https://x.com/logo.png) Welcome.", "Welcome."),
    ("<img src='a.png' alt='Logo'> Hi.", "Hi."),
    ("Here ![map][1] it is.", "Here it is."),
    # Abbreviations and symbols.
    (
        "Bring ID, e.g. a passport, i.e. photo ID.",
        "Bring ID, for example a passport, that is photo ID.",
    ),
    ("E.g. this one.", "For example this one."),
    ("Apples, pears, etc.", "Apples, pears, et cetera."),
    ("Apples, pears, etc. and more.", "Apples, pears, et cetera and more."),
    ("It takes approx. 5 minutes.", "It takes approximately 5 minutes."),
    ("Home vs. away.", "Home versus away."),
    ("Come w/ ID, w/o a bag.", "Come with ID, without a bag."),
    ("Mr. Smith, Mrs. Jones and Ms. Wu.", "Mister Smith, Missus Jones and Miz Wu."),
    ("Ask Dr. Lee.", "Ask Doctor Lee."),
    ("I live at 221 Baker St. Call me.", "I live at 221 Baker Street. Call me."),
    ("It's at 12 Oak Dr., on the left.", "It's at 12 Oak Drive, on the left."),
    ("We met in St. Louis.", "We met in Saint Louis."),
    ("Visit Main St. today.", None),  # ambiguous: left to the TTS
    ("Tom & Jerry, AT&T, Q&A.", "Tom and Jerry, AT and T, Q and A."),
    ("We are 50% sure, 100 % done.", "We are 50 percent sure, 100 percent done."),
    ("It is ~20 minutes away.", "It is about 20 minutes away."),
    ("Fish &amp; chips.", "Fish and chips."),
    # Whitespace at the edges matters when tokens are streamed.
    (" streaming ", None),
    ("**", ""),
]


@pytest.mark.parametrize(("written", "spoken"), CASES)
@pytest.mark.asyncio
async def test_voice_text(written: str, spoken: str | None) -> None:
    expected = written if spoken is None else spoken
    assert await VoiceTextFilter("support").filter(written) == expected


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


@pytest.mark.asyncio
async def test_removals_are_warned_once_per_kind_with_the_agent(
    warnings_logged: list[str],
) -> None:
    f = VoiceTextFilter("billing-agent")
    await f.filter("Hello there, how are you today?")
    assert warnings_logged == []

    long_url = "https://example.com/" + "a" * 200
    await f.filter(f"**Hi** 😀😀 see {long_url} or www.x.com 🎉 ![logo](x.png).")
    await f.filter("More 🎉 and https://example.org and *this*.")
    assert len(warnings_logged) == 4
    assert all("'billing-agent'" in m for m in warnings_logged)
    kinds = {
        kind: m
        for m in warnings_logged
        for kind in ("markdown", "emoji", "URL", "image")
        if f" {kind};" in m
    }
    assert set(kinds) == {"markdown", "emoji", "URL", "image"}
    assert "https://example.com/aaa" in kinds["URL"]
    for message in warnings_logged:
        excerpt = message.split("before TTS: ", 1)[1].strip("'")
        assert len(excerpt) <= EXCERPT_CHARS + 2  # two ellipses at most

    # A new reply (Pipecat resets filters at its end) is warned about again.
    await f.handle_interruption()
    await f.filter("Thanks 👍")
    assert len(warnings_logged) == 5 and "emoji" in warnings_logged[-1]


@pytest.mark.asyncio
async def test_abbreviations_alone_are_not_warned(warnings_logged: list[str]) -> None:
    f = VoiceTextFilter("support")
    assert (
        await f.filter("Dr. Lee & Mr. Li, e.g. now.")
        == "Doctor Lee and Mister Li, for example now."
    )
    assert warnings_logged == []


@pytest.mark.asyncio
async def test_code_block_spanning_sentences_is_dropped() -> None:
    f = VoiceTextFilter("support")
    # How Pipecat's sentence aggregator actually cuts a reply with a code block: the closing
    # fence itself is split over two sentences.
    chunks = ["Here:\n```python\nprint('x').", "y = 1.", "z = 2.\n``", "`\nThat's it."]
    spoken = [await f.filter(chunk) for chunk in chunks]
    assert spoken == ["Here:\n", "", "", "\nThat's it."]


@pytest.mark.asyncio
async def test_unclosed_code_block_ends_with_the_reply() -> None:
    f = VoiceTextFilter("support")
    assert await f.filter("Try:\n```\nrm -rf /.") == "Try:\n"
    assert await f.filter("Still code.") == ""
    await f.handle_interruption()  # what Pipecat's TTS does at the end of a reply
    assert await f.filter("Next reply.") == "Next reply."


@pytest.mark.asyncio
async def test_settings_update_and_disable() -> None:
    f = VoiceTextFilter("support")
    await f.update_settings({"agent": "sales", "unknown": 1})
    assert f.agent == "sales"
    await f.update_settings({"enabled": False})
    assert await f.filter("**Hi** 😀") == "**Hi** 😀"


def test_factory_returns_one_voice_filter_for_the_agent() -> None:
    filters = voice_text_filters("support")
    assert len(filters) == 1
    assert isinstance(filters[0], VoiceTextFilter) and filters[0].agent == "support"


class RecordingTTS(OfflineTTSService):
    """The offline espeak-ng voice, noting the text each synthesis call is given."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spoken: list[str] = []

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        self.spoken.append(text)
        async for frame in super().run_tts(text, context_id):
            yield frame


@pytest.mark.asyncio
async def test_tts_service_speaks_the_cleaned_text(warnings_logged: list[str]) -> None:
    tts = RecordingTTS(text_filters=voice_text_filters("support"), chunk_ms=20)
    reply = (
        "## Your order\n**Good news** 🎉! It ships e.g. tomorrow. "
        "Track it at https://example.com/track?id=42. "
        "Call Dr. Lee & ask for approx. 10% off."
    )
    tokens = [reply[i : i + 7] for i in range(0, len(reply), 7)]  # as an LLM streams it
    down, _ = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            *[LLMTextFrame(token) for token in tokens],
            LLMFullResponseEndFrame(),
            TTSSpeakFrame("Bye 👋, see www.example.com!"),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=8000),
    )
    spoken = " ".join(" ".join(tts.spoken).split())
    assert spoken == (
        "Your order. Good news! It ships for example tomorrow. Track it at. "
        "Call Doctor Lee and ask for approximately 10 percent off. Bye, see!"
    )
    for unspeakable in ("#", "*", "🎉", "👋", "http", "www", "e.g.", "&", "%"):
        assert unspeakable not in spoken
    assert any(isinstance(f, TTSAudioRawFrame) for f in down)
    # One warning per kind for the reply, and again for the separate spoken message.
    assert sorted(m.split(" wrote unspeakable ")[1].split(";")[0] for m in warnings_logged) == [
        "URL",
        "URL",
        "emoji",
        "emoji",
        "markdown",
    ]
    assert all(m.startswith("Agent 'support' ") for m in warnings_logged)
