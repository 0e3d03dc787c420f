"""An agent's knowledge: its text and Markdown files, split into passages, searched with FTS5.

SQLite's full-text index ships inside Python's own `sqlite3`, so there is nothing to run or
download: the files are read once at load, each Markdown section (or each paragraph of a
long one) becomes a passage, and `search` ranks passages with BM25 over Porter-stemmed
words. Knowledge small enough to fit (`PROMPT_CHARS`) also goes in the system prompt
whole, so a short FAQ costs the LLM no function call.

With no LLM, `best_match` stands in for the model's judgement: a passage answers a caller
only when it holds most of the words that carry the question's meaning, so "who won the
match" is not answered with the opening hours. `Passage.phone_answer` is the part of it
said on the phone: a sentence or two, never a page.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema

# Knowledge up to this many characters is put in the system prompt as well.
PROMPT_CHARS = 3000
# A section longer than this is split at paragraphs.
PASSAGE_CHARS = 800
MAX_FILE_BYTES = 2_000_000
# An offline answer is at most this long: about fifteen seconds of speech.
PHONE_ANSWER_CHARS = 300
# Words that say nothing about what a caller wants to know, contractions included (a
# caller says "what's", the STT writes it): never searched for, never needed in a match.
STOPWORDS = frozenset(
    re.findall(
        r"[\w']+",
        "a about am an and any are as at be been but by can can't could did do does don't for "
        "from get got had has have he hello her hey hi him how i i'd i'll i'm i've if in is it "
        "it's its just know let's like may me might my need no not now of ok okay on or our "
        "please shall she should so some tell than thank thanks that that's the their them "
        "then there there's these they this those to too uh um up us very want was we we're "
        "were what what's when where which who why will with would yes you you're your",
    )
)
# A word as a caller says it: letters and digits in any script, maybe with an apostrophe
# ("what's"). FTS5's own syntax (quotes, AND/OR/NEAR, `*`, `^`, `:`, parentheses) is
# punctuation or a lower-cased plain word here, and every term is quoted besides.
WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Markdown that a voice must not read out: links (keep their text), emphasis, code
# ticks, and quote marks or list bullets (a passage's lines are joined, so "- a - b").
MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
MARKDOWN_MARKS = re.compile(r"[*_`]+|(?:^|(?<=\s))[-+>]\s+")


SEARCH_KNOWLEDGE = "search_knowledge"
SEARCH_KNOWLEDGE_TOOL = FunctionSchema(
    name=SEARCH_KNOWLEDGE,
    description=(
        "Search what our business has written down (policies, prices, hours, products) "
        "before answering a question about it. Returns the best matching passages."
    ),
    properties={"query": {"type": "string", "description": "The caller's question, in words."}},
    required=["query"],
)


@dataclass(frozen=True)
class Passage:
    """One searchable piece of knowledge: the heading it sits under, its text, its file."""

    heading: str
    text: str
    source: str

    def as_answer(self) -> str:
        """The passage as something to say: its text, the heading only when there is none."""
        return self.text or self.heading

    def as_result(self) -> dict[str, str]:
        """The passage as the `search_knowledge` function returns it to the LLM."""
        return {"heading": self.heading, "text": self.text, "source": self.source}

    def phone_answer(self) -> str:
        """What the offline bot says from this passage: its first sentence, and the second
        when both fit in PHONE_ANSWER_CHARS (a caller can't skim a page read aloud). A
        bare "Yes." or "No." opening does not count as one of the two."""
        plain = " ".join(MARKDOWN_MARKS.sub("", MARKDOWN_LINK.sub(r"\1", self.text)).split())
        answer, counted = "", 0
        for sentence in SENTENCE_END.split(plain):
            if counted == 2 or (answer and len(answer) + 1 + len(sentence) > PHONE_ANSWER_CHARS):
                break
            answer = f"{answer} {sentence}".strip()
            counted += len(sentence.split()) > 2
        if len(answer) <= PHONE_ANSWER_CHARS:
            return answer
        cut = answer[: PHONE_ANSWER_CHARS - 3].rsplit(" ", 1)[0]
        return f"{cut.rstrip(',;:')}..."


class KnowledgeBase:
    """The passages of one agent's files, indexed in an in-memory FTS5 table."""

    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages
        # One connection, used from the event loop and from function-call tasks alike;
        # sqlite3 serialises it, the lock keeps a cursor to one search at a time.
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE VIRTUAL TABLE passages USING fts5(heading, text, tokenize='porter unicode61')"
        )
        self._db.executemany(
            "INSERT INTO passages(rowid, heading, text) VALUES (?, ?, ?)",
            [(i, p.heading, p.text) for i, p in enumerate(passages)],
        )
        self.digest = hashlib.sha256(
            "\x00".join(f"{p.source}\x01{p.heading}\x01{p.text}" for p in passages).encode()
        ).hexdigest()

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> KnowledgeBase:
        """Read and split every file (UTF-8 text or Markdown); OSError/ValueError name it."""
        passages: list[Passage] = []
        for path in paths:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            passages += split_passages(path.read_text(encoding="utf-8"), path.name)
        return cls(passages)

    def search(self, query: str, limit: int = 3) -> list[Passage]:
        """The passages that best match `query` (BM25, headings weighted double), best first."""
        return [self.passages[rowid] for rowid in self._ranked(search_terms(query), limit)]

    def best_match(self, query: str, candidates: int = 3) -> Passage | None:
        """The passage that answers `query` well enough to say it without an LLM, or None.

        Well enough: of the best `candidates` with text, the first that holds more than half
        of the query's content words (stemmed, in its heading or text): one shared word is
        no answer to a two-word question, however well BM25 ranks it.
        """
        terms = search_terms(query)
        for rowid in self._ranked(terms, candidates):
            if self.passages[rowid].text and 2 * self._terms_held(rowid, terms) > len(terms):
                return self.passages[rowid]
        return None

    def _ranked(self, terms: list[str], limit: int) -> list[int]:
        """Row ids of the passages holding any of `terms`, best BM25 first."""
        if not terms:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid FROM passages WHERE passages MATCH ? "
                "ORDER BY bm25(passages, 2.0, 1.0) LIMIT ?",
                (" OR ".join(_quoted(term) for term in terms), limit),
            ).fetchall()
        return [rowid for (rowid,) in rows]

    def _terms_held(self, rowid: int, terms: list[str]) -> int:
        """How many of `terms` passage `rowid` holds (FTS5 stems them as it stemmed it)."""
        with self._lock:
            return sum(
                self._db.execute(
                    "SELECT 1 FROM passages WHERE passages MATCH ? AND rowid = ?",
                    (_quoted(term), rowid),
                ).fetchone()
                is not None
                for term in terms
            )

    def size(self) -> int:
        return sum(len(p.heading) + len(p.text) for p in self.passages)

    def searched(self) -> bool:
        """Too big for the prompt: the LLM searches it (`search_knowledge`) instead."""
        return self.size() > PROMPT_CHARS

    def prompt_section(self) -> str:
        """The whole knowledge for the system prompt when it is small, else ""."""
        if not self.passages or self.searched():
            return ""
        body = " ".join(f"{p.heading}: {p.text}" if p.heading else p.text for p in self.passages)
        return f" What you know (answer from it; say so when it does not cover a question): {body}"


