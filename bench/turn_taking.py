"""When the bot answers a caller who stopped speaking: finished sentences, and unfinished ones.

Every utterance of the corpus (bench/turn_corpus.py: finished sentences, and sentences broken
off mid-way) is spoken by the offline voice (Piper "joe"; an unfinished one is spoken going on
and cut where the voice pauses, see `caller_audio`), sent through the 8 kHz μ-law phone
channel, and heard the way a call hears it: Silero VAD in the server's 60 ms batches with the
server's VAD settings, Smart Turn v3 on the audio Pipecat would give it, and the server's own
offline recogniser (`phonebot.ai.offline.stt.transcribe`: Whisper tiny.en, hash-checked, with
the server's decoding options) on the segment Pipecat's segmented STT would transcribe. The
project's turn rules (phonebot.call.turns.TurnPolicy, with the settings' waits) then say when
the bot answers, taking the LLM and the TTS as instant: the reply time is from the end of
the caller's voice to the moment the bot's turn begins.

    .venv/bin/python bench/turn_taking.py                       # measure (cached) and score
    .venv/bin/python bench/turn_taking.py --misses              # and list what went wrong
    .venv/bin/python bench/turn_taking.py --dangling-wait 2.5   # score other waits
    .venv/bin/python bench/turn_taking.py --sweep               # and the trade-off curve

It prints, for the tuning corpus and for its held-out part apart (texts the rules were never
tuned on: a rule that only fits the tuning texts shows as a gap), the confusion matrix
(finished / unfinished × answered within 1 s / later / in the middle of the utterance),
Smart Turn's verdicts alone, the rules that decided, the reply-time distribution, the reply
times of finished utterances (p50, p95; target p95 ≤ 1.0 s) and the share of unfinished ones
cut off (answered before the caller's pause to think is over, `--caller-pause`, 2 s; target
≤ 10 %). `--sweep` adds the cut-off share against finished reply times for other values of
`TurnPolicy.unfinished_below` and `TURN_INCOMPLETE_WAIT_S`.

Timing model (`answer_at`): the bot answers at the latest of the VAD's stop plus the model's
CPU time, the pause's transcript, and the end of speech (as the strategy reckons it: the
VAD's stop minus its `stop_secs`) plus the rule's wait. The recogniser takes each segment
in turn, from its VAD stop or once the one before is done (`transcript_times`), as
Pipecat's segmented STT does, and the strategy waits for the transcript of every segment.
CPU times are measured here, one utterance at a time, so they are an idle core's: a busy
server is slower. An utterance the VAD splits at an inner pause is judged at each pause; the
caller speaking again (the VAD's next start) cancels a pending answer, as in a call.

The audio and the measurements are cached under bench/results/turn_taking/ (gitignored):
a second run only scores, in a second. `--fresh` measures again (from the cached audio). The
first run takes about 4 minutes of CPU (5-6 minutes on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import wave
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phonebot.call.turns import COMPLETE_ABOVE, TurnPolicy  # noqa: E402
from phonebot.config import Settings  # noqa: E402

RATE = 8000
RESULTS = ROOT / "bench" / "results" / "turn_taking"
LEAD_S, TAIL_S = 0.5, 1.5  # silence before and after each utterance
AT_ONCE_S = 1.0  # "answered at once": within the finished-utterance target
CALLER_PAUSE_S = 2.0  # how long a caller who broke off mid-sentence pauses before going on
# Pipecat's last-resort end of a turn with no transcript (phonebot.call.turns.user_turn_params)
WATCHDOG_S = 5.0
GOES_ON = "let me think."  # what an unfinished utterance is spoken going on with


# ------------------------------------------------------------------------ what is measured


@dataclass(frozen=True)
class Pause:
    """One VAD stop in an utterance; times in seconds from the start of the audio."""

    started_s: float  # the VAD confirmed speech (VADUserStartedSpeakingFrame)
    stopped_s: float  # the VAD said quiet (VADUserStoppedSpeakingFrame)
    probability: float  # Smart Turn's probability that the turn is complete
    inference_s: float  # Smart Turn's CPU time
    text: str  # the recogniser's transcript of the segment
    stt_s: float  # the recogniser's CPU time


@dataclass(frozen=True)
class Observation:
    """An utterance as a call hears it."""

    text: str
    finished: bool
    speech_end_s: float  # the end of the caller's voice (from the audio's energy)
    pauses: tuple[Pause, ...]
    held_out: bool = False  # from the held-out part of the corpus (never tuned on)


@dataclass(frozen=True)
class Outcome:
    """When the bot answers an utterance, and by which rule."""

    observation: Observation
    reply_s: float  # after the end of the speech it answered (the whole utterance's, or
    # the inner pause's when `mid_utterance`)
    rule: str
    mid_utterance: bool = False  # answered at a pause inside the utterance


# ------------------------------------------------------------------------ scoring (no models)


def answer_at(
    pause: Pause, policy: TurnPolicy, stop_secs: float, transcript_at: float | None = None
) -> tuple[float, str]:
    """When the bot answers this pause if the caller does not go on, and the rule.

    PhoneTurnStopStrategy waits for both the model's verdict and the pause's final
    transcript (`transcript_at`: by default the recogniser starts at the VAD's stop), then
    answers `wait` after the speech end it reckons (VAD stop - stop_secs). With no
    transcript nothing ends the turn but Pipecat's watchdog.
    """
    speech_end = pause.stopped_s - stop_secs
    if not pause.text.strip():
        return speech_end + WATCHDOG_S, "no_transcript"
    wait_s, rule = policy.wait(pause.probability, pause.text)
    if transcript_at is None:
        transcript_at = pause.stopped_s + pause.stt_s
    ready = max(pause.stopped_s + pause.inference_s, transcript_at)
    return max(ready, speech_end + wait_s), rule


def transcript_times(pauses: Sequence[Pause]) -> list[float]:
    """When each pause's transcript is in: Pipecat's segmented STT transcribes a call's
    segments one after the other, each from its VAD stop or once the one before is done."""
    times: list[float] = []
    for pause in pauses:
        start = max(pause.stopped_s, times[-1]) if times else pause.stopped_s
        times.append(start + pause.stt_s)
    return times


def judge(observation: Observation, policy: TurnPolicy, stop_secs: float) -> Outcome:
    """The bot's answer to an utterance: at an inner pause if it comes before the caller
    goes on, else after the last one."""
    pauses = observation.pauses
    if not pauses:
        return Outcome(observation, WATCHDOG_S, "not_heard")
    heard_at = transcript_times(pauses)
    for pause, following, transcript_at in zip(pauses, pauses[1:], heard_at, strict=False):
        at, rule = answer_at(pause, policy, stop_secs, transcript_at)
        if at < following.started_s:
            return Outcome(observation, at - (pause.stopped_s - stop_secs), rule, True)
    at, rule = answer_at(pauses[-1], policy, stop_secs, heard_at[-1])
    return Outcome(observation, at - observation.speech_end_s, rule)


@dataclass(frozen=True)
class Summary:
    """The figures the benchmark prints."""

    matrix: dict[str, Counter]  # "finished"/"unfinished" -> column -> count
    finished_p50: float | None
    finished_p95: float | None
    cut_off: float  # share of unfinished utterances cut off
    rules: dict[str, Counter]  # label -> rule -> count
    model: dict[str, Counter]  # label -> "complete"/"incomplete" (last pause) -> count
    replies: dict[str, list[float]]  # label -> reply times (s), mid-utterance ones left out


def column(outcome: Outcome, at_once_s: float = AT_ONCE_S) -> str:
    if outcome.mid_utterance:
        return "mid-utterance"
    return "at once" if outcome.reply_s <= at_once_s else "later"


def is_cut_off(outcome: Outcome, caller_pause_s: float = CALLER_PAUSE_S) -> bool:
    """An unfinished utterance answered before its caller would have gone on."""
    return outcome.mid_utterance or outcome.reply_s < caller_pause_s


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` in 0-1): a value that was measured."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(np.ceil(share * len(ordered))))
    return ordered[rank - 1]


def label(outcome: Outcome) -> str:
    return "finished" if outcome.observation.finished else "unfinished"


def summarize(
    outcomes: Sequence[Outcome],
    at_once_s: float = AT_ONCE_S,
    caller_pause_s: float = CALLER_PAUSE_S,
) -> Summary:
    matrix: dict[str, Counter] = {"finished": Counter(), "unfinished": Counter()}
    rules: dict[str, Counter] = {"finished": Counter(), "unfinished": Counter()}
    model: dict[str, Counter] = {"finished": Counter(), "unfinished": Counter()}
    for outcome in outcomes:
        matrix[label(outcome)][column(outcome, at_once_s)] += 1
        rules[label(outcome)][outcome.rule] += 1
        if pauses := outcome.observation.pauses:
            complete = pauses[-1].probability > COMPLETE_ABOVE
            model[label(outcome)]["complete" if complete else "incomplete"] += 1
    replies: dict[str, list[float]] = {"finished": [], "unfinished": []}
    for outcome in outcomes:
        if not outcome.mid_utterance:
            replies[label(outcome)].append(outcome.reply_s)
    finished = replies["finished"]
    unfinished = [o for o in outcomes if not o.observation.finished]
    cut = sum(is_cut_off(o, caller_pause_s) for o in unfinished)
    return Summary(
        matrix=matrix,
        finished_p50=percentile(finished, 0.5),
        finished_p95=percentile(finished, 0.95),
        cut_off=cut / len(unfinished) if unfinished else 0.0,
        rules=rules,
        model=model,
        replies=replies,
    )


# Reply-time bins (s after the caller's voice ended), for the distribution table.
REPLY_BINS = (0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0)


def distribution(replies: dict[str, list[float]]) -> list[str]:
    """The reply times as a Markdown table: how many answers fell in each bin."""
    edges = (0.0, *REPLY_BINS, float("inf"))
    lines = ["| reply after | finished | unfinished |", "| --- | --- | --- |"]
    for low, high in zip(edges, edges[1:], strict=False):
        name = f"≥ {low:g} s" if high == float("inf") else f"{low:g}–{high:g} s"
        counts = [sum(low <= r < high for r in replies[key]) for key in replies]
        lines.append(f"| {name} | " + " | ".join(map(str, counts)) + " |")
    return lines


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def describe(policy: TurnPolicy) -> str:
    """The policy's knobs, as the benchmark ran them."""
    return (
        f"TURN_INCOMPLETE_WAIT_S={policy.incomplete_wait_s:g}, "
        f"TURN_DANGLING_WAIT_S={policy.dangling_wait_s:g}, "
        f"TURN_UNFINISHED_BELOW={policy.unfinished_below:g}; LLM and TTS instant."
    )


def report(summary: Summary, policy: TurnPolicy, caller_pause_s: float = CALLER_PAUSE_S) -> str:
    """The figures as Markdown."""
    columns = ("at once", "later", "mid-utterance")
    lines = [
        describe(policy),
        "",
        f"| utterance | answered within {AT_ONCE_S:g} s | answered later "
        "| answered mid-utterance |",
        "| --- | --- | --- | --- |",
    ]
    for name, counts in summary.matrix.items():
        total = sum(counts.values())
        lines.append(f"| {name} ({total}) | " + " | ".join(str(counts[c]) for c in columns) + " |")
    lines += ["", "| utterance | Smart Turn: complete | incomplete |", "| --- | --- | --- |"]
    for name, counts in summary.model.items():
        lines.append(f"| {name} | {counts['complete']} | {counts['incomplete']} |")
    lines += ["", "| rule that decided | finished | unfinished |", "| --- | --- | --- |"]
    for rule in sorted(set(summary.rules["finished"]) | set(summary.rules["unfinished"])):
        counts = (summary.rules["finished"][rule], summary.rules["unfinished"][rule])
        lines.append(f"| {rule} | {counts[0]} | {counts[1]} |")
    lines += ["", *distribution(summary.replies)]
    lines += [
        "",
        f"Finished: reply p50 {_seconds(summary.finished_p50)}, p95 "
        f"{_seconds(summary.finished_p95)} after the caller stops (target p95 ≤ 1.0 s).",
        f"Unfinished: {summary.cut_off:.0%} cut off, answered before the caller's "
        f"{caller_pause_s:g} s pause was over (target ≤ 10 %).",
    ]
    return "\n".join(lines)


def misses(outcomes: Iterable[Outcome], caller_pause_s: float = CALLER_PAUSE_S) -> list[str]:
    """One line per finished utterance answered late and unfinished one cut off."""
    lines = []
    for outcome in outcomes:
        obs = outcome.observation
        late = obs.finished and (outcome.mid_utterance or outcome.reply_s > AT_ONCE_S)
        if late or (not obs.finished and is_cut_off(outcome, caller_pause_s)):
            last = obs.pauses[-1] if obs.pauses else None
            heard = f"{last.text!r} p={last.probability:.2f}" if last else "nothing heard"
            where = " mid-utterance" if outcome.mid_utterance else ""
            lines.append(
                f"{label(outcome):10} {outcome.reply_s:5.2f} s {outcome.rule}{where}: "
                f"{obs.text!r} -> {heard} ({len(obs.pauses)} pause(s))"
            )
    return lines


# ------------------------------------------------------------------------ hearing the audio


def phone_audio(text: str) -> np.ndarray:
    """`text` in the joe voice through the phone channel, 8 kHz int16, cached as a WAV."""
    from phonebot.ai.offline.channel import phone_channel
    from phonebot.ai.offline.piper_voice import VOICE_NAME, synthesize_at

    digest = hashlib.sha256(f"{VOICE_NAME}|deterministic|{text}".encode()).hexdigest()[:16]
    path = RESULTS / "audio" / f"{digest}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        voice_rate = 22050
        pcm = phone_channel(synthesize_at(text, voice_rate, deterministic=True), voice_rate)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(RATE)
            out.writeframes(pcm)
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)


