"""`python -m phonebot.campaigns`: start from a CSV, list, status, pause, results, through
the server's API (its app served in this process: tests.campaigns_fixtures)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from phonebot.campaigns.cli import build_parser, campaign_options, main

pytest_plugins = ["tests.campaigns_fixtures"]


@pytest.fixture
def database(campaign_server: str, tmp_path: Path) -> Path:
    """A folder for the CSV; the server keeps the campaigns (the terminal has no database)."""
    return tmp_path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_start_status_pause_results(database: Path, capsys):
    contacts = database / "contacts.csv"
    contacts.write_text("to,customer_id,first_name\n+12025550100,c-1,Ann\n"
                        "+1 202 555 0101,c-2,Bob\n+12025550100,c-3,Ann\n")
    code, out, _ = run(capsys, "start", str(contacts), "--param", "campaign_id=summer_sale",
                       "--window", "09:00-20:00", "--max-concurrent", "5")
    assert code == 0
    campaign = out.split()[1].rstrip(":")
    assert out.startswith(f"campaign {campaign}: running, 2 contacts\n")
    assert "+12025550100 given on rows [1, 3]: merged" in out

    code, out, _ = run(capsys, "status", campaign)
    assert code == 0 and "(pending 2; 2 contacts)" in out and "+12025550101" in out
    assert run(capsys, "pause", campaign)[:2] == (0, f"campaign {campaign}: paused\n")
    code, _, err = run(capsys, "pause", campaign)
    assert code == 1 and "a paused campaign can't pause" in err
    code, out, _ = run(capsys, "results", campaign)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["to"], r["customer_id"], r["state"]) for r in rows] == [
        ("'+12025550100", "c-1", "pending"), ("'+12025550101", "c-2", "pending")]
    assert run(capsys, "list")[1].count(campaign) == 1


def test_bad_rows_and_unknown_campaigns_exit_1(database: Path, capsys):
    contacts = database / "bad.csv"
    contacts.write_text("to\n+15551234567\n+19005550100\n")
    code, _, err = run(capsys, "start", str(contacts))
    assert code == 1
    assert "contacts.0.to: row 1: '+15551234567' is not a valid phone number" in err
    assert "contacts.1.to: row 2: +19005550100 is a premium-rate number" in err
    code, _, err = run(capsys, "start", str(contacts), "--window", "20:00-09:00")
    assert code == 1 and "window.end must be after window.start" in err
    assert run(capsys, "status", "cmp_nope")[0] == 1


def test_the_servers_settings_decide_and_its_key_is_needed(database: Path, capsys):
    """The terminal has neither TWILIO_PHONE_NUMBER nor DIALOUT_ALLOWED_COUNTRIES: the
    server's settings decide (US numbers, from its own number); a wrong key is refused."""
    contacts = database / "abroad.csv"
    contacts.write_text("to\n+12025550100\n+33612345678\n")
    code, _, err = run(capsys, "start", str(contacts))
    assert code == 1
    assert "contacts.1.to: row 2:" in err and "DIALOUT_ALLOWED_COUNTRIES" in err
    assert "contacts.0" not in err
    code, _, err = run(capsys, "--api-key", "wrong-key", "list")
    assert code == 1 and "ADMIN_API_KEY" in err


def test_an_unreachable_server_is_named(capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PHONEBOT_URL", "http://127.0.0.1:9")
    code, _, err = run(capsys, "list")
    assert code == 1 and "the server isn't reachable at http://127.0.0.1:9" in err


def test_start_names_the_agent_of_every_call(database: Path, capsys):
    contacts = database / "contacts.csv"
    contacts.write_text("to\n+12025550100\n")
    code, out, _ = run(capsys, "start", str(contacts), "--agent", "sales")
    assert code == 0
    campaign = out.split()[1].rstrip(":")
    code, out, _ = run(capsys, "status", campaign)
    assert code == 0 and out.splitlines()[0].endswith("  agent sales")
    code, _, err = run(capsys, "start", str(contacts), "--agent", "nobody")
    assert code == 1 and "error: agent: no agent named 'nobody'" in err


@pytest.mark.parametrize(
    ("flags", "detection"),
    [([], False), (["--machine-detection"], True), (["--bot-machine-detection"], "bot")],
)
def test_start_asks_for_twilios_or_the_bots_machine_detection(flags, detection):
    args = build_parser().parse_args(["start", "contacts.csv", *flags])
    assert campaign_options(args)["machine_detection"] == detection


def test_machine_detection_is_twilios_or_the_bots_not_both(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["start", "contacts.csv", "--machine-detection", "--bot-machine-detection"]
        )
    assert "not allowed with argument" in capsys.readouterr().err