def search_terms(query: str) -> list[str]:
    """The words of a query worth matching: lower-case, no stopwords, no FTS5 syntax.

    A word with an apostrophe that is no stopword counts as its stem ("store's" ->
    "store"), as FTS5's unicode61 tokenizer splits it there too.
    """
    words = (w.replace("\u2019", "'") for w in WORD.findall(query.lower()))
    terms = (w.split("'")[0] for w in words if w not in STOPWORDS)
    return [term for term in dict.fromkeys(terms) if term not in STOPWORDS]


def _quoted(term: str) -> str:
    """An FTS5 string (a phrase of one word): never read as an operator or column filter."""
    return '"' + term.replace('"', '""') + '"'


def split_passages(text: str, source: str) -> list[Passage]:
    """Markdown sections (heading + body), long ones cut at paragraphs; plain text: paragraphs."""
    passages: list[Passage] = []
    heading, lines = "", []
    for line in text.splitlines():
        if found := HEADING.match(line):
            passages += _section(heading, lines, source)
            heading, lines = found.group(2), []
        else:
            lines.append(line)
    passages += _section(heading, lines, source)
    return passages


def _section(heading: str, lines: list[str], source: str) -> list[Passage]:
    paragraphs = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        return [Passage(heading, "", source)] if heading else []
    chunks, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + len(paragraph) > PASSAGE_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current} {paragraph}".strip()
    chunks.append(current)
    return [Passage(heading, chunk, source) for chunk in chunks]
