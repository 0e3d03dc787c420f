"""When a caller's turn is over on a phone line, and where each reply's time goes.

Why this exists: Pipecat's default end of turn is its Smart Turn model, and when the model
judges a turn unfinished Pipecat waits its whole silence fallback (`SmartTurnParams.stop_secs`,
3 s) before the bot answers. On phone audio the model errs both ways (espeak-ng speech
at 8 kHz: "My order number is" scores 0.95 complete; "I would like to know your opening
hours please." scored 0.26-0.46 through this server), so the model alone either leaves
the caller in 3 s of dead air or answers a caller still looking for their order number.
`PhoneTurnStopStrategy` adds the STT's final transcript as a second signal, both ways:

| model says             | transcript's end                | the bot answers, after speech end |
| ---------------------- | ------------------------------- | --------------------------------- |
| complete               | finished                        | at once (as Pipecat does)         |
| incomplete             | finished                        | `TURN_INCOMPLETE_WAIT_S`          |
| incomplete, under 0.15 | a statement that looks finished | `TURN_DANGLING_WAIT_S`            |
| either                 | mid-phrase ("is", "my", "and",  | `TURN_DANGLING_WAIT_S`            |
|                        | "um", "4 5", "…", "If I", "to?" | unless the caller goes on first   |
| not in yet             | finished                        | `TURN_INCOMPLETE_WAIT_S` at most  |

The caller speaking again cancels any pending answer (Pipecat's VAD start), so a pause
shorter than the wait is never answered (`ends_mid_phrase` and `TurnPolicy` say why each
rule is there); and no turn ends while the STT still owes the transcript of one of its
VAD segments (`PhoneTurnStopStrategy`).

`TurnTimeline` records, per caller turn, where the time goes from the end of speech to the
first bot audio frame out, and logs it as one DEBUG line that `parse_turn_timing` reads
back (the benchmark collects them from the server log):

    Call <CallSid> turn timing {"speech_end_at":..., "verdict":"complete", ...}
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.frames.frames import (
    Frame,
    MetricsFrame,
    STTMetadataFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TurnMetricsData
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.services.stt_latency import DEFAULT_TTFS_P99
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_stop import (
    BaseUserTurnStopStrategy,
    TurnAnalyzerUserTurnStopStrategy,
    UserTurnStoppedParams,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from phonebot.ai.inference import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzer
from phonebot.call.barge_in import vad_params
from phonebot.config import Settings
from phonebot.twilio.keypad import pressed_digits

__all__ = [
    "COMPLETE_ABOVE",
    "PhoneTurnStopStrategy",
    "TurnPolicy",
    "TurnTimeline",
    "TurnTimer",
    "ends_mid_phrase",
    "parse_turn_timing",
    "phone_turn_stop",
]

# ------------------------------------------------------------------------------ the text rule


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words no English sentence ends on, not even a question: articles, possessives,
# conjunctions, hesitations. Whisper puts a question mark after "Can I change my" or
# "Can you tell me if" as readily as after a question (bench/turn_taking.py).
_NEVER_LAST = _words(
    """a an the my your our their and or but because if than whether um uh uhm er erm ah
    hmm mm"""
)
# ... and prepositions, after which a statement has not ended either ("I'm calling about",
# "It was delivered to"), though a question may ("Who am I speaking with?"). Kept short on
# purpose: a word that also ends common complete answers ("that", "her", "so" in "I think
# so", "on" in "hold on", "in" in "I'm logged in", "by") would make those callers wait.
_DANGLING_WORDS = _NEVER_LAST | _words("to of for with at from into as about like")
# Verbs that dangle after a noun ("my order number is", "the address was") but end a
# short answer after a pronoun or a yes/no/please ("yes it is", "please do").
_AUXILIARIES = _words(
    """is are was were am be been being have has had will would can could should shall
    may might must do does did"""
)
_ENDS_AFTER_AUXILIARY = _words(
    "i you we they he she it that this there who which what so yes no please"
)
# After a preposition or an article an auxiliary's spelling is a noun: "the fifth of May".
_NOT_A_VERB_AFTER = _DANGLING_WORDS | _words("in on by until")
# "that" opening a clause: "The only problem is that", "I was told that".
_THAT_OPENS_AFTER = _words("is was told")
# Digits read one by one ("4 5 6", "four five six") usually go on: callers dictate order
# and phone numbers in groups with pauses between them. One digit after a word is a
# number said whole ("size 9", "a table for 2 at 7", "the new one").
_DIGIT_WORDS = _words("zero oh one two three four five six seven eight nine")
_TRAILING_MARKS = (",", "...", "…", "-", "–", "—", ":", ";")
_WORD = re.compile(r"[\w']+")
# Whisper tiny.en writes a question mark after a request broken off mid-way that starts like
# a question ("Can I book an appointment for?", "Is it possible to?"). A question that asks
# with a question word may end on a preposition ("Who am I speaking with?", "What is this
# call about?"); a yes/no question seldom does.
_QUESTION_WORDS = _words("who whom whose what which where when why how")
# A yes/no question of a modal and its subject alone still needs its verb ("Can I, uh …"
# heard as "Can I?", "Could you please?"); an echo question ("Can I?" after "you can return
# it") is the rare exception.
_MODALS = _words("can could would will shall should may might must")
_SUBJECTS = _words("i you we they he she it")
# A clause opened by one of these and a pronoun subject waits for its main clause ("If I
# return it now, …", "When I opened the box, …"): Whisper writes the caller's pause as a full
# stop. With a noun after it the word is a preposition and the answer may be whole ("After
# the weekend.", "Since the fifth of May."), and "because" answers "why?" ("Because it
# broke."), so neither counts.
_SUBORDINATORS = _words(
    "if when whenever before after as once since while unless although though until"
)
_OPENERS = _words("so well and but oh okay um uh")  # may come before the clause
# Verbs of saying and thinking, right after their subject, want what was said or thought:
# "Hold on, it says …", "I think …", "I mean …". ("I guess." and "I said." end sentences.)
_WANT_WHAT_FOLLOWS = _words("says think mean")


def ends_mid_phrase(text: str, language: str = "en") -> bool:
    """Whether a transcript stops where a sentence can't end, so the caller is still going.

    Marks (a trailing comma, ellipsis or dash) and digits being read out count in any
    language; the word lists are English, so other languages rely on marks and digits.
    A question mark means finished ("Who am I speaking with?" ends with "with"), unless
    the question ends on a word no sentence ends on ("Can I change my?") or breaks off
    the way a yes/no question does (`_question_breaks_off`).
    """
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    english = language.lower().startswith("en")
    if stripped.endswith("?"):
        return english and bool(words) and _question_breaks_off(words)
    if stripped.endswith(_TRAILING_MARKS):
        return True
    if not words:
        return False
    if _reading_digits(words, english):
        return True
    if not english:
        return False
    return (
        _dangles(words[-1], words[-2] if len(words) > 1 else "")
        or _wants_what_follows(words)
        or ("," not in stripped and _only_a_dependent_clause(words))
    )


def _question_breaks_off(words: list[str]) -> bool:
    """A question that is a request broken off: on a word no sentence ends on; a yes/no
    question on a preposition ("… for?", "… to?"); a modal and its subject alone."""
    if words[-1] in _NEVER_LAST:
        return True
    if _QUESTION_WORDS.intersection(words):
        return False
    if words[-1] in _DANGLING_WORDS:
        return True
    bare = words[:-1] if words[-1] == "please" else words
    return len(bare) == 2 and bare[0] in _MODALS and bare[1] in _SUBJECTS


def _only_a_dependent_clause(words: list[str]) -> bool:
    """The transcript is a dependent clause with no main clause yet ("If I return it now",
    "As I said before"): a subordinator, then a pronoun subject."""
    start = 0
    while start < len(words) - 2 and words[start] in _OPENERS:
        start += 1
    opener, subject = words[start], words[start + 1] if start + 1 < len(words) else ""
    return opener in _SUBORDINATORS and subject in _SUBJECTS


def _wants_what_follows(words: list[str]) -> bool:
    """A verb of saying or thinking, right after its subject, ends the transcript."""
    return len(words) >= 2 and words[-1] in _WANT_WHAT_FOLLOWS and words[-2] in _SUBJECTS


_ANSWER_WORDS = _words("yes yeah yep no nope sure okay ok thanks thank")


def _asks_or_answers(text: str) -> bool:
    """A question, or a reply opening with yes, no or thanks: whole as they are."""
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    return stripped.endswith("?") or bool(words) and words[0] in _ANSWER_WORDS


def _reading_digits(words: list[str], english: bool) -> bool:
    """The transcript ends on digits read one by one: two in a row, or a digit alone."""

    def digit(word: str) -> bool:
        return (len(word) == 1 and word.isdigit()) or (english and word in _DIGIT_WORDS)

    return digit(words[-1]) and (len(words) == 1 or digit(words[-2]))


def _dangles(last: str, before: str) -> bool:
    """The last English word leaves the sentence open."""
    if last in _DANGLING_WORDS:
        return True
    if last == "that":
        return before in _THAT_OPENS_AFTER
    if before in _NOT_A_VERB_AFTER:
        return False  # "the fifth of May", "in May": the month
    return last in _AUXILIARIES and before not in _ENDS_AFTER_AUXILIARY


# Smart Turn's own threshold: Pipecat's analyzer says "complete" (prediction 1) above it.
COMPLETE_ABOVE = 0.5


@dataclass(frozen=True)
class TurnPolicy:
    """How long after the end of speech the bot answers, given the model and the text.

    Smart Turn's "incomplete" alone is weak on phone audio: finished sentences score
    anywhere under 0.5 ("Yes, it is." 0.03, "I'm not happy with the service." 0.16), so
    between `unfinished_below` and 0.5 a finished-looking transcript is answered after
    `incomplete_wait_s`. Under `unfinished_below` the model is sure enough to outweigh a
    statement that looks finished, as it does when Whisper ends a broken-off sentence with a
    full stop ("I'm not sure which.", "I was wondering if you could."); a question or a
    reply opening with yes, no or thanks is taken as whole all the same. Off by default
    (TURN_UNFINISHED_BELOW=0): on the turn-taking benchmark (bench/turn_taking.py) 0.15 kept
    10 more of 107 unfinished tuning utterances from being cut off, but on its held-out part
    it made 3 more of 50 finished ones wait 3 s (finished p95 0.90 s -> 3.06 s); the
    trade-off at other values is in docs/call-control.md.

    Attributes:
        incomplete_wait_s: the model says unfinished, the transcript looks finished.
        dangling_wait_s: the transcript ends mid-phrase, whatever the model says; also
            the wait when the model is sure the caller is not done (`unfinished_below`).
        language: the call's language (the word lists, and `unfinished_below`'s
            exceptions, are English: other languages leave it out).
        unfinished_below: Smart Turn's probability under which a statement that looks
            finished waits `dangling_wait_s` (0 turns it off).
    """

    incomplete_wait_s: float = 0.7
    dangling_wait_s: float = 3.0
    language: str = "en"
    unfinished_below: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TurnPolicy:
        """The waits `settings` ask for (TURN_INCOMPLETE_WAIT_S, TURN_DANGLING_WAIT_S,
        TURN_UNFINISHED_BELOW)."""
        return cls(
            incomplete_wait_s=settings.turn_incomplete_wait_s,
            dangling_wait_s=settings.turn_dangling_wait_s,
            language=settings.language,
            unfinished_below=settings.turn_unfinished_below,
        )

    def wait(self, probability: float | None, text: str) -> tuple[float, str]:
        """(seconds after the end of speech to answer, name of the rule that decided), given
        Smart Turn's probability that the turn is complete (None: it did not score)."""
        if ends_mid_phrase(text, self.language):
            return self.dangling_wait_s, "dangling_transcript"
        if probability is not None and probability > COMPLETE_ABOVE:
            return 0.0, "model_complete"
        if (
            probability is not None
            and probability < self.unfinished_below
            and self.language.lower().startswith("en")
            and not _asks_or_answers(text)
        ):
            return self.dangling_wait_s, "model_unfinished"
        return self.incomplete_wait_s, "finished_transcript"


