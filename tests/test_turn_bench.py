"""The turn-taking benchmark's scoring (bench/turn_taking.py), on a few fixed utterances.

No model runs here: each utterance is given as the benchmark measures it (the VAD's start
and stop, Smart Turn's probability, the transcript, the CPU times), and the tests check
when the project's rules (phonebot.call.turns.TurnPolicy) make the bot answer, and how
the answers are counted. Running the benchmark itself takes minutes (bench/turn_taking.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench import turn_taking as bench
from bench.turn_corpus import FINISHED, HELD_OUT_FINISHED, HELD_OUT_UNFINISHED, UNFINISHED
from bench.turn_taking import Observation, Outcome, Pause, judge, summarize
from phonebot.ai.offline import stt, whisper
from phonebot.call.turns import TurnPolicy

POLICY = TurnPolicy(incomplete_wait_s=0.7, dangling_wait_s=3.0)
STOP_S = 0.2  # the VAD's stop_secs


def heard(text: str, probability: float, *, finished: bool = True, end: float = 1.3) -> Observation:
    """One utterance whose voice ended at `end` s, heard in one piece: the VAD stops 0.3 s
    later, Smart Turn takes 0.1 s of CPU, the recogniser 0.4 s."""
    pause = Pause(0.6, end + 0.3, probability, 0.1, text, 0.4)
    return Observation(text, finished, end, (pause,))


def test_a_finished_sentence_the_model_calls_complete_is_answered_when_the_transcript_is_in():
    outcome = judge(heard("What are your opening hours?", 0.95), POLICY, STOP_S)
    # VAD stop at 1.6 s + 0.4 s of recogniser = 2.0 s, 0.7 s after the voice ended
    assert outcome.rule == "model_complete"
    assert outcome.reply_s == pytest.approx(0.7)
    assert not outcome.mid_utterance


def test_an_unsure_model_with_a_finished_transcript_waits_the_incomplete_wait():
    outcome = judge(heard("I moved house last month.", 0.2), POLICY, STOP_S)
    # the strategy's speech end is the VAD stop - stop_secs (1.4 s): answered at 2.1 s
    assert outcome.rule == "finished_transcript"
    assert outcome.reply_s == pytest.approx(1.4 + 0.7 - 1.3)


def test_a_dangling_transcript_waits_the_dangling_wait_whatever_the_model_says():
    outcome = judge(heard("My order number is", 0.98, finished=False), POLICY, STOP_S)
    assert outcome.rule == "dangling_transcript"
    assert outcome.reply_s == pytest.approx(1.4 + 3.0 - 1.3)


def test_no_transcript_leaves_only_pipecat_s_watchdog():
    outcome = judge(heard("", 0.9), POLICY, STOP_S)
    assert outcome.rule == "no_transcript"
    assert outcome.reply_s == pytest.approx(1.4 + bench.WATCHDOG_S - 1.3)


def two_pieces(resumes_at: float) -> Observation:
    """'It's 5 5 5, 0 1 9 9.' with an inner pause: the first piece's VAD stop at 1.5 s."""
    first = Pause(0.6, 1.5, 0.95, 0.1, "It's 555.", 0.4)
    second = Pause(resumes_at, resumes_at + 1.0, 0.95, 0.1, "0199.", 0.4)
    return Observation("It's 5 5 5, 0 1 9 9.", True, resumes_at + 0.7, (first, second))


def test_a_caller_going_on_before_the_answer_cancels_it():
    outcome = judge(two_pieces(resumes_at=1.8), POLICY, STOP_S)  # answer was due at 1.9 s
    assert not outcome.mid_utterance
    assert outcome.reply_s == pytest.approx(2.8 + 0.4 - 2.5)


def test_an_answer_due_before_the_caller_goes_on_is_counted_mid_utterance():
    outcome = judge(two_pieces(resumes_at=2.5), POLICY, STOP_S)
    assert outcome.mid_utterance
    assert outcome.reply_s == pytest.approx(1.9 - 1.3)


def outcome(reply_s: float, finished: bool, mid: bool = False, rule: str = "r") -> Outcome:
    return Outcome(heard("x.", 0.9, finished=finished), reply_s, rule, mid)


def test_the_summary_counts_the_matrix_the_percentiles_and_the_cut_offs():
    outcomes = [outcome(0.6, True), outcome(0.8, True), outcome(3.0, True)]
    outcomes += [outcome(0.7, False), outcome(3.0, False), outcome(1.9, False, mid=True)]
    outcomes += [outcome(3.1, False), outcome(2.5, False)]
    summary = summarize(outcomes, at_once_s=1.0, caller_pause_s=2.0)

    assert summary.matrix["finished"] == {"at once": 2, "later": 1}
    assert summary.matrix["unfinished"] == {"at once": 1, "later": 3, "mid-utterance": 1}
    assert (summary.finished_p50, summary.finished_p95) == (0.8, 3.0)  # nearest rank
    assert summary.cut_off == pytest.approx(2 / 5)  # the 0.7 s answer and the mid-utterance
    assert summary.model["finished"] == {"complete": 3}
    text = bench.report(summary, POLICY)
    assert "| finished (3) | 2 | 1 | 0 |" in text
    assert "| unfinished (5) | 1 | 3 | 1 |" in text
    assert "40% cut off" in text


def test_misses_name_late_finished_and_cut_off_unfinished_utterances():
    lines = bench.misses([outcome(0.6, True), outcome(3.0, True), outcome(0.7, False)])
    assert [line.split()[0] for line in lines] == ["finished", "unfinished"]


def test_percentile_is_a_measured_value():
    assert bench.percentile([0.5, 0.1, 0.9, 0.3], 0.95) == 0.9
    assert bench.percentile([], 0.5) is None


def test_the_corpus_has_a_hundred_of_each_and_no_text_twice():
    assert len(FINISHED) >= 100 and len(UNFINISHED) >= 100
    assert len(HELD_OUT_FINISHED) >= 50 and len(HELD_OUT_UNFINISHED) >= 50
    everything = FINISHED + UNFINISHED + HELD_OUT_FINISHED + HELD_OUT_UNFINISHED
    assert len(set(everything)) == len(everything)


def test_the_held_out_part_is_scored_apart_from_the_tuning_corpus():
    labels = {(finished, held_out) for _, finished, held_out in bench.corpus()}
    assert labels == {(True, False), (False, False), (True, True), (False, True)}
    held_out = {text for text, _, held_out in bench.corpus() if held_out}
    assert held_out == set(HELD_OUT_FINISHED) | set(HELD_OUT_UNFINISHED)


def test_a_segment_waits_for_the_recogniser_to_finish_the_one_before():
    """Pipecat's segmented STT transcribes a call's segments one at a time: a caller who
    goes on at once has the second segment's transcript after the first's, not in parallel."""
    first = Pause(0.6, 1.5, 0.95, 0.1, "My order number is", 0.6)
    second = Pause(1.6, 2.0, 0.95, 0.1, "4 5 6.", 0.6)
    assert bench.transcript_times([first, second]) == pytest.approx([2.1, 2.7])
    outcome = judge(Observation("x", True, 1.8, (first, second)), POLICY, STOP_S)
    # digits read out: the dangling wait; but not before the second transcript is in
    assert outcome.reply_s == pytest.approx(1.8 + 3.0 - 1.8)
    quick = replace(POLICY, dangling_wait_s=0.0)
    assert judge(Observation("x", True, 1.8, (first, second)), quick, STOP_S).reply_s == (
        pytest.approx(2.7 - 1.8)
    )


def test_the_reply_times_are_binned_for_both_kinds():
    table = bench.distribution({"finished": [0.7, 0.9, 0.95], "unfinished": [0.9, 3.2]})
    assert "| 0.8–1 s | 2 | 1 |" in table
    assert "| 3–4 s | 0 | 1 |" in table
    assert "| ≥ 4 s | 0 | 0 |" in table


def test_the_sweep_scores_each_pair_of_knobs_on_both_parts():
    observations = [
        replace(heard("I'm not sure which.", 0.05, finished=False), held_out=held_out)
        for held_out in (False, True)
    ]
    table = bench.sweep(observations, POLICY, STOP_S).splitlines()
    assert len(table) == 2 + len(bench.SWEEP_UNFINISHED_BELOW) * len(bench.SWEEP_INCOMPLETE_WAIT)
    assert table[2].startswith("| 0 | 0.7 s | 100% |")  # off: cut off
    assert "| 0.15 | 0.7 s | 0% |" in "\n".join(table)  # sure it is unfinished: waits


def test_the_benchmark_hears_with_the_servers_recogniser(monkeypatch: pytest.MonkeyPatch):
    """The transcripts the rules are tuned on are the server's: its model, its resampler,
    its decoding options (phonebot.ai.offline.stt.transcribe)."""
    heard_by_server: list[tuple[int, int]] = []

    def server_transcribe(pcm: bytes, sample_rate: int, *, model: str | None = None) -> str:
        heard_by_server.append((len(pcm), sample_rate))
        return "Hello there."

    monkeypatch.setattr(stt, "transcribe", server_transcribe)
    monkeypatch.setattr(stt, "warm_up", lambda model=None: None)
    transcribe = bench.whisper_transcriber()
    assert transcribe(np.zeros(800, np.int16)) == "Hello there."
    assert heard_by_server == [(1600, bench.RATE)]


def test_the_cached_transcripts_are_keyed_on_the_servers_decoding_options(
    monkeypatch: pytest.MonkeyPatch,
):
    before = bench.recogniser_fingerprint()
    monkeypatch.setattr(whisper, "DECODE_OPTIONS", {**whisper.DECODE_OPTIONS, "beam_size": 1})
    assert bench.recogniser_fingerprint() != before


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * bench.RATE)) / bench.RATE
    return (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def test_an_unfinished_utterance_is_cut_at_the_pause_nearest_its_length():
    silence = np.zeros(int(0.2 * bench.RATE), np.int16)
    going_on = np.concatenate([tone(0.5), silence, tone(0.6), silence, tone(0.4)])
    assert bench.pause_near(going_on, 1.0) == int(1.3 * bench.RATE)
    assert bench.pause_near(going_on, 0.45) == int(0.5 * bench.RATE)
    assert bench.pause_near(tone(2.0), 1.0) is None
    assert bench.voice_end_s(np.concatenate([tone(0.5), silence])) == pytest.approx(0.5)
