"""Microbenchmark of the shared models (phonebot.ai.inference): what batching buys.

    .venv/bin/python bench/inference.py                 # N = 1, 10, 20, 40
    .venv/bin/python bench/inference.py --calls 10,40 --paced-s 10

Prints, on this machine (process CPU time, so other load on a shared machine moves the
figures less than wall time would):
- Silero VAD: µs of CPU per 32 ms window scored alone, and in one run for N calls;
- Smart Turn v3: ms of CPU per prediction alone, and per prediction in a batch of N;
- paced: N calls each sending 60 ms of audio in real time through the VAD for a few
  seconds, unbatched (Pipecat's analysis inline, as before) and through the event loop's
  `SileroBatcher`: CPU seconds per call-minute and the mean batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phonebot import pipecat_compat as compat  # noqa: E402
from phonebot.ai.inference import (  # noqa: E402
    SharedSileroVADAnalyzer,
    SileroBatcher,
    silero_session,
    smart_turn_session,
)
from phonebot.ai.inference.vad import BATCH_WAIT_S, SileroStream, score_windows  # noqa: E402
from phonebot.ai.offline.espeak import synthesize_at  # noqa: E402

RATE = 8000
WINDOW = 256  # samples: 32 ms at 8 kHz
FRAME_BYTES = 960  # 60 ms: phonebot.twilio.transport.INBOUND_BATCH_MS


def vad_us_per_window(calls: int, rounds: int) -> float:
    """CPU µs per window when `calls` windows go through one run (1: scored alone)."""
    session = silero_session()
    streams = [SileroStream(session) for _ in range(calls)]
    rng = np.random.default_rng(1)
    windows = [rng.standard_normal(WINDOW).astype(np.float32) * 0.05 for _ in range(calls)]
    score_windows(session, streams, windows, RATE)  # warm up
    start = time.process_time()
    for _ in range(rounds):
        score_windows(session, streams, windows, RATE)
    return (time.process_time() - start) / rounds / calls * 1e6


def turn_ms_per_prediction(batch: int, rounds: int) -> float:
    """CPU ms per Smart Turn prediction, `batch` predictions per ONNX run."""
    session = smart_turn_session()
    features = np.random.default_rng(2).standard_normal((batch, 80, 800)).astype(np.float32)
    session.run(None, {"input_features": features})  # warm up
    start = time.process_time()
    for _ in range(rounds):
        session.run(None, {"input_features": features})
    return (time.process_time() - start) / rounds / batch * 1e3


async def paced(
    calls: int, seconds: float, batched: bool, wait_s: float = BATCH_WAIT_S
) -> tuple[float, float]:
    """(CPU s per call-minute, mean windows per ONNX run) for `calls` real-time streams."""
    speech = synthesize_at("What are your opening hours? I would like to book a table.", RATE)
    audio = (speech + bytes(RATE * 2)) * 20
    batcher = SileroBatcher(max_wait_s=wait_s)

    async def one_call(n: int) -> None:
        analyzer = SharedSileroVADAnalyzer(sample_rate=RATE, batcher=batcher)
        analyzer.set_sample_rate(RATE)
        await asyncio.sleep(0.06 * n / calls)  # calls don't start in step
        offset, started = n * 4800, time.monotonic()
        for frame_no in range(int(seconds / 0.06)):
            at = offset + frame_no * FRAME_BYTES
            frame = audio[at : at + FRAME_BYTES]
            if batched:
                await analyzer.analyze_audio(frame)
            else:
                compat.run_silero(analyzer, frame)
            await asyncio.sleep(max(0.0, started + (frame_no + 1) * 0.06 - time.monotonic()))

    start = time.process_time()
    await asyncio.gather(*(one_call(n) for n in range(calls)))
    cpu = time.process_time() - start
    mean_batch = batcher.windows / batcher.runs if batcher.runs else 1.0
    return cpu / (calls * seconds / 60), mean_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="1,10,20,40", help="the N to try")
    parser.add_argument("--paced-s", type=float, default=6.0, help="seconds of paced audio")
    parser.add_argument(
        "--wait-ms", default=str(int(BATCH_WAIT_S * 1000)), help="batch waits to try, e.g. 0,20"
    )
    parser.add_argument("--skip-models", action="store_true", help="only the paced runs")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.calls.split(",")]

    waits = [float(w) / 1000 for w in args.wait_ms.split(",")]
    SharedSileroVADAnalyzer()  # load the model before anything is timed
    if not args.skip_models:
        models(ns)
    print(f"VAD paced in real time for {args.paced_s:.0f} s, CPU s per call-minute:")
    for n in ns:
        inline, _ = asyncio.run(paced(n, args.paced_s, batched=False))
        row = f"  N = {n:<3} inline {inline:5.2f}"
        for wait_s in waits:
            batched, mean = asyncio.run(paced(n, args.paced_s, True, wait_s))
            row += f" | wait {wait_s * 1000:2.0f} ms: {batched:5.2f} (mean batch {mean:4.1f})"
        print(row, flush=True)
    return 0


def models(ns: list[int]) -> None:
    """Per-window and per-prediction CPU, alone and batched."""
    print("Silero VAD, CPU per 32 ms window:")
    alone = vad_us_per_window(1, 2000)
    print(f"  alone            {alone:7.1f} µs")
    for n in (n for n in ns if n > 1):
        print(f"  batch of {n:<3}     {vad_us_per_window(n, max(50, 2000 // n)):7.1f} µs")

    print("Smart Turn v3, CPU per prediction:")
    print(f"  alone            {turn_ms_per_prediction(1, 5):7.1f} ms")
    for n in (n for n in ns if 1 < n <= 10):
        print(f"  batch of {n:<3}     {turn_ms_per_prediction(n, 2):7.1f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