# ------------------------------------------------------------------------------ the timeline

TIMING_MARKER = " turn timing "
_TIMING_LINE = re.compile(r"Call (?P<sid>\S+) turn timing (?P<json>\{.*\})")


@dataclass
class TurnTiming:
    """One caller turn, from the end of its speech to the bot's first audio frame out.

    Times are `time.monotonic()` values; `as_dict` makes them relative to `speech_end_at`.
    """

    speech_end_at: float
    vad_stop_s: float | None = None  # how long after speech end the VAD said so
    segments: int = 0  # VAD stops in this turn: 2+ means the caller paused and went on
    verdict: str | None = None
    probability: float | None = None
    inference_ms: float | None = None
    verdict_at: float | None = None  # when the verdict reached the strategy
    rule: str | None = None
    wait_s: float | None = None
    transcript_at: float | None = None
    turn_end_at: float | None = None
    llm_first_token_at: float | None = None
    tts_first_audio_at: float | None = None
    audio_out_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def since(at: float | None) -> float | None:
            return None if at is None else round(at - self.speech_end_at, 3)

        def rounded(value: float | None, digits: int = 3) -> float | None:
            return None if value is None else round(value, digits)

        return {
            "speech_end_at": round(self.speech_end_at, 3),
            "verdict": self.verdict,
            "probability": rounded(self.probability),
            "rule": self.rule,
            "wait_s": rounded(self.wait_s),
            "segments": self.segments,
            "vad_stop_s": rounded(self.vad_stop_s),
            "inference_ms": rounded(self.inference_ms, 1),
            "verdict_s": since(self.verdict_at),
            "transcript_s": since(self.transcript_at),
            "turn_end_s": since(self.turn_end_at),
            "llm_first_token_s": since(self.llm_first_token_at),
            "tts_first_audio_s": since(self.tts_first_audio_at),
            "audio_out_s": since(self.audio_out_at),
        }