def caller_audio(text: str, finished: bool) -> np.ndarray:
    """What the caller says: a finished sentence as written; an unfinished one broken off.

    A voice speaking "My order number is" as a sentence ends it like one (falling pitch,
    the last word drawn out), which a caller who stops mid-sentence to look something up
    does not do. So the unfinished text is spoken going on ("My order number is, let me
    think.") and cut where the voice pauses after it: the audio of a caller who stops
    there (the gap nearest the length of the text spoken alone).
    """
    if finished:
        return phone_audio(text)
    going_on = phone_audio(f"{text.rstrip(',')}, {GOES_ON}")
    cut = pause_near(going_on, len(phone_audio(text)) / RATE)
    if cut is None:
        print(f"  no pause after {text!r}: spoken as a sentence", file=sys.stderr)
        return phone_audio(text)
    return going_on[:cut]


def pause_near(samples: np.ndarray, at_s: float, floor_db: float = -40.0) -> int | None:
    """Where the voice pauses for breath nearest `at_s`: the start of the nearest run of at
    least 150 ms of 10 ms frames `floor_db` under the loudest (a comma's pause; the dips
    between words are shorter), or None if none starts within 0.5 s of it."""
    frame, run = RATE // 100, 15
    frames = samples[: len(samples) // frame * frame].astype(np.float64).reshape(-1, frame)
    rms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-9
    quiet = 20 * np.log10(rms / rms.max()) < floor_db
    starts = [
        index * frame
        for index in range(1, len(quiet) - run)
        if quiet[index] and not quiet[index - 1] and quiet[index : index + run].all()
    ]
    near = [start for start in starts if abs(start / RATE - at_s) <= 0.5]
    return min(near, key=lambda start: abs(start / RATE - at_s)) if near else None


def voice_end_s(samples: np.ndarray, floor_db: float = -35.0) -> float:
    """Where the voice ends: the end of the last 10 ms frame within `floor_db` of the
    loudest one."""
    frame = RATE // 100
    frames = samples[: len(samples) // frame * frame].astype(np.float64).reshape(-1, frame)
    rms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-9
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > floor_db)[0]
    return float((loud[-1] + 1) * frame / RATE) if len(loud) else 0.0


def vad_segments(samples: np.ndarray, settings: Settings) -> list[tuple[int, int]]:
    """(start, stop) sample indexes where the VAD reported speech started and stopped: the
    end of the 60 ms batch in which it said so, as the server's VAD controller reports only
    SPEAKING and QUIET (Pipecat's VADController)."""
    from pipecat.audio.vad.vad_analyzer import VADState

    from phonebot.ai.inference import SharedSileroVADAnalyzer
    from phonebot.call.barge_in import vad_params
    from phonebot.pipecat_compat import run_silero
    from phonebot.twilio.transport import INBOUND_BATCH_MS

    vad = SharedSileroVADAnalyzer(sample_rate=RATE, params=vad_params(settings))
    vad.set_sample_rate(RATE)
    batch = INBOUND_BATCH_MS * RATE // 1000
    segments, started, speaking = [], 0, False
    for at in range(0, len(samples) - batch + 1, batch):
        state = run_silero(vad, samples[at : at + batch].tobytes())
        if state == VADState.SPEAKING and not speaking:
            started, speaking = at + batch, True
        elif state == VADState.QUIET and speaking:
            segments.append((started, at + batch))
            speaking = False
    if speaking:
        segments.append((started, len(samples)))
    return segments


class Listener:
    """The listening half of a call, offline: the VAD, Smart Turn, the recogniser."""

    def __init__(self, settings: Settings, transcribe: Callable[[np.ndarray], str]):
        from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams

        from phonebot.ai.inference import SharedSmartTurnAnalyzer

        self.settings = settings
        self.params = SmartTurnParams()
        self.turn = SharedSmartTurnAnalyzer(params=self.params)
        self.turn.set_sample_rate(RATE)
        self.transcribe = transcribe

    def observe(self, text: str, finished: bool) -> Observation:
        voice = caller_audio(text, finished)
        lead, tail = np.zeros(int(LEAD_S * RATE), np.int16), np.zeros(int(TAIL_S * RATE), np.int16)
        samples = np.concatenate([lead, voice, tail])
        pauses, turn_start, previous_stop = [], None, 0
        for start, stop in vad_segments(samples, self.settings):
            turn_start = start if turn_start is None else turn_start
            probability, inference_s = self._smart_turn(samples, turn_start, stop)
            transcript, stt_s = self._stt(samples, max(previous_stop, start - RATE), stop)
            pauses.append(
                Pause(start / RATE, stop / RATE, probability, inference_s, transcript, stt_s)
            )
            if probability > COMPLETE_ABOVE:
                turn_start = None  # Pipecat's analyzer clears its audio on "complete"
            previous_stop = stop
        return Observation(text, finished, LEAD_S + voice_end_s(voice), tuple(pauses))

    def _smart_turn(self, samples: np.ndarray, turn_start: int, stop: int) -> tuple[float, float]:
        """Smart Turn on what Pipecat's BaseSmartTurn gives it at a VAD stop: from its
        `pre_speech_ms` (+ the VAD's start delay) before the turn's speech began, to the
        stop, at most `max_duration_secs`."""
        from phonebot.pipecat_compat import predict_endpoint

        before = self.params.pre_speech_ms / 1000 + self.settings.vad_start_s
        first = max(0, turn_start - int(before * RATE))
        first = max(first, stop - int(self.params.max_duration_secs * RATE))
        audio = samples[first:stop].astype(np.float32) / 32768.0
        cpu = time.process_time()
        result = predict_endpoint(self.turn, audio)
        return float(result["probability"]), time.process_time() - cpu

    def _stt(self, samples: np.ndarray, first: int, stop: int) -> tuple[str, float]:
        """The recogniser on what Pipecat's SegmentedSTTService hands it at a VAD stop: up
        to 1 s before the speech started, to the stop, then 0.5 s of silence."""
        segment = np.concatenate([samples[first:stop], np.zeros(RATE // 2, np.int16)])
        cpu = time.process_time()
        text = self.transcribe(segment)
        return text, time.process_time() - cpu


def whisper_transcriber() -> Callable[[np.ndarray], str]:
    """The server's offline recogniser, as a call runs it: the packaged Whisper tiny.en
    (hash-checked, never the network), the project's resampler, the server's decoding
    options and guards (`phonebot.ai.offline.whisper`), so the benchmark's transcripts are
    the ones the turn rules see in a call."""
    from phonebot.ai.offline.stt import transcribe, warm_up

    warm_up()  # load and check the model before the first measured decode

    def heard(samples: np.ndarray) -> str:
        return transcribe(samples.tobytes(), RATE)

    return heard


def recogniser_fingerprint() -> str:
    """What the transcripts depend on: the model and how the server decodes with it."""
    from phonebot.ai.offline import whisper

    options = sorted(whisper.DECODE_OPTIONS.items())
    guards = (whisper.NO_SPEECH_DROP, whisper.TOKENS_BASE, whisper.TOKENS_PER_SECOND)
    return f"whisper {whisper.TINY_EN_SHA256[:8]} {whisper.COMPUTE_TYPE} {options} {guards}"


# ------------------------------------------------------------------------ the corpus, cached


def corpus() -> list[tuple[str, bool, bool]]:
    """(text, finished, held out) for every utterance: the tuning part, then the held-out."""
    from bench.turn_corpus import FINISHED, HELD_OUT_FINISHED, HELD_OUT_UNFINISHED, UNFINISHED

    return [
        *((text, True, False) for text in FINISHED),
        *((text, False, False) for text in UNFINISHED),
        *((text, True, True) for text in HELD_OUT_FINISHED),
        *((text, False, True) for text in HELD_OUT_UNFINISHED),
    ]


def fingerprint(settings: Settings) -> str:
    """What the cached measurements depend on besides the text: the VAD settings, the
    recogniser, and how unfinished utterances are spoken."""
    vad = f"vad {settings.vad_confidence} {settings.vad_start_s} {settings.vad_min_volume}"
    return f"{vad}; {recogniser_fingerprint()}; unfinished broken off before {GOES_ON!r}"


def load_cache(path: Path, key: str) -> dict[str, Observation]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("fingerprint") != key:
        return {}
    return {
        text: Observation(
            text,
            entry["finished"],
            entry["speech_end_s"],
            tuple(Pause(**pause) for pause in entry["pauses"]),
        )
        for text, entry in data["observations"].items()
    }


def save_cache(path: Path, key: str, observations: dict[str, Observation]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {text: asdict(obs) for text, obs in observations.items()}
    path.write_text(json.dumps({"fingerprint": key, "observations": entries}, indent=1))


def observe_corpus(settings: Settings, fresh: bool) -> list[Observation]:
    """Every utterance heard (from the cache when it holds them)."""
    path, key = RESULTS / "observations.json", fingerprint(settings)
    cached = {} if fresh else load_cache(path, key)
    items = corpus()
    todo = [(text, finished) for text, finished, _ in items if text not in cached]
    if todo:
        listener = Listener(settings, whisper_transcriber())
        started = time.monotonic()
        for n, (text, finished) in enumerate(todo, 1):
            cached[text] = listener.observe(text, finished)
            if n % 20 == 0:
                print(f"  heard {n}/{len(todo)} ({time.monotonic() - started:.0f} s)", flush=True)
        save_cache(path, key, cached)
    return [
        replace(cached[text], finished=finished, held_out=held_out)
        for text, finished, held_out in items
    ]


def stage_times(observations: Sequence[Observation]) -> str:
    pauses = [pause for obs in observations for pause in obs.pauses]
    stt = [p.stt_s for p in pauses]
    turn = [p.inference_s for p in pauses]
    stops = [p.stopped_s - obs.speech_end_s for obs in observations for p in obs.pauses[-1:]]
    return (
        f"Per pause (CPU, one idle core): recogniser p50 {statistics.median(stt):.2f} s, "
        f"p95 {percentile(stt, 0.95):.2f} s; Smart Turn p50 {statistics.median(turn) * 1000:.0f}"
        f" ms; the VAD's stop came {statistics.median(stops):.2f} s (p50) after the voice "
        f"ended; {sum(len(o.pauses) > 1 for o in observations)} utterance(s) had an inner pause."
    )


# The trade-off `--sweep` prints: Smart Turn's "unfinished below" × the incomplete wait.
SWEEP_UNFINISHED_BELOW = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
SWEEP_INCOMPLETE_WAIT = (0.7, 2.0)


def sweep(
    observations: Sequence[Observation],
    policy: TurnPolicy,
    stop_secs: float,
    caller_pause_s: float = CALLER_PAUSE_S,
) -> str:
    """Cut-off share against finished reply times, for each pair of knobs, on the tuning
    corpus and the held-out part apart (Markdown)."""
    lines = [
        "| unfinished below | incomplete wait | tuning: cut off | finished p95 | within 1 s "
        "| held out: cut off | finished p95 | within 1 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for below in SWEEP_UNFINISHED_BELOW:
        for wait in SWEEP_INCOMPLETE_WAIT:
            knobs = replace(policy, unfinished_below=below, incomplete_wait_s=wait)
            cells = [f"{below:g}", f"{wait:g} s"]
            for held_out in (False, True):
                part = [judge(o, knobs, stop_secs) for o in observations if o.held_out == held_out]
                summary = summarize(part, caller_pause_s=caller_pause_s)
                finished = summary.matrix["finished"]
                at_once = finished["at once"] / max(1, sum(finished.values()))
                cells += [
                    f"{summary.cut_off:.0%}",
                    _seconds(summary.finished_p95),
                    f"{at_once:.0%}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incomplete-wait", type=float, help="TURN_INCOMPLETE_WAIT_S")
    parser.add_argument("--dangling-wait", type=float, help="TURN_DANGLING_WAIT_S")
    parser.add_argument("--caller-pause", type=float, default=CALLER_PAUSE_S)
    parser.add_argument("--misses", action="store_true", help="list every miss")
    parser.add_argument("--unfinished-below", type=float, help="TURN_UNFINISHED_BELOW")
    parser.add_argument("--sweep", action="store_true", help="print the trade-off curve")
    parser.add_argument("--fresh", action="store_true", help="measure again, ignore the cache")
    args = parser.parse_args(argv)
    settings = Settings()
    policy = TurnPolicy.from_settings(settings)
    if args.incomplete_wait is not None:
        policy = replace(policy, incomplete_wait_s=args.incomplete_wait)
    if args.dangling_wait is not None:
        policy = replace(policy, dangling_wait_s=args.dangling_wait)
    if args.unfinished_below is not None:
        policy = replace(policy, unfinished_below=args.unfinished_below)
    observations = observe_corpus(settings, args.fresh)
    stop_secs = vad_stop_secs(settings)
    outcomes = [judge(obs, policy, stop_secs) for obs in observations]
    for held_out in (False, True):
        part = [o for o in outcomes if o.observation.held_out == held_out]
        print(f"\n## {'Held out' if held_out else 'Tuning corpus'} ({len(part)} utterances)\n")
        print(report(summarize(part, caller_pause_s=args.caller_pause), policy, args.caller_pause))
    print("\n" + stage_times(observations))
    if args.sweep:
        print("\n" + sweep(observations, policy, stop_secs, args.caller_pause))
    if args.misses:
        print("\n" + "\n".join(misses(outcomes, args.caller_pause)))
    return 0


def vad_stop_secs(settings: Settings) -> float:
    from phonebot.call.barge_in import vad_params

    return vad_params(settings).stop_secs


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")  # not Pipecat's and the models' DEBUG lines
    raise SystemExit(main())
