"""`python -m phonebot.agents check`: every agent and what picks it, its tools, knowledge and
analysis, then every problem as the server would name it; exit 0 clean, 1 on any problem."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from phonebot.agents.cli import main
from phonebot.config import get_settings
from tests.conftest import shipped_agents
from tests.live_server import ROOT
from tests.test_agents_reload import TOOLS_MODULE, break_sales, fresh_agents


@pytest.fixture
def agents_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped agents plus `orders` (an HTTP and a Python tool, outcome fields, an
    analysis) and `vip` (picked only when named); the Python tool importable."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return fresh_agents(tmp_path / "agents")


def shipped_names() -> list[str]:
    return sorted(agent.name for agent in shipped_agents().agents)


def check(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(["check", *argv])
    return code, capsys.readouterr().out


def block(out: str, name: str) -> list[str]:
    """The lines of one agent in the report: its title, then its indented rows."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" — ")[0] == name)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")),
               len(lines))  # fmt: skip
    return lines[start:end]


def test_clean_files_list_every_agent_and_exit_0(agents_dir: Path, capsys):
    code, out = check(capsys, "--dir", str(agents_dir))
    assert code == 0
    assert out.startswith(f"Agents in {agents_dir}/:\n")
    assert out.rstrip().endswith(f"{len(shipped_names()) + 2} agents, no problems.")
    assert block(out, "general")[:2] == [
        "general — Answers Acme Outdoor's main number.", "  picked by   default"]
    assert "  picked by   direction=inbound, session_type=support" in block(out, "support")
    assert ('  analysis    yes; summary; success "The customer agreed to receive the discount '
            'code."; success offline when interested=yes') in block(out, "summer_sale")
    assert "  picked by   only when named" in block(out, "vip")
    orders = block(out, "orders")
    assert orders[0] == "orders — Order status by phone."
    assert orders[2:4] == [
        "  tools       check_order_status  http  https://example.com/tools/order-status"
        "  (timeout 4 s, filler)",
        f"              lookup_customer  python  {TOOLS_MODULE}:lookup_customer  (timeout 5 s)",
    ]  # fmt: skip
    assert "  outcomes    resolved (yes/no)" in orders
    assert ('  analysis    yes; summary; success "The caller learned where the order is."; '
            "fields: order_number") in orders  # fmt: skip
    assert any(line.startswith(f"  file        {agents_dir / 'orders.yaml'}  (version ")
               for line in orders)  # fmt: skip
    assert "  tools       none" in block(out, "vip") and "  analysis    no" in block(out, "vip")
    knowledge = next(line for line in block(out, "support") if "knowledge" in line)
    assert knowledge.startswith("  knowledge   acme-faq.md: ") and " passages, " in knowledge


def test_problems_are_named_after_the_agents_that_load_and_exit_1(agents_dir: Path, capsys):
    problem_start, _ = break_sales(agents_dir)
    (agents_dir / "orders.yaml").write_text(
        (agents_dir / "orders.yaml").read_text().replace("url: https://", "url: not-a-url ")
    )
    code, out = check(capsys, "--dir", str(agents_dir))
    assert code == 1
    titles = [line.split(" — ")[0] for line in out.splitlines()[2:]
              if line and not line.startswith(" ")][:-1]  # fmt: skip
    good = sorted({*shipped_names(), "vip"} - {"sales"})
    assert titles == good  # the files that load, in file order
    report = out[out.index("2 problem(s); the server would refuse these files:"):]
    lines = report.splitlines()[1:]
    assert lines[0].startswith(f"  {agents_dir / 'orders.yaml'}:")
    assert "tools.0.url: " in lines[0]
    assert lines[1].startswith(f"  {problem_start}")


def test_agents_that_clash_are_a_problem_too(agents_dir: Path, capsys):
    (agents_dir / "copy.yaml").write_text(
        (agents_dir / "general.yaml").read_text().replace("name: general", "name: copy")
    )
    code, out = check(capsys, "--dir", str(agents_dir))
    assert code == 1
    assert "exactly one agent needs `default: true`" in out and "found 2" in out
    assert "copy — Answers Acme Outdoor's main number." in out  # each file loads on its own


def test_a_missing_folder_is_a_problem(tmp_path: Path, capsys):
    code, out = check(capsys, "--dir", str(tmp_path / "nowhere"))
    assert code == 1
    assert "(none loads)" in out
    assert f"  {tmp_path / 'nowhere'}: AGENTS_DIR is not a directory" in out


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """`get_settings` reads the environment once per process: again for this test."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_folder_defaults_to_agents_dir(agents_dir: Path, capsys, monkeypatch, fresh_settings):
    break_sales(agents_dir)
    monkeypatch.setenv("AGENTS_DIR", str(agents_dir))
    code, out = check(capsys)
    assert code == 1 and f"Agents in {agents_dir}/:" in out
    monkeypatch.delenv("AGENTS_DIR")
    get_settings.cache_clear()
    code, out = check(capsys)  # the shipped agents
    assert code == 0 and f"{len(shipped_names())} agents, no problems." in out


def test_the_command_runs_as_a_module_without_log_noise(agents_dir: Path):
    """`python -m phonebot.agents check` as a user types it: the report on stdout, exit
    status as promised, nothing on stderr (no import banner), 2 for a bad command line."""
    run = [sys.executable, "-m", "phonebot.agents"]
    env = {"PATH": "", "PYTHONPATH": str(agents_dir.parent), "HOME": str(agents_dir.parent)}
    done = subprocess.run([*run, "check", "--dir", str(agents_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"{len(shipped_names()) + 2} agents, no problems.")
    assert done.stderr == ""
    break_sales(agents_dir)
    done = subprocess.run([*run, "check", "--dir", str(agents_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "1 problem(s)" in done.stdout
    wrong = subprocess.run([*run, "chek"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


# --- dialout.py --agent --------------------------------------------------------------------


def test_dialout_py_names_the_agent_checked_against_agents_dir(
    agents_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch, fresh_settings
):
    import dialout

    created: list[dict] = []

    async def fake_create_call(settings, **call):
        created.append(call)
        return SimpleNamespace(sid="CA" + "1" * 32, status="queued", to=call["to"])

    monkeypatch.setattr("phonebot.twilio.dialout.create_call", fake_create_call)
    for name, value in {"PUBLIC_URL": "https://bot.example.com", "AGENTS_DIR": str(agents_dir),
                        "TWILIO_PHONE_NUMBER": "+15550001111"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)

    assert dialout.main(["+15551234567", "--agent", "nobody"]) == 1
    assert "error: --agent: no agent named 'nobody'" in capsys.readouterr().err
    assert created == []  # never placed
    assert dialout.main(["+15551234567", "--agent", "vip"]) == 0
    [call] = created
    assert parse_qs(urlsplit(call["twiml_url"]).query) == {"agent": ["vip"]}
    break_sales(agents_dir)  # the files must load to check a name against them
    assert dialout.main(["+15551234567", "--agent", "vip"]) == 1
    assert "keypad.0" in capsys.readouterr().err
