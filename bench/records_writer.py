"""What call records cost a call: the enqueue on the call's event loop, and the writer's
throughput and CPU per call-minute, on SQLite (or DATABASE_URL=postgresql://…).

    .venv/bin/python bench/records_writer.py [--calls 200] [--database-url URL]
        [--batch-size 1]   # worst case: every write its own transaction (a quiet server)

A simulated call-minute has the writes a busy real one makes: start, 12 turns each way, two
key presses, a function call, the end. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phonebot.db.engine import create_engine, sessionmaker  # noqa: E402
from phonebot.db.migrate import migrate  # noqa: E402
from phonebot.records.writer import RecordWriter  # noqa: E402

TURNS = 12


def one_call_minute(writer: RecordWriter, call_sid: str, timings: list[float]) -> None:
    def timed(method, *args, **kwargs) -> None:
        started = time.perf_counter_ns()
        method(*args, **kwargs)
        timings.append((time.perf_counter_ns() - started) / 1000)

    timed(writer.call_started, call_sid, direction="inbound", from_number="+15550001",
          to_number="+15559999", persona="support", parameters={"session_type": "support"})
    for turn in range(TURNS):
        timed(writer.transcript, call_sid, "caller", f"caller sentence number {turn} " * 3)
        timed(writer.transcript, call_sid, "bot", f"bot answer number {turn} " * 4,
              reply_latency_s=0.7)
    timed(writer.transcript, call_sid, "keypad", "1")
    timed(writer.transcript, call_sid, "keypad", "2")
    timed(writer.transcript, call_sid, "function",
          data={"name": "lookup", "arguments": {"id": 1}, "result": "ok"})
    timed(writer.call_ended, call_sid, end_reason="caller hung up", duration_s=60.0)


async def main(calls: int, database_url: str, batch_size: int) -> None:
    await migrate(database_url)
    engine = create_engine(database_url)
    writer = RecordWriter(
        sessionmaker(engine), queue_size=1_000_000, batch_size=batch_size, linger_s=0
    )
    timings: list[float] = []
    for i in range(calls):
        one_call_minute(writer, f"CAbench{i:06d}", timings)
    ops = writer.queued
    cpu0, wall0 = time.process_time(), time.perf_counter()
    writer.start()
    await writer.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await writer.close()
    await engine.dispose()
    timings.sort()
    print(f"database: {database_url.split('://')[0]}, {calls} call-minutes, {ops} writes,"
          f" batches of up to {batch_size}")
    print(f"enqueue on the call's loop: median {statistics.median(timings):.1f} µs,"
          f" p99 {timings[int(len(timings) * 0.99)]:.1f} µs per write")
    print(f"writer: {ops / wall:,.0f} writes/s, {wall / calls * 1000:.2f} ms wall and"
          f" {cpu / calls * 1000:.2f} ms CPU (this process) per call-minute")
    print(f"failed {writer.failed_writes}, dropped {writer.dropped_writes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--database-url")
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    asyncio.run(main(args.calls, url, args.batch_size))
