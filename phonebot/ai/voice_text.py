"""Voice-ready text: what the LLM writes, cut down to what can be said on a phone line.

Everything the LLM writes is spoken, so before TTS this strips what cannot be spoken —
markdown, emojis and other pictographs, URLs, image references — and expands written
abbreviations ("e.g." → "for example", "Dr. Lee" → "Doctor Lee", "&" → "and"). When something
unspeakable is removed, a warning names the agent whose prompt let it through.

It plugs into Pipecat's text-filter hook: pass ``voice_text_filters(agent)`` as a TTS
service's ``text_filters=``. The service calls the filter on each aggregated sentence (or on
each token in token-streaming mode) just before synthesis; the LLM context keeps the text as
written. Everything here works on one chunk at a time; the only state carried across chunks of a
reply is whether a fenced code block is open and which warnings were already logged. Pipecat
resets that state (``handle_interruption``) at the end of every reply and on interruptions.

Markdown itself is stripped by Pipecat's :class:`~pipecat.utils.text.transforms.StripMarkdown`
(the replacement for the deprecated ``MarkdownTextFilter``); the rest is written here because
Pipecat has nothing for emojis, bare URLs, image tags, abbreviations or markers split across
sentences.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger
from pipecat.utils.text.base_text_filter import BaseTextFilter
from pipecat.utils.text.transforms import StripMarkdown

__all__ = ["VoiceTextFilter", "voice_text_filters"]

# Kinds of unspeakable content, as named in the warnings.
MARKDOWN = "markdown"
URL = "URL"
EMOJI = "emoji"
IMAGE = "image"

EXCERPT_CHARS = 60

# Marks where something was removed until the spacing around it is tidied. A private-use
# character, so it cannot occur in the LLM's text; never handed to Pipecat code.
_GAP = "\uf8fe"

# --- code blocks -------------------------------------------------------------------------------

# A fence: three or more backticks, or a tilde fence at the start of a line, with the line
# break after a closing fence (an opening fence's language tag is inside the block anyway).
_FENCE = re.compile(r"(?:`{3,}|^[ \t]*~{3,})(?:[ \t]*\n)?", re.MULTILINE)
# A backtick run at a line start that reaches the end of the chunk: the sentence aggregator can
# cut a fence in two ("...\n``" then "`\nThat's it."), so this is taken for a whole fence.
_SPLIT_FENCE_END = re.compile(r"(?:^|(?<=\n))[ \t]*`{1,2}\s*$")
_LEADING_TICKS = re.compile(r"^`{1,2}")

# --- images, HTML and links --------------------------------------------------------------------

_MD_IMAGE = re.compile(r"!\[[^\]\n]*\](?:\([^)\n]*\)|\[[^\]\n]*\])")
_HTML_IMAGE = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
# Formatting tags only: a bare "<your name>" placeholder is left alone.
_HTML_TAG = re.compile(
    r"</?(?:a|b|i|u|s|em|strong|br|p|span|div|code|pre|ul|ol|li|h[1-6]|small|sup|sub|mark|hr)"
    r"\b[^>]*>",
    re.IGNORECASE,
)
_HTML_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|nbsp|#39);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": " ", "#39": "'"}
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\(([^)\n]*)\)")

# --- URLs --------------------------------------------------------------------------------------

# Top-level domains a bare "name.tld" must end in to count as a web address. Two-letter codes
# that are also English words ("in", "it", "me", "us", "to", "so", ...) are left out, so
# "called.It was" is never taken for a domain.
_TLDS = (
    "com|org|net|edu|gov|mil|int|io|co|ai|app|dev|info|biz|tv|ly|gg|xyz|shop|store|site|"
    "online|tech|uk|ca|de|fr|es|nl|eu|au|nz|ch|se|ie|jp|cn|br|mx|ru"
)
_URL_CHARS = r"[^\s<>\"'`\[\]{}|\\^]"
_URL = re.compile(
    r"<(?:https?|ftp)://[^>\s]+>"  # autolink
    rf"|\b(?:https?|ftp)://{_URL_CHARS}+"
    rf"|\bwww\.{_URL_CHARS}+"
    # A bare domain (not part of an e-mail address or a longer dotted word), optional path.
    rf"|(?<![@\w.-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+(?:{_TLDS})(?![\w-])"
    rf"(?::\d+)?(?:/{_URL_CHARS}*)?",
    re.IGNORECASE,
)
_URL_TRAILING = re.compile(r"[.,!?;:)\]'\"]+$")

# --- markdown leftovers ------------------------------------------------------------------------

_HEADER = re.compile(r"^[ \t]*#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_UNICODE_BULLET = re.compile(r"^([ \t]*)[•◦▪▫‣⁃∙·][ \t]*", re.MULTILINE)
# Emphasis markers StripMarkdown leaves when bold or italic text spans two sentences
# ("**very important." + "Really** important."), plus stray strikethrough and fences.
_STRAY_MARKERS = re.compile(
    r"\*{2,}|_{2,}|~{2,}|`+"
    r"|(?<![\w*])\*(?=[A-Za-z])"  # "*word": an opening italic marker
    r"|(?<=[A-Za-z.!?,;:])\*(?![\w*])"  # "word*": a closing one
)

# --- emojis and pictographs --------------------------------------------------------------------

_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # mahjong, cards, enclosed, pictographs, emoticons, transport...
    "\u2300-\u23ff"  # misc technical (⌚ ⏰ ⏳)
    "\u25a0-\u25ff"  # geometric shapes (▶ ● ◆)
    "\u2600-\u27bf"  # misc symbols and dingbats (☀ ☎ ✅ ✔ ❤ ✨ ⚠)
    "\u2b00-\u2bff"  # misc symbols and arrows (⬆ ⭐ ⭕)
    "\u3030\u303d\u3297\u3299"
    "\ufe0e\ufe0f\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "\U000e0020-\U000e007f"  # tag characters (subdivision flags)
    "]+"
)

# --- abbreviations and symbols -----------------------------------------------------------------

# A street address up to the abbreviation: "221 Baker ", "12 W. Oak ".
_ADDRESS_BEFORE = re.compile(r"\b\d+[A-Za-z]?(?:[ \t]+[A-Z][\w'-]*\.?){1,3}[ \t]+$")
_STREET_TYPES = {"St": "Street", "Ave": "Avenue", "Rd": "Road", "Blvd": "Boulevard", "Dr": "Drive"}
_STREET = re.compile(r"\b(St|Ave|Rd|Blvd|Dr)\.")
_TITLES = {"Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Dr": "Doctor"}
# A title only before a name, so "Mr." with nothing after it is left to the TTS.
_TITLE = re.compile(r"\b(Mr|Mrs|Ms|Dr)\.(?=[ \t]+[A-Z])")
# "St." before a name is "Saint" only at a sentence start or after a lowercase word or a comma
# ("in St. Louis"); after a capitalised word it may be a street name, so it is left alone.
_SAINT = re.compile(r"(?:^|(?<=[a-z,;:(][ \t])|(?<=[.!?][ \t]))St\.(?=[ \t]+[A-Z])", re.MULTILINE)
# Followed by the end of the chunk or a new sentence, the abbreviation's period also ended the
# sentence and is kept.
_END_OR_NEW_SENTENCE = re.compile(r"[ \t]*(?:$|[A-Z\"'])")

_PHRASES: list[tuple[re.Pattern[str], str, bool]] = [
    # (pattern, spoken form, whether a sentence-ending period may be shared with it)
    (re.compile(r"\b([Ee])\.[ \t]?g\.(?![A-Za-z])"), "for example", False),
    (re.compile(r"\b([Ii])\.[ \t]?e\.(?![A-Za-z])"), "that is", False),
    (re.compile(r"\b([Ee])tc\b\.?"), "et cetera", True),
    # "approx." is rarely the last word of a sentence, but Pipecat's sentence aggregator
    # often cuts after it ("It takes approx." + "5 minutes."), so no period is added.
    (re.compile(r"\b([Aa])pprox\b\.?"), "approximately", False),
    (re.compile(r"\b([Vv])s\b\.?(?=[ \t])"), "versus", False),
    (re.compile(r"\b([Ww])/o\b"), "without", False),
    (re.compile(r"\b([Ww])/(?=[ \t])"), "with", False),
]
_AMPERSAND = re.compile(r"[ \t]*&[ \t]*")
_PERCENT = re.compile(r"(?<=\S)[ \t]*%|%")
_TILDE_NUMBER = re.compile(r"~[ \t]?(?=\d)")


def _excerpt(text: str, start: int) -> str:
    """At most EXCERPT_CHARS characters of ``text`` from a little before ``start``."""
    begin = max(0, start - 15)
    snippet = " ".join(text[begin : begin + EXCERPT_CHARS].split())
    if begin > 0:
        snippet = "…" + snippet
    if begin + EXCERPT_CHARS < len(text):
        snippet += "…"
    return snippet


def _first_difference(before: str, after: str) -> int:
    for i, (a, b) in enumerate(zip(before, after, strict=False)):
        if a != b:
            return i
    return min(len(before), len(after))


def _keep_case(spoken: str, written: str) -> str:
    return spoken[0].upper() + spoken[1:] if written[:1].isupper() else spoken


class VoiceTextFilter(BaseTextFilter):
    """Strips what cannot be spoken and expands abbreviations, sentence by sentence.

    Works on each chunk the TTS service hands it (a sentence, or a token when streaming tokens)
    without needing the rest of the reply. It removes:

    * markdown — emphasis, headers, list bullets, block quotes, rules, inline code markers (the
      code is kept), fenced code blocks (dropped, even when split over several sentences),
      links (the link text is kept) and formatting HTML tags;
    * images — ``![alt](src)`` and ``<img>``, alt text included;
    * URLs — ``http(s)://…``, ``www.…`` and bare domains such as ``example.com/path`` (e-mail
      addresses are kept);
    * emojis and other pictographs;

    and expands "e.g.", "i.e.", "etc.", "approx.", "vs.", "w/", "w/o", "Mr."/"Mrs."/"Ms."/"Dr."
    before a name, street types after a house number ("12 Elm St." → "12 Elm Street"), "St."
    before a name at a sentence start or after a lowercase word ("Saint"), "&" and "%".
    Ambiguous cases are left to the TTS.

    The first removal of each kind in a reply is logged as a warning naming the agent.
    """

    def __init__(self, agent: str, *, enabled: bool = True) -> None:
        """Create the filter.

        Args:
            agent: Name of the agent whose speech this filters; named in the warnings.
            enabled: Whether to filter at all (can be changed with ``update_settings``).
        """
        super().__init__()
        self._agent = agent
        self._enabled = enabled
        self._strip_markdown = StripMarkdown(strip_urls=False)
        self._in_code_block = False
        self._split_fence = False
        self._warned: set[str] = set()

    @property
    def agent(self) -> str:
        """Name of the agent named in the warnings."""
        return self._agent

    async def update_settings(self, settings: Mapping[str, Any]):
        """Change ``agent`` or ``enabled`` at runtime; other keys are ignored."""
        if "agent" in settings:
            self._agent = str(settings["agent"])
        if "enabled" in settings:
            self._enabled = bool(settings["enabled"])

    async def handle_interruption(self):
        """Forget the reply: an open code block, a split fence and the warnings logged.

        Pipecat's TTS service calls this on an interruption and at the end of every reply.
        """
        self._in_code_block = False
        self._split_fence = False
        self._warned.clear()

    async def reset_interruption(self):
        """Nothing to do: the state was cleared when the interruption was handled."""

    async def filter(self, text: str) -> str:
        """Return ``text`` as it should be spoken."""
        if not self._enabled or not text:
            return text
        original = text
        text = self._remove_code_blocks(text)
        text = self._remove(_MD_IMAGE, text, IMAGE)
        text = self._remove(_HTML_IMAGE, text, IMAGE)
        text = self._unlink(text)
        text = self._remove(_HTML_TAG, text, MARKDOWN)
        text = self._remove(_URL, text, URL, keep=_url_trailing_punctuation)
        text = _HTML_ENTITY.sub(lambda m: _ENTITIES[m.group(1)], text)
        # Gaps are closed before StripMarkdown, which uses private-use characters of its own.
        text = _tidy_gaps(text)
        text = await self._strip_markdown_syntax(text)
        text = _tidy_gaps(self._remove(_EMOJI, text, EMOJI))
        text = _expand_abbreviations(text)
        if text != original:
            logger.trace(f"[{self._agent}] voice text: {original!r} -> {text!r}")
        return text

    # -- removal helpers --------------------------------------------------------------------------

    def _warn(self, kind: str, text: str, start: int) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        logger.warning(
            f"Agent {self._agent!r} wrote unspeakable {kind}; removed it before TTS: "
            f"{_excerpt(text, start)!r}"
        )

    def _remove(
        self,
        pattern: re.Pattern[str],
        text: str,
        kind: str,
        keep: Callable[[str], str] | None = None,
    ) -> str:
        """Replace each match with a gap (plus whatever ``keep`` returns), warning once."""
        match = pattern.search(text)
        if not match:
            return text
        self._warn(kind, text, match.start())
        if keep is None:
            return pattern.sub(_GAP, text)
        return pattern.sub(lambda m: _GAP + keep(m.group(0)), text)

    def _unlink(self, text: str) -> str:
        """``[label](url)`` → ``label``, warned as markdown (the URL is what goes)."""
        match = _MD_LINK.search(text)
        if not match:
            return text
        self._warn(MARKDOWN, text, match.start())
        return _MD_LINK.sub(lambda m: m.group(1) if m.group(1).strip() else _GAP, text)

    def _remove_code_blocks(self, text: str) -> str:
        """Drop fenced code, which may open in one sentence and close several sentences later."""
        if self._split_fence:
            # The rest of a fence cut in two by the sentence aggregator.
            self._split_fence = False
            text = _LEADING_TICKS.sub("", text)
        if not (self._in_code_block or _FENCE.search(text) or _SPLIT_FENCE_END.search(text)):
            return text
        kept: list[str] = []
        position = 0
        warn_at = None
        for fence in _FENCE.finditer(text):
            if not self._in_code_block:
                kept.append(text[position : fence.start()])
                warn_at = fence.start() if warn_at is None else warn_at
            self._in_code_block = not self._in_code_block
            position = fence.end()
        rest = text[position:]
        split = _SPLIT_FENCE_END.search(rest)
        if split:
            if not self._in_code_block:
                warn_at = position + split.start() if warn_at is None else warn_at
                kept.append(rest[: split.start()])
            self._in_code_block = not self._in_code_block
            self._split_fence = True
        elif not self._in_code_block:
            kept.append(rest)
        if warn_at is not None:
            self._warn(MARKDOWN, text, warn_at)
        elif self._in_code_block or split:
            self._warn(MARKDOWN, text, 0)
        return _GAP.join(kept) if len(kept) > 1 else "".join(kept)

    async def _strip_markdown_syntax(self, text: str) -> str:
        """Markdown syntax out, its words in: Pipecat's StripMarkdown plus what it leaves."""
        stripped = _HEADER.sub(_header_as_sentence, text)
        stripped = _UNICODE_BULLET.sub(r"\1", stripped)
        stripped = await self._strip_markdown(stripped, "sentence")
        stripped = _STRAY_MARKERS.sub("", stripped)
        if stripped != text:
            self._warn(MARKDOWN, text, _first_difference(text, stripped))
        return stripped