@dataclass
class TurnTimeline:
    """One call's turn timings: written by the stop strategy and `TurnTimer`, logged once
    per turn at `level` (DEBUG, or INFO with LOG_TURN_TIMING) when its reply's first audio
    frame goes out (or when the caller speaks again, or the call ends, before that).
    """

    call_sid: str
    level: str = "DEBUG"
    current: TurnTiming | None = None
    logged: list[dict[str, Any]] = field(default_factory=list)  # this call's, for tests

    def speech_ended(self, at: float, vad_stop_s: float) -> None:
        """A VAD stop: a new turn, or the next segment of a turn not yet ended."""
        turn = self._open_turn(at)
        turn.speech_end_at, turn.vad_stop_s = at, vad_stop_s
        turn.segments += 1
        turn.verdict = turn.probability = turn.inference_ms = turn.transcript_at = None
        turn.verdict_at = None

    def model_verdict(self, metrics: TurnMetricsData, at: float | None = None) -> None:
        """The model's verdict, reported `at` (now): with the time it waited for a thread,
        which `inference_ms` (the model's own run) leaves out."""
        if self.current and self.current.turn_end_at is None:
            self.current.verdict = "complete" if metrics.is_complete else "incomplete"
            self.current.probability = metrics.probability
            self.current.inference_ms = metrics.e2e_processing_time_ms
            self.current.verdict_at = time.monotonic() if at is None else at

    def transcript(self, at: float) -> None:
        """A final transcript; one without a VAD stop (keypad) starts its own turn."""
        self._open_turn(at).transcript_at = at

    def turn_started(self) -> None:
        """The caller took the floor again: a turn still waiting for its reply is logged."""
        if self.current and self.current.turn_end_at is not None:
            self._log()

    def turn_ended(self, at: float, rule: str | None, wait_s: float | None) -> None:
        if self.current and self.current.turn_end_at is None:
            self.current.turn_end_at, self.current.rule = at, rule or "watchdog"
            self.current.wait_s = wait_s
            if self.current.verdict is None:
                self.current.verdict = "keypad" if rule == "keypad" else "unscored"

    def llm_first_token(self, at: float) -> None:
        if (turn := self._answering()) and turn.llm_first_token_at is None:
            turn.llm_first_token_at = at

    def tts_first_audio(self, at: float) -> None:
        if (turn := self._answering()) and turn.tts_first_audio_at is None:
            turn.tts_first_audio_at = at

    def audio_out(self, at: float) -> None:
        if turn := self._answering():
            turn.audio_out_at = at
            self._log()

    def close(self) -> None:
        """The call ended: log a turn still open."""
        if self.current:
            self._log()

    def _open_turn(self, at: float) -> TurnTiming:
        if self.current and self.current.turn_end_at is not None:
            self._log()  # ended but never answered (e.g. a tool call that spoke nothing)
        if self.current is None:
            self.current = TurnTiming(speech_end_at=at)
        return self.current

    def _answering(self) -> TurnTiming | None:
        """The turn whose reply is on its way: ended, first audio not out yet."""
        turn = self.current
        return turn if turn and turn.turn_end_at is not None else None

    def _log(self) -> None:
        timing = self.current.as_dict() if self.current else None
        self.current = None
        if timing is not None:
            self.logged.append(timing)
            compact = json.dumps(timing, separators=(",", ":"))
            logger.log(self.level, f"Call {self.call_sid}{TIMING_MARKER}{compact}")


