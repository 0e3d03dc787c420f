"""Benchmark the offline speech engines on neural-voice phone audio.

Twenty ordinary caller sentences, spoken by Piper's "joe" (noise off, so every run hears the
same audio), go through the phone path (8 kHz, G.711 mu-law round trip: ``phone_channel``) and
are transcribed by Whisper tiny.en exactly as the server does it (``phonebot.ai.offline.stt``):
word accuracy per sentence and overall (both sides through ``normalize_transcript``), CPU and
wall time per utterance with the process pinned to one core, and the model's load time. Next
to the server's choices, the alternatives they were measured against: greedy search (beam 1), and
the encoder's window cut from Whisper's 30 s to 15 s (2.5x cheaper; on short replies it hears
worse: see ``phonebot/ai/offline/whisper.py``). Then turns with no speech in them (what is
heard, and its CPU), and the offline voice (``bench/offline_tts.py``): time to first audio and
CPU per second of speech for a three-sentence reply.

Run: ``.venv/bin/python bench/offline_engines.py`` (about a minute); ``--model DIR`` adds a
row for a faster-whisper model directory of your own (what ``OFFLINE_STT_MODEL`` takes);
``-v`` logs every transcript. Prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from load_markdown import cpu_model, package_version  # noqa: E402
from loguru import logger  # noqa: E402
from offline_tts import measure_espeak, measure_piper  # noqa: E402
from offline_tts import table as tts_table  # noqa: E402

from phonebot.ai.offline import piper_voice, whisper  # noqa: E402
from phonebot.ai.offline.channel import PHONE_SAMPLE_RATE, phone_channel  # noqa: E402
from phonebot.ai.offline.piper_voice import file_sha256  # noqa: E402
from phonebot.ai.offline.stt import (  # noqa: E402
    hint_options,
    normalize_transcript,
    to_model_audio,
    word_errors,
)

# The shipped agents' `hints`, as the server's STT passes them (phonebot.ai.offline.stt).
HINTS = ["Acme Outdoor"]
HINTED = hint_options(HINTS)
SENTENCES = [
    "Hi, I'd like to book a table for two tomorrow evening.",
    "Could somebody call me back tomorrow afternoon after two o'clock?",
    "My order number is 4 5 6 7 and it still hasn't arrived.",
    "What are your opening hours on Saturday?",
    "I want to speak to a real person, please.",
    "Can I change the delivery address on my order?",
    "Yes, that works for me.",
    "No thanks, that's all I needed.",
    "How much does the monthly plan cost?",
    "I was charged twice for the same order last week.",
    "Please cancel my appointment on Friday morning.",
    "Do you deliver to the north side of the city?",
    "My name is Sarah Johnson and my phone number ends in 3 4 1 2.",
    "I'm calling about the invoice you sent me yesterday.",
    "Is there a parking lot near your office?",
    "Can you send me a confirmation by email?",
    "The package arrived damaged and I would like a refund.",
    "I'd like to move my booking to next Tuesday at ten.",
    "Sorry, could you repeat that more slowly?",
    "Thank you very much, goodbye.",
]
# Short replies: where a shorter encoder window heard worse (whisper.py's docstring).
REPLIES = [
    "Yes.",
    "No.",
    "Yes please.",
    "Who is this?",
    "Please stop calling me.",
    "Remove me from your list.",
    "How long does delivery take?",
    "Wait, I have a question.",
    "I want a refund.",
    "Hang on a second.",
    "Okay, thanks.",
    "Goodbye.",
]
NOISE_SECONDS = 2.0


@dataclass(frozen=True)
class Heard:
    """One utterance decoded: the text, its word accuracy and its cost in seconds."""

    text: str
    accuracy: float
    cpu_s: float
    wall_s: float


@dataclass(frozen=True)
class SttRow:
    """One recogniser over one list of utterances."""

    name: str
    heard: list[Heard]
    corpus_accuracy: float
    load_s: float

    @property
    def mean_accuracy(self) -> float:
        return statistics.mean(h.accuracy for h in self.heard)


@dataclass(frozen=True)
class Corpus:
    """What was said, and how it sounded on the phone line."""

    texts: list[str]
    audio: list[bytes]


def spoken(texts: list[str]) -> Corpus:
    """Every text in joe's voice (noise off), through the phone channel."""
    audio = [
        phone_channel(piper_voice.synthesize_at(t, PHONE_SAMPLE_RATE, deterministic=True), 8000)
        for t in texts
    ]
    return Corpus(texts, audio)