def _url_trailing_punctuation(url: str) -> str:
    """The sentence punctuation a URL match swallowed, to be put back after the gap."""
    if url.startswith("<"):
        return ""
    trailing = _URL_TRAILING.search(url)
    return trailing.group(0) if trailing else ""


def _header_as_sentence(match: re.Match[str]) -> str:
    """A header read as a sentence of its own, so it is not run into the next line."""
    title = match.group(1).rstrip()
    if title and title[-1] not in ".!?:;,":
        title += "."
    return title


_ASIDE = re.compile(r"[(\[]([^()\[\]\n]*)[)\]]")


def _drop_emptied_aside(match: re.Match[str]) -> str:
    content = match.group(1)
    if _GAP in content and len(content.replace(_GAP, " ").split()) <= 2:
        return _GAP
    return match.group(0)


def _tidy_gaps(text: str) -> str:
    """Close up the spaces around removed content, keeping a chunk's outer whitespace."""
    if _GAP not in text:
        return text
    # Neighbouring gaps ("🎉 🎉") become one first, which keeps the patterns below linear.
    text = re.sub(rf"{_GAP}(?:[ \t]*{_GAP})+", _GAP, text)
    gaps = rf"[ \t]*{_GAP}"
    # A bracketed aside left with a word or two: "(see https://…)" → "".
    text = _ASIDE.sub(_drop_emptied_aside, text)
    # Before punctuation: "Bye 👋." → "Bye."
    text = re.sub(rf"{gaps}[ \t]*(?=[.,!?;:)\]])", "", text)
    # At the end: "Bye 👋" → "Bye", keeping trailing whitespace a token stream relies on.
    text = re.sub(rf"{gaps}(?=[ \t]*$)", "", text, flags=re.MULTILINE)
    # At a line start or after an opening bracket: "👋 Hi" → "Hi".
    text = re.sub(rf"(?:^|(?<=[\n(\[])){gaps}[ \t]*", "", text, flags=re.MULTILINE)
    # Between words: one space.
    text = re.sub(rf"{gaps}[ \t]*", " ", text)
    return text


