"""Benchmark the offline speech engines over a simulated phone line.

Speaks a fixed set of phone-call phrases with espeak-ng, sends them through the phone path
(8 kHz, G.711 mu-law round trip) and transcribes them with pocketsphinx, reporting word accuracy
(1 - WER) and real-time factors. It also decodes with a native 8 kHz front end, the rejected
alternative to upsampling, so the choice made in ``phonebot/ai/offline/stt.py`` stays checkable.

Run: ``.venv/bin/python bench/offline_engines.py`` (about 30 s on one core).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger  # noqa: E402
from pocketsphinx import Decoder, get_model_path  # noqa: E402

from phonebot.ai.offline import stt  # noqa: E402
from phonebot.ai.offline.channel import PHONE_SAMPLE_RATE, phone_channel  # noqa: E402
from phonebot.ai.offline.espeak import synthesize  # noqa: E402

PHRASES = [
    "I'd like to book an appointment",
    "What are your opening hours?",
    "Yes, please.",
    "I want to speak to a person",
    "My order has not arrived",
    "My phone number is 5 5 5 1 2 3 4",
    "Can you call me back tomorrow morning?",
    "No thank you, that's all",
    "I need to cancel my reservation",
    "How much does it cost?",
    "The order number is 4 7 2 9",
    "Please send me an email",
    "Is there anyone available right now?",
    "I'd like a table for 2 at 7",
    "Thank you, goodbye",
]


@dataclass
class Result:
    """One benchmark row."""

    name: str
    accuracy: float | None
    rtf: float
    setup_s: float = 0.0


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            cost = min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_word != hyp_word))
            diagonal, row[j] = row[j], cost
    return row[-1]


def accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word accuracy, 1 - WER, on normalised text."""
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_words = stt.normalize_transcript(ref).split()
        errors += word_errors(ref_words, stt.normalize_transcript(hyp).split())
        total += len(ref_words)
    return 1.0 - errors / total


def synthesize_all() -> tuple[list[bytes], Result]:
    """Speak every phrase and pass it through the phone channel."""
    phone_audio, spent, seconds = [], 0.0, 0.0
    for phrase in PHRASES:
        start = time.perf_counter()
        pcm, rate = synthesize(phrase)
        spent += time.perf_counter() - start
        seconds += len(pcm) / 2 / rate
        phone_audio.append(phone_channel(pcm, rate))
    return phone_audio, Result("TTS espeak-ng (22.05 kHz)", None, spent / seconds)


def run_stt(
    name: str, audio: list[bytes], decode: Callable[[bytes], str], setup_s: float
) -> Result:
    """Decode every clip, timing only the decoding."""
    start = time.perf_counter()
    hypotheses = [decode(clip) for clip in audio]
    spent = time.perf_counter() - start
    seconds = sum(len(clip) for clip in audio) / 2 / PHONE_SAMPLE_RATE
    for ref, hyp in zip(PHRASES, hypotheses, strict=True):
        logger.debug(f"{name}: {stt.normalize_transcript(ref)!r} -> {hyp!r}")
    return Result(name, accuracy(PHRASES, hypotheses), spent / seconds, setup_s)


def timed(build: Callable[[], object]) -> tuple[object, float]:
    """Call ``build`` and return its result and duration."""
    start = time.perf_counter()
    value = build()
    return value, time.perf_counter() - start


def native_8k_decoder(directory: Path) -> Decoder:
    """General decoder whose front end runs at 8 kHz (the strategy stt.py rejects).

    The model's feat.params pins a 6800 Hz filterbank, which 8 kHz audio cannot have, so the
    model is linked into a scratch directory with the filterbank capped below Nyquist.
    """
    source = Path(get_model_path("en-us/en-us"))
    for item in source.iterdir():
        if item.name != "feat.params":
            os.symlink(item, directory / item.name)
    params = (source / "feat.params").read_text().replace("-upperf 6800", "-upperf 3800")
    (directory / "feat.params").write_text(params)
    return Decoder(hmm=str(directory), samprate=PHONE_SAMPLE_RATE, nfft=256, loglevel="FATAL")


def decode_with(decoder: Decoder) -> Callable[[bytes], str]:
    """A one-shot decode function over a raw pocketsphinx decoder."""

    def decode(pcm: bytes) -> str:
        decoder.start_utt()
        # Same silence handling as stt.transcribe, so only the front end differs.
        decoder.process_raw(stt.squeeze_silence(pcm, PHONE_SAMPLE_RATE), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    return decode


def benchmark() -> list[Result]:
    """All rows, in display order."""
    audio, tts_row = synthesize_all()
    _, general_setup = timed(lambda: stt.warm_up(None))
    _, vocab_setup = timed(lambda: stt.warm_up(PHRASES))
    rows = [
        tts_row,
        run_stt(
            "STT general, 8k->16k upsample",
            audio,
            lambda pcm: stt.transcribe(pcm, PHONE_SAMPLE_RATE),
            general_setup,
        ),
        run_stt(
            "STT vocabulary, 8k->16k upsample",
            audio,
            lambda pcm: stt.transcribe(pcm, PHONE_SAMPLE_RATE, vocabulary=PHRASES),
            vocab_setup,
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        decoder, setup = timed(lambda: native_8k_decoder(Path(tmp)))
        rows.append(run_stt("STT general, native 8k front end", audio, decode_with(decoder), setup))
    return rows


def print_table(rows: list[Result]) -> None:
    """Compact fixed-width table."""
    print(f"{'engine / mode':<36} {'word acc':>8} {'RTF':>7} {'setup s':>8}")
    print("-" * 62)
    for row in rows:
        acc = f"{row.accuracy:.1%}" if row.accuracy is not None else "-"
        print(f"{row.name:<36} {acc:>8} {row.rtf:>7.3f} {row.setup_s:>8.2f}")
    print(f"\n{len(PHRASES)} phrases; RTF = processing s per s of audio (lower is faster)")


def main() -> None:
    """Run the benchmark; ``-v`` logs every transcript."""
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if "-v" in sys.argv else "WARNING")
    print_table(benchmark())


if __name__ == "__main__":
    main()
