"""Benchmark the offline voice: Piper's joe (and espeak-ng, the fallback) at the phone's 8 kHz.

Prints, for a three-sentence reply as the bot speaks it (``piper_voice.sentences_at``: synthesis
and resampling to 8 kHz, the work ``OfflineTTSService`` does per reply): the time to the first
sentence's audio, the time for the whole reply, and the CPU per second of speech; plus the voice's
load time (SHA-256 check and ONNX session). ``measure_piper`` / ``measure_espeak`` return the
figures for other benchmarks (``bench/offline_engines.py``).

Piper is measured with 1 ONNX thread per inference (the server's choice), 2, and onnxruntime's
default (every core). Run: ``.venv/bin/python bench/offline_tts.py`` (about 20 s).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger  # noqa: E402

from phonebot.ai.offline import piper_voice  # noqa: E402
from phonebot.ai.offline.espeak import synthesize  # noqa: E402
from phonebot.audio import TWILIO_SAMPLE_RATE, resample_pcm16  # noqa: E402

REPLY = (
    "Thanks for calling, this is Joe. "
    "Our opening hours are nine to five, Monday to Friday. "
    "Is there anything else I can help you with?"
)
REPEATS = 5


@dataclass(frozen=True)
class TtsFigures:
    """One engine's medians over the repeats; times in seconds."""

    engine: str
    first_audio_s: float
    reply_s: float
    speech_s: float
    cpu_per_speech_s: float
    load_s: float | None = None


def _timed(sentences: Callable[[], Iterator[bytes]]) -> tuple[float, float, float, float]:
    """(first audio, whole reply, CPU, seconds of 8 kHz speech) for one rendering."""
    wall, cpu = time.perf_counter(), time.process_time()
    first, samples = None, 0
    for pcm in sentences():
        first = first if first is not None else time.perf_counter() - wall
        samples += len(pcm) // 2
    reply, spent = time.perf_counter() - wall, time.process_time() - cpu
    return first or reply, reply, spent, samples / TWILIO_SAMPLE_RATE


def _figures(engine: str, runs: list[tuple[float, float, float, float]], load_s: float | None):
    first, reply, cpu, speech = (statistics.median(column) for column in zip(*runs, strict=True))
    return TtsFigures(engine, first, reply, speech, cpu / speech, load_s)


def measure_piper(
    text: str = REPLY, repeats: int = REPEATS, threads: int = piper_voice.ONNX_THREADS
) -> TtsFigures:
    """Piper joe as the bot speaks it (the voice's own noise), after one warm-up rendering;
    ``threads`` ONNX threads per inference (0: onnxruntime's default, every core)."""
    started = time.perf_counter()
    voice = piper_voice.load_voice(piper_voice.packaged_voice(), threads=threads)
    load_s = time.perf_counter() - started
    list(piper_voice.sentences_at(voice, "Warm up.", TWILIO_SAMPLE_RATE))

    def render() -> Iterator[bytes]:
        return piper_voice.sentences_at(voice, text, TWILIO_SAMPLE_RATE)

    runs = [_timed(render) for _ in range(repeats)]
    threads_name = f"{threads} ONNX thread{'s' if threads != 1 else ''}" if threads else "all cores"
    return _figures(f"Piper {piper_voice.VOICE_NAME}, {threads_name}", runs, load_s)


def measure_espeak(text: str = REPLY, repeats: int = REPEATS) -> TtsFigures:
    """espeak-ng, the fallback: a whole reply in one piece."""
    synthesize("Warm up.")

    def render() -> Iterator[bytes]:
        pcm, rate = synthesize(text)
        yield resample_pcm16(pcm, rate, TWILIO_SAMPLE_RATE)

    return _figures("espeak-ng", [_timed(render) for _ in range(repeats)], None)


def table(rows: list[TtsFigures]) -> str:
    lines = [
        "| engine | load | first audio | whole reply | speech | CPU per s of speech |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        load = f"{row.load_s:.2f} s" if row.load_s is not None else "-"
        lines.append(
            f"| {row.engine} | {load} | {row.first_audio_s:.3f} s | {row.reply_s:.3f} s "
            f"| {row.speech_s:.2f} s | {row.cpu_per_speech_s:.3f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    logger.remove()  # espeak's debug line would land in the table
    # The server's choice (ONNX_THREADS) first, then the alternatives it was measured against.
    threads = [piper_voice.ONNX_THREADS, *(n for n in (1, 2, 0) if n != piper_voice.ONNX_THREADS)]
    rows = [*(measure_piper(threads=n) for n in threads), measure_espeak()]
    print(f"Three-sentence reply ({len(REPLY)} characters), 8 kHz, median of {REPEATS};")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows))


if __name__ == "__main__":
    main()