def _expand_abbreviations(text: str) -> str:
    text = _STREET.sub(_street, text)
    text = _SAINT.sub("Saint", text)
    text = _TITLE.sub(lambda m: _TITLES[m.group(1)], text)
    for pattern, spoken, may_end_sentence in _PHRASES:
        text = pattern.sub(_phrase(spoken, may_end_sentence), text)
    text = _AMPERSAND.sub(_and, text)
    text = _PERCENT.sub(" percent", text)
    text = _TILDE_NUMBER.sub("about ", text)
    return text


def _ends_sentence(match: re.Match[str]) -> bool:
    return match.group(0).endswith(".") and bool(
        _END_OR_NEW_SENTENCE.match(match.string, match.end())
    )


def _street(match: re.Match[str]) -> str:
    if not _ADDRESS_BEFORE.search(match.string, 0, match.start()):
        return match.group(0)
    return _STREET_TYPES[match.group(1)] + ("." if _ends_sentence(match) else "")


def _phrase(spoken: str, may_end_sentence: bool) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        words = _keep_case(spoken, match.group(0))
        return words + "." if may_end_sentence and _ends_sentence(match) else words

    return replace


def _and(match: re.Match[str]) -> str:
    at_start = match.start() == 0
    at_end = match.end() == len(match.string)
    return ("" if at_start else " ") + "and" + ("" if at_end else " ")


def voice_text_filters(agent: str) -> list[BaseTextFilter]:
    """The filters to pass as a TTS service's ``text_filters=`` for ``agent``'s speech."""
    return [VoiceTextFilter(agent)]