def parse_turn_timing(line: str) -> dict[str, Any] | None:
    """One turn's timing from a server log line, with its `call_sid`; None for other lines."""
    if TIMING_MARKER not in line:
        return None
    match = _TIMING_LINE.search(line)
    if not match:
        return None
    try:
        timing = json.loads(match["json"])
    except ValueError:
        return None
    if not isinstance(timing, dict):
        return None
    return {"call_sid": match["sid"], **timing}


def _monotonic_speech_end(frame: VADUserStoppedSpeakingFrame) -> float:
    """When the caller stopped, on the monotonic clock: the VAD stamps its decision with
    wall-clock time, `stop_secs` of silence after the speech ended."""
    return time.monotonic() - (time.time() - frame.timestamp) - frame.stop_secs


class TurnTimer(FrameProcessor):
    """Times a reply: the LLM's first token, the TTS's first audio, the first frame out.

    Placed right after the output transport, it reads Pipecat's own signals: the LLM's and
    the TTS's TTFB metrics frames (sent at the LLM's first streamed chunk and the TTS's
    first audio), and the first `TTSAudioRawFrame` the output transport passes on, which
    it does only once the frame has been written to the websocket. The caller's audio
    never gets here (`InputAudioStop`), and the bot's comes in 100 ms chunks, so it costs
    about ten frames per second of bot speech. No observer: the call's worker
    (phonebot.call.pipeline) runs without any.
    """

    def __init__(self, timeline: TurnTimeline, llm_name: str, tts_name: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._timeline = timeline
        self._llm_name = llm_name
        self._tts_name = tts_name

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._timeline.audio_out(time.monotonic())
        elif isinstance(frame, MetricsFrame):
            for data in frame.data:
                if isinstance(data, TTFBMetricsData):
                    self._ttfb(data.processor)
        await self.push_frame(frame, direction)

    def _ttfb(self, processor: str) -> None:
        if processor == self._llm_name:
            self._timeline.llm_first_token(time.monotonic())
        elif processor == self._tts_name:
            self._timeline.tts_first_audio(time.monotonic())

    async def cleanup(self) -> None:
        await super().cleanup()
        self._timeline.close()


# ------------------------------------------------------------------------------ the strategy


class PhoneTurnStopStrategy(BaseUserTurnStopStrategy):
    """Pipecat's turn-analyzer stop strategy, with the transcript as a second signal.

    Composes (rather than subclasses) `TurnAnalyzerUserTurnStopStrategy`: the inner
    strategy feeds the analyzer, runs the model at each VAD stop, waits for the final
    transcript and keeps Pipecat's keypad/transcript-only path; everything it reports
    arrives through its public events. This class only decides *when* its "turn
    stopped" becomes ours (`TurnPolicy`), and adds the early answer the inner strategy
    never gives: model says incomplete, transcript looks finished. Subclassing would mean
    overriding the inner strategy's private methods.

    The analyzer's own silence fallback (`SmartTurnParams.stop_secs`) stays as a backstop:
    build it with `stop_secs` = `policy.dangling_wait_s`.

    The model runs beside the user aggregator, not inside it: Pipecat's strategy awaits
    the inference (~57 ms of CPU, longer when other calls' turns end too) inside
    the aggregator's `process_frame`, so the call's audio, its VAD and its transcript
    queued behind it. Here each VAD stop's analysis is a task of its own; frames go on
    meanwhile (Pipecat's strategy already re-checks a transcript that came in while its
    analyzer ran), and the caller speaking again cancels it, so a verdict on a pause the
    caller has already ended is never acted on.

    No turn ends while a VAD segment's transcript is still on its way. A segmented STT
    (the offline Whisper, ~0.6 s of CPU a segment; OpenAI's) transcribes each segment
    after its VAD stop, in order, so when the VAD splits a turn ("Sorry, … what are your
    opening hours?") the first segment's final transcript arrives while the caller says
    the second, and Pipecat's strategy takes it as covering the turn (it counts any final
    transcript since the last VAD start): it would end the turn at the second stop, and
    the second transcript, arriving after, would start a new user turn (Pipecat's
    transcription start strategy), interrupting the reply with a second one. So each VAD
    stop owes a transcript, each final transcript pays one, and while one is owed the
    turn waits for it, at most the STT's own p99 latency after the end of speech (Pipecat's
    `STTMetadataFrame.ttfs_p99_latency`, the same bound its strategy puts on a transcript
    that is not final): a segment the STT heard nothing in (no frame at all) can't stall
    the call, and the turn then ends on the text in hand (rule `transcript_overdue`).
    """

    def __init__(
        self,
        *,
        turn_analyzer: BaseTurnAnalyzer,
        policy: TurnPolicy | None = None,
        timeline: TurnTimeline | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._turn_analyzer = turn_analyzer
        self._policy = policy or TurnPolicy()
        self._timeline = timeline
        self._inner = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=turn_analyzer)
        self._inner.add_event_handler("on_push_frame", self._on_inner_push_frame)
        self._inner.add_event_handler("on_broadcast_frame", self._on_inner_broadcast_frame)
        self._inner.add_event_handler("on_user_turn_stopped", self._on_inner_turn_stopped)
        # The inner strategy's "inference triggered" always comes with its "stopped",
        # which we may hold back: we trigger both ourselves when we let the turn end.
        self._speech_end_at: float | None = None  # this turn's latest VAD stop
        self._verdict: bool | None = None  # the model's, for the latest VAD stop
        self._probability: float | None = None  # ... and its probability of "complete"
        self._text = ""  # the final transcript since the caller last started speaking
        self._speaking = False  # per the VAD; like Pipecat's, not reset at turn boundaries
        self._timer: asyncio.Task | None = None
        self._analysis: asyncio.Task | None = None  # the model judging the latest VAD stop
        self._decision: tuple[str, float | None] | None = None
        self._owed_transcripts = 0  # VAD stops in this turn whose transcript is not in yet
        self._stt_p99_s = DEFAULT_TTFS_P99  # the STT's, from its STTMetadataFrame

    @property
    def turn_analyzer(self) -> BaseTurnAnalyzer:
        return self._turn_analyzer

    @property
    def policy(self) -> TurnPolicy:
        return self._policy

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        await self._inner.setup(setup)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._cancel_timer()
        await self._cancel_analysis()
        await self._inner.cleanup()

    async def handle_user_turn_started(self) -> None:
        await self._reset()
        await self._inner.handle_user_turn_started()
        if self._timeline:
            self._timeline.turn_started()

    async def handle_user_turn_stopped(self) -> None:
        if self._timeline:
            rule, wait_s = self._decision or (None, None)
            self._timeline.turn_ended(time.monotonic(), rule, wait_s)
        await self._reset()
        await self._inner.handle_user_turn_stopped()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            # The caller goes on: whatever we were about to answer (or judge) is stale.
            await self._cancel_timer()
            await self._cancel_analysis()
            self._speech_end_at, self._verdict, self._text = None, None, ""
            self._probability = None
            self._speaking, self._decision = True, None
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_end_at, self._verdict = _monotonic_speech_end(frame), None
            self._probability = None
            self._speaking = False
            self._owed_transcripts += 1  # the STT transcribes the segment now ending
            if self._timeline:
                self._timeline.speech_ended(self._speech_end_at, frame.stop_secs)
        elif isinstance(frame, TranscriptionFrame):
            self._transcript_arrived(frame.text)
        elif isinstance(frame, STTMetadataFrame):
            self._stt_p99_s = frame.ttfs_p99_latency

        if isinstance(frame, VADUserStoppedSpeakingFrame):
            # The inner strategy runs the model here: let the aggregator go on meanwhile.
            await self._cancel_analysis()
            self._analysis = self.task_manager.create_task(
                self._judge_pause(frame), f"{self}::end_of_turn_analysis"
            )
            return ProcessFrameResult.CONTINUE

        await self._inner.process_frame(frame)  # may stop the turn

        if isinstance(frame, TranscriptionFrame) and self._is_keypad_entry(frame.text):
            # Pipecat treats a transcript without speech like a late STT result and waits
            # the STT's p99 latency (2 s for OpenAI's) for more; a keypad entry is whole.
            await self._stop("keypad", None)
        elif isinstance(frame, TranscriptionFrame):
            await self._maybe_answer_unfinished_verdict()
        return ProcessFrameResult.CONTINUE

    def _transcript_arrived(self, text: str) -> None:
        """A final transcript: it pays the oldest segment owed (segments are transcribed
        in order), unless it is a keypad entry, which no segment owes. One with no words
        (an STT saying it heard nothing) pays too."""
        if pressed_digits(text.strip()) is None:
            self._owed_transcripts = max(0, self._owed_transcripts - 1)
        if text.strip():
            self._text = text
            if self._timeline:
                self._timeline.transcript(time.monotonic())

    async def _judge_pause(self, frame: VADUserStoppedSpeakingFrame) -> None:
        """The inner strategy's VAD stop: the model's verdict, then what it means here."""
        await self._inner.process_frame(frame)  # may report the verdict, or stop the turn
        self._analysis = None  # done: ending the turn must not cancel this task
        if self._verdict is None:
            # No score (the analyzer had no audio to judge): not a "complete".
            self._verdict = False if self._speech_end_at is not None else None
        await self._maybe_answer_unfinished_verdict()

    async def _cancel_analysis(self) -> None:
        analysis, self._analysis = self._analysis, None
        # Its own verdict may end the turn, which resets us from inside the task.
        if analysis and analysis is not asyncio.current_task():
            await self.task_manager.cancel_task(analysis)

    def _is_keypad_entry(self, text: str) -> bool:
        """The keypad aggregator's entry, with no speech in this turn to wait for."""
        return (
            self._speech_end_at is None
            and not self._speaking
            and pressed_digits(text.strip()) is not None
        )

    async def _maybe_answer_unfinished_verdict(self) -> None:
        """Model says incomplete (or could not score), or has not answered yet: the
        transcript decides how long.

        A verdict still on its way can only make the answer sooner ("complete": at once),
        never later than the transcript's own wait (`TurnPolicy.wait` with no model). So
        that wait is set now, and if it runs out first the turn ends without the model
        (rule `model_late`), whose inference is then cancelled, or never started if it
        was still queued: with many calls' turns ending together (a campaign's burst),
        Smart Turn queues on its threads, and no caller waits past the transcript's wait
        for a verdict that could no longer change the answer, nor pays for one.
        """
        if self._speech_end_at is None or self._verdict is True or not self._text.strip():
            return
        wait_s, rule = self._policy.wait(self._probability, self._text)
        if self._verdict is None and rule == "finished_transcript":
            rule = "model_late"  # what it is if it fires; a verdict first replaces it
        await self._answer_at(self._speech_end_at + wait_s, rule, wait_s)

    async def _on_inner_push_frame(self, inner, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, MetricsFrame):
            for data in frame.data:
                if isinstance(data, TurnMetricsData):
                    self._verdict, self._probability = data.is_complete, data.probability
                    if self._timeline:
                        self._timeline.model_verdict(data)
        await self.push_frame(frame, direction)

    async def _on_inner_broadcast_frame(self, inner, frame_cls: type[Frame], **kwargs) -> None:
        await self.broadcast_frame(frame_cls, **kwargs)

    async def _on_inner_turn_stopped(self, inner, params: UserTurnStoppedParams) -> None:
        """Pipecat's strategy would end the turn now: the model said complete (or its
        silence fallback ran out) and the transcript is in, or a transcript came with no
        speech at all (the keypad)."""
        if self._speech_end_at is None:
            rule = "keypad" if pressed_digits(self._text.strip()) is not None else "transcript"
            await self._stop(rule, None, params.enable_user_speaking_frames)
        elif self._verdict is not True:
            await self._stop("silence_fallback", None, params.enable_user_speaking_frames)
        else:
            probability = 1.0 if self._probability is None else self._probability
            wait_s, rule = self._policy.wait(probability, self._text)
            await self._answer_at(self._speech_end_at + wait_s, rule, wait_s)

    async def _answer_at(self, deadline: float, rule: str, wait_s: float) -> None:
        """End the turn at `deadline` (now if it is past), or, while a segment's transcript
        is owed, no sooner than it can still be expected: its arrival decides again, with
        its text (the model's "complete" or the transcript path call us again)."""
        await self._cancel_timer()
        if self._owed_transcripts and self._speech_end_at is not None:
            deadline = max(deadline, self._speech_end_at + self._stt_p99_s)
        delay = deadline - time.monotonic()
        if delay <= 0:
            await self._stop(self._overdue_or(rule), wait_s)
        else:
            self._timer = self.task_manager.create_task(
                self._stop_after(delay, rule, wait_s), f"{self}::answer_timer"
            )

    async def _stop_after(self, delay: float, rule: str, wait_s: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None  # ending the turn resets us; don't cancel the running task
        await self._stop(self._overdue_or(rule), wait_s)

    def _overdue_or(self, rule: str) -> str:
        """`rule`, or `transcript_overdue` when the turn ends without a segment's transcript
        (the STT heard nothing in it, or is slower than its p99)."""
        return "transcript_overdue" if self._owed_transcripts else rule

    async def _stop(self, rule: str, wait_s: float | None, speaking_frames: bool = True) -> None:
        self._decision = (rule, wait_s)
        await self.trigger_user_turn_stopped(enable_user_speaking_frames=speaking_frames)

    async def _cancel_timer(self) -> None:
        if self._timer:
            timer, self._timer = self._timer, None
            await self.task_manager.cancel_task(timer)

    async def _reset(self) -> None:
        """A turn boundary. A transcript still owed is forgotten: if it comes after all,
        it starts a turn of its own, as Pipecat has any transcript without a turn do."""
        await self._cancel_timer()
        await self._cancel_analysis()
        self._speech_end_at, self._verdict, self._text, self._decision = None, None, "", None
        self._probability = None
        self._owed_transcripts = 0


def phone_turn_stop(
    settings: Settings, timeline: TurnTimeline | None = None
) -> PhoneTurnStopStrategy:
    """A call's stop strategy: the shared Smart Turn model plus `settings`' waits.

    The analyzer's own silence fallback is set to the longest wait, so it can only back
    up the strategy's timers, never answer earlier than they would.
    """
    policy = TurnPolicy.from_settings(settings)
    stop_secs = max(policy.incomplete_wait_s, policy.dangling_wait_s)
    analyzer = SharedSmartTurnAnalyzer(params=SmartTurnParams(stop_secs=stop_secs))
    return PhoneTurnStopStrategy(turn_analyzer=analyzer, policy=policy, timeline=timeline)


def user_turn_params(
    settings: Settings, timeline: TurnTimeline | None = None
) -> LLMUserAggregatorParams:
    """Silero VAD hears speech; Pipecat's bundled Smart Turn model and the transcript's
    last words decide the turn ended (`phone_turn_stop`; `timeline` records its timings).

    Both analyzers run on process-wide ONNX sessions (phonebot.ai.inference), so a call adds its
    own state but no model. Pipecat's user-idle timer (started when the bot stops speaking)
    drives re-prompts.
    """
    return LLMUserAggregatorParams(
        vad_analyzer=SharedSileroVADAnalyzer(params=vad_params(settings)),  # barge-in
        user_idle_timeout=settings.silence_timeout_s,
        user_turn_strategies=UserTurnStrategies(stop=[phone_turn_stop(settings, timeline)]),
        # Pipecat's last-resort turn end (5 s after the last speech or transcript) must
        # not cut short a caller we are deliberately waiting for.
        user_turn_stop_timeout=max(5.0, settings.turn_dangling_wait_s + 2.0),
    )
