"""When a caller's turn is over on a phone line, and where each reply's time goes.

Why this exists: Pipecat's default end of turn is its Smart Turn model, and when the model
judges a turn unfinished Pipecat waits its whole silence fallback (`SmartTurnParams.stop_secs`,
3 s) before the bot answers. On phone audio the model errs both ways (espeak-ng speech
at 8 kHz: "My order number is" scores 0.95 complete; "I would like to know your opening
hours please." scored 0.26-0.46 through this server), so the model alone either leaves
the caller in 3 s of dead air or answers a caller still looking for their order number.
`PhoneTurnStopStrategy` adds the STT's final transcript as a second signal, both ways:

| model says | transcript's end          | the bot answers                          |
| ---------- | ------------------------- | ---------------------------------------- |
| complete   | finished                  | at once (as Pipecat does)                |
| incomplete | finished                  | `TURN_INCOMPLETE_WAIT_S` after speech end |
| either     | mid-phrase ("is", "my",   | `TURN_DANGLING_WAIT_S` after speech end,  |
|            | "and", "um", "4 5", "…")  | unless the caller goes on first          |

The caller speaking again cancels any pending answer (Pipecat's VAD start), so a pause
shorter than the wait is never answered.

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
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TurnMetricsData
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
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


# Words after which an English sentence cannot have ended: articles, possessives,
# conjunctions, prepositions, hesitations. Kept short on purpose: a word that also ends
# common complete answers ("that", "her", "so" in "I think so", "on" in "hold on", "in"
# in "I'm logged in", "about", "by") would make those callers wait.
_DANGLING_WORDS = _words(
    """a an the my your our their and or but because if than to of for with at from into
    as um uh uhm er erm ah hmm mm like"""
)
# Verbs that dangle after a noun ("my order number is", "the address was") but end a
# short answer after a pronoun ("yes it is", "yes I do", "I think we can").
_AUXILIARIES = _words(
    """is are was were am be been being have has had will would can could should shall
    may might must do does did"""
)
_PRONOUNS = _words("i you we they he she it that this there who which what so")
# Digits read one by one ("4 5 6", "four five six") usually go on: callers dictate order
# and phone numbers in groups with pauses between them.
_DIGIT_WORDS = _words("zero oh one two three four five six seven eight nine")
_TRAILING_MARKS = (",", "...", "…", "-", "–", "—", ":", ";")
_WORD = re.compile(r"[\w']+")


def ends_mid_phrase(text: str, language: str = "en") -> bool:
    """Whether a transcript stops where a sentence can't end, so the caller is still going.

    Marks (a trailing comma, ellipsis or dash) and single spoken digits count in any
    language; the word lists are English, so other languages rely on marks and digits.
    A question mark means finished: "Who am I speaking with?" ends with "with".
    """
    stripped = text.strip()
    if not stripped or stripped.endswith("?"):
        return False
    if stripped.endswith(_TRAILING_MARKS):
        return True
    words = _WORD.findall(stripped.lower())
    if not words:
        return False
    last = words[-1]
    if len(last) == 1 and last.isdigit():
        return True
    if not language.lower().startswith("en"):
        return False
    if last in _DANGLING_WORDS or last in _DIGIT_WORDS:
        return True
    before = words[-2] if len(words) > 1 else ""
    return last in _AUXILIARIES and before not in _PRONOUNS and before not in {"yes", "no"}


@dataclass(frozen=True)
class TurnPolicy:
    """How long after the end of speech the bot answers, given the model and the text.

    Attributes:
        incomplete_wait_s: the model says unfinished, the transcript looks finished.
        dangling_wait_s: the transcript ends mid-phrase, whatever the model says.
        language: the call's language (the word lists are English).
    """

    incomplete_wait_s: float = 0.7
    dangling_wait_s: float = 3.0
    language: str = "en"

    def wait(self, model_says_complete: bool, text: str) -> tuple[float, str]:
        """(seconds after the end of speech to answer, name of the rule that decided)."""
        if ends_mid_phrase(text, self.language):
            return self.dangling_wait_s, "dangling_transcript"
        if model_says_complete:
            return 0.0, "model_complete"
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
    the inference (~110-145 ms of CPU, longer when other calls' turns end too) inside
    the aggregator's `process_frame`, so the call's audio, its VAD and its transcript
    queued behind it. Here each VAD stop's analysis is a task of its own; frames go on
    meanwhile (Pipecat's strategy already re-checks a transcript that came in while its
    analyzer ran), and the caller speaking again cancels it, so a verdict on a pause the
    caller has already ended is never acted on.
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
        self._text = ""  # the final transcript since the caller last started speaking
        self._speaking = False  # per the VAD; like Pipecat's, not reset at turn boundaries
        self._timer: asyncio.Task | None = None
        self._analysis: asyncio.Task | None = None  # the model judging the latest VAD stop
        self._decision: tuple[str, float | None] | None = None

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
            self._speaking, self._decision = True, None
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_end_at, self._verdict = _monotonic_speech_end(frame), None
            self._speaking = False
            if self._timeline:
                self._timeline.speech_ended(self._speech_end_at, frame.stop_secs)
        elif isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._text = frame.text
            if self._timeline:
                self._timeline.transcript(time.monotonic())

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
        """Model says incomplete (or could not score): the transcript decides how long."""
        if self._speech_end_at is None or self._verdict is not False or not self._text.strip():
            return
        wait_s, rule = self._policy.wait(False, self._text)
        await self._answer_at(self._speech_end_at + wait_s, rule, wait_s)

    async def _on_inner_push_frame(self, inner, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, MetricsFrame):
            for data in frame.data:
                if isinstance(data, TurnMetricsData):
                    self._verdict = data.is_complete
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
            wait_s, rule = self._policy.wait(True, self._text)
            await self._answer_at(self._speech_end_at + wait_s, rule, wait_s)

    async def _answer_at(self, deadline: float, rule: str, wait_s: float) -> None:
        await self._cancel_timer()
        delay = deadline - time.monotonic()
        if delay <= 0:
            await self._stop(rule, wait_s)
        else:
            self._timer = self.task_manager.create_task(
                self._stop_after(delay, rule, wait_s), f"{self}::answer_timer"
            )

    async def _stop_after(self, delay: float, rule: str, wait_s: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None  # ending the turn resets us; don't cancel the running task
        await self._stop(rule, wait_s)

    async def _stop(self, rule: str, wait_s: float | None, speaking_frames: bool = True) -> None:
        self._decision = (rule, wait_s)
        await self.trigger_user_turn_stopped(enable_user_speaking_frames=speaking_frames)

    async def _cancel_timer(self) -> None:
        if self._timer:
            timer, self._timer = self._timer, None
            await self.task_manager.cancel_task(timer)

    async def _reset(self) -> None:
        await self._cancel_timer()
        await self._cancel_analysis()
        self._speech_end_at, self._verdict, self._text, self._decision = None, None, "", None


def phone_turn_stop(
    settings: Settings, timeline: TurnTimeline | None = None
) -> PhoneTurnStopStrategy:
    """A call's stop strategy: the shared Smart Turn model plus `settings`' waits.

    The analyzer's own silence fallback is set to the longest wait, so it can only back
    up the strategy's timers, never answer earlier than they would.
    """
    policy = TurnPolicy(
        incomplete_wait_s=settings.turn_incomplete_wait_s,
        dangling_wait_s=settings.turn_dangling_wait_s,
        language=settings.language,
    )
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