def decode_all(
    name: str, corpus: Corpus, decode: Callable[[np.ndarray], str], load_s: float
) -> SttRow:
    """Decode every utterance once (after one warm-up decode), timing each."""
    decode(to_model_audio(corpus.audio[0], PHONE_SAMPLE_RATE))
    heard, errors, words = [], 0, 0
    for sentence, pcm in zip(corpus.texts, corpus.audio, strict=True):
        wall, cpu = time.perf_counter(), time.process_time()
        text = decode(to_model_audio(pcm, PHONE_SAMPLE_RATE))
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
        reference = normalize_transcript(sentence).split()
        wrong = word_errors(reference, normalize_transcript(text).split())
        errors, words = errors + wrong, words + len(reference)
        heard.append(Heard(text, max(0.0, 1 - wrong / len(reference)), cpu_s, wall_s))
        logger.debug(f"{name}: {sentence!r} -> {text!r}")
    return SttRow(name, heard, 1 - errors / words, load_s)


def timed_load(build: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    value = build()
    return value, time.perf_counter() - started


def windowed_model(frames: int) -> object:
    """tiny.en whose encoder reads ``frames`` 10 ms frames instead of 3000 (30 s).

    faster-whisper pads a turn's features with zeros to 3000 frames before ``encode``; this
    cuts them to ``frames`` (the turn's own length plus 1 s when that is longer).
    """
    from faster_whisper import WhisperModel

    class Windowed(WhisperModel):
        def encode(self, features: np.ndarray) -> object:
            if features.ndim == 2:
                voiced = np.flatnonzero(np.any(features != 0, axis=0))
                speech = int(voiced[-1]) + 1 if voiced.size else 0
                keep = min(features.shape[-1], max(frames, speech + 100))
                features = features[:, : keep + keep % 2]
            return super().encode(features)

    directory = str(whisper.packaged_model().directory)
    return Windowed(directory, compute_type="int8", cpu_threads=1)


def stt_rows(
    corpora: list[Corpus], server: object, load_s: float, own_model: str | None
) -> list[list[SttRow]]:
    """For each recogniser, its rows over ``corpora``: the server's (``server``, loaded in
    ``load_s``), then the alternatives it was chosen over, then ``own_model`` if given."""
    windowed, windowed_load_s = timed_load(lambda: windowed_model(1500))
    recognisers = [
        ("tiny.en, beam 5 (the server's)", lambda a: whisper.recognise(server, a), load_s),
        (
            f"tiny.en, beam 5, hints {HINTS} (the shipped agents')",
            lambda a: whisper.recognise(server, a, **HINTED),
            load_s,
        ),
        ("tiny.en, beam 1", lambda a: whisper.recognise(server, a, beam_size=1), load_s),
        (
            "tiny.en, beam 5, encoder window cut to 15 s",
            lambda a: whisper.recognise(windowed, a),
            windowed_load_s,
        ),
    ]
    if own_model:
        own, own_load_s = timed_load(
            lambda: whisper.load_model(whisper.model_files(own_model), workers=1)
        )
        label = f"{Path(own_model).name}, beam 5"
        recognisers.append((label, lambda a: whisper.recognise(own, a), own_load_s))
    return [
        [decode_all(name, corpus, decode, load) for corpus in corpora]
        for name, decode, load in recognisers
    ]


def speech_shaped_noise(text: str, seed: int) -> np.ndarray:
    """A sentence's spectrum with random phases: speech's loudness and colour, no words (what
    makes Whisper write "Thank you." without the no-speech check)."""
    pcm = piper_voice.synthesize_at(text, PHONE_SAMPLE_RATE, deterministic=True)
    spectrum = np.abs(np.fft.rfft(np.frombuffer(pcm, dtype=np.int16)))
    phases = np.exp(2j * np.pi * np.random.default_rng(seed).random(spectrum.size))
    return np.fft.irfft(spectrum * phases, n=len(pcm) // 2)


def noise_rows(model: object, **options: object) -> list[tuple[str, str, float]]:
    """(noise, what the server's recogniser hears, CPU s) for turns with no speech in them;
    ``options``: decoding options on top of the server's (the agents' hints)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(NOISE_SECONDS * PHONE_SAMPLE_RATE)) / PHONE_SAMPLE_RATE
    sources = {
        "silence": np.zeros_like(t),
        "hiss (-40 dBFS)": rng.normal(0, 300, t.size),
        "mains hum (60 + 120 Hz)": 800 * np.sin(2 * np.pi * 60 * t)
        + 400 * np.sin(2 * np.pi * 120 * t),
        "dial tone (350 + 440 Hz)": 1500 * np.sin(2 * np.pi * 350 * t)
        + 1500 * np.sin(2 * np.pi * 440 * t),
        "speech-shaped noise": speech_shaped_noise(SENTENCES[3], seed=0),
    }
    rows = []
    for name, samples in sources.items():
        pcm = phone_channel(np.clip(samples, -32768, 32767).astype(np.int16).tobytes(), 8000)
        cpu = time.process_time()
        text = whisper.recognise(model, to_model_audio(pcm, PHONE_SAMPLE_RATE), **options)
        rows.append((name, text, time.process_time() - cpu))
    return rows


def stt_table(rows: list[list[SttRow]]) -> str:
    lines = [
        f"| recogniser | {len(SENTENCES)} sentences: word accuracy | mean per sentence "
        f"| worst | {len(REPLIES)} short replies: word accuracy | CPU per utterance "
        "| wall per utterance | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sentences, replies in rows:
        heard = sentences.heard + replies.heard
        cpu = statistics.mean(h.cpu_s for h in heard)
        wall = statistics.mean(h.wall_s for h in heard)
        worst = min(h.accuracy for h in sentences.heard)
        lines.append(
            f"| {sentences.name} | {sentences.corpus_accuracy:.1%} "
            f"| {sentences.mean_accuracy:.1%} | {worst:.0%} | {replies.corpus_accuracy:.1%} "
            f"| {cpu:.3f} s | {wall:.3f} s | {sentences.load_s:.2f} s |"
        )
    return "\n".join(lines)


def sentence_table(row: SttRow, texts: list[str]) -> str:
    lines = ["| # | said | heard | accuracy | CPU |", "|---:|---|---|---:|---:|"]
    for i, (said, heard) in enumerate(zip(texts, row.heard, strict=True), 1):
        lines.append(
            f"| {i} | {said} | {heard.text} | {heard.accuracy:.0%} | {heard.cpu_s:.3f} s |"
        )
    return "\n".join(lines)


def noise_table(
    rows: list[tuple[str, str, float]], hinted: list[tuple[str, str, float]]
) -> str:
    lines = [
        f"| a turn of ~2 s of | heard | CPU | heard with hints {HINTS} |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {name} | {text!r} | {cpu:.3f} s | {with_hints!r} |"
        for (name, text, cpu), (_, with_hints, _) in zip(rows, hinted, strict=True)
    ]
    return "\n".join(lines)


def pin_to_one_core() -> int:
    """Run every thread on one CPU, so wall time is one core's time.

    ``sched_setaffinity(0, ...)`` pins only the calling thread on Linux; the threads the
    imports already started are pinned one by one, and later ones inherit it.
    """
    core = min(os.sched_getaffinity(0))
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # the thread has ended since
            os.sched_setaffinity(int(task.name), {core})
    return core


def header(argv: Sequence[str], core: int) -> str:
    command = shlex.join([".venv/bin/python", "bench/offline_engines.py", *argv])
    return "\n".join(
        [
            f"`{command}`: {cpu_model()} ({os.cpu_count()} cores, pinned to CPU {core}), "
            f"{platform.platform()}, Python {platform.python_version()}, faster-whisper "
            f"{package_version('faster-whisper')}, ctranslate2 {package_version('ctranslate2')}, "
            f"piper-tts {package_version('piper-tts')}; load average "
            f"{os.getloadavg()[0]:.2f} at the start.",
            "",
            f"Caller speech: Piper {piper_voice.VOICE_NAME} (noise off), 8 kHz mu-law, "
            "resampled to 16 kHz for Whisper (int8, one thread).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="also a faster-whisper model directory of your own")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every transcript")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    core = pin_to_one_core()
    print(header(sys.argv[1:] if argv is None else argv, core), "\n")
    hash_s = timed_load(lambda: file_sha256(whisper.packaged_model().weights))[1]
    server, load_s = timed_load(lambda: whisper.load_model(whisper.packaged_model(), workers=1))
    rows = stt_rows([spoken(SENTENCES), spoken(REPLIES)], server, load_s, args.model)
    print(stt_table(rows), "\n")
    print(f"The server's load includes the SHA-256 check of model.bin ({hash_s:.2f} s).\n")
    print("The server's recogniser, sentence by sentence:\n")
    print(sentence_table(rows[0][0], SENTENCES), "\n")
    print(noise_table(noise_rows(server), noise_rows(server, **HINTED)), "\n")
    print("Offline voice, a three-sentence reply at 8 kHz (bench/offline_tts.py):\n")
    print(tts_table([measure_piper(), measure_espeak()]))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
