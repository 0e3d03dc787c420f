"""`python -m phonebot.records list | show | export` over a records database."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phonebot.records import Records
from phonebot.records.cli import main
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'calls.db'}"

    async def fill() -> None:
        records = Records(make_settings(database_url=url))
        await records.start()
        writer = records.writer
        writer.call_started("CAin", direction="inbound", from_number="+15550001",
                            to_number="+15559999", persona="support",
                            parameters={"token": "abcdef0123456789", "user_id": "u1"})
        writer.transcript("CAin", "bot", "Hello, how can I help?", reply_latency_s=0.6)
        writer.transcript("CAin", "caller", "where is my order")
        writer.transcript("CAin", "keypad", "1")
        writer.transcript("CAin", "function", data={"name": "lookup_order",
                                                    "arguments": {"id": 7}, "result": "late"})
        writer.transcript("CAin", "bot", "It is running late", reply_latency_s=0.9,
                          interrupted=True)
        writer.transcript("CAin", "bot", "Your parcel left our depot on Monday.",
                          interrupted=True,
                          data={"heard_s": 1.3, "heard_text": "Your parcel left", "spoken_s": 2.6})
        writer.call_ended("CAin", end_reason="caller hung up")
        writer.dialout_status("CAbusy", "busy", to_number="+15550002", campaign_id="spring")
        await records.stop()

    asyncio.run(fill())
    return url


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_list_shows_one_line_per_call(database, capsys):
    code, out = run(capsys, "--database-url", database, "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert "CAbusy" in lines[0] and "not connected" in lines[0]  # newest first
    assert "CAin" in lines[1] and "+15550001 → +15559999" in lines[1] and "support" in lines[1]
    code, out = run(capsys, "--database-url", database, "list", "--status", "busy")
    assert out.count("\n") == 1 and "CAbusy" in out


def test_show_prints_the_conversation(database, capsys):
    code, out = run(capsys, "--database-url", database, "show", "CAin")
    assert code == 0
    assert "end_reason             caller hung up" in out
    assert "abcdef0123456789" not in out  # the stream token is never stored
    transcript = out.split("transcript:\n")[1].splitlines()
    assert [line.split("] ", 1)[1] for line in transcript] == [
        "bot: Hello, how can I help?  (0.60s)",
        "caller: where is my order",
        "caller pressed 1",
        'bot called lookup_order({"id": 7}) → "late"',
        "bot: It is running late  (0.90s)  [interrupted]",
        "bot: Your parcel left our depot on Monday."
        '  [interrupted after 1.3s: heard "Your parcel left"]',
    ]
    assert run(capsys, "--database-url", database, "show", "CAnope")[0] == 1


def test_export_csv_and_jsonl(database, capsys, tmp_path):
    code, out = run(capsys, "--database-url", database, "export", "--format", "csv",
                    "--since", "2000-01-01")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["call_sid"] for r in rows] == ["CAbusy", "CAin"]
    assert rows[0]["twilio_status"] == "busy" and rows[0]["campaign_id"] == "spring"
    assert json.loads(rows[1]["parameters"]) == {"user_id": "u1"}
    assert rows[1]["from"] == "'+15550001"  # escaped like any formula start (csv_cells)

    target = tmp_path / "calls.jsonl"
    code, _ = run(capsys, "--database-url", database, "export", "--format", "jsonl",
                  "--direction", "inbound", "--output", str(target))
    (call,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert call["call_sid"] == "CAin" and len(call["transcript"]) == 6

    code, out = run(capsys, "--database-url", database, "export", "--since", "2999-01-01")
    assert code == 0 and out == ""


def test_the_module_runs(database):
    result = subprocess.run(
        [sys.executable, "-m", "phonebot.records", "--database-url", database, "list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "CAin" in result.stdout
