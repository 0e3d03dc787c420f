"""The agents in use: `GET /agents`, `POST /agents/reload`, SIGHUP, the agents page, an agent
named by /dialout and by a campaign, and agent files that stop the server.

In-process apps for the API and the page; then the real thing: `python server.py` with its
own AGENTS_DIR (a copy of the shipped agents, edited by the tests), the Twilio emulator and
the offline engines, so a reload is heard in the next call's greeting while a call that was
already talking keeps answering from the old file. A bad file stops one process and the
supervisor of `--workers 2` with exit 2 naming file:line: field; the supervisor forwards
SIGHUP to every worker (stand-in workers, then two real ones on Redis).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from loguru import logger

from phonebot.agents.agent import Agent, opening_line
from phonebot.agents.loader import load_agents
from phonebot.config import SHIPPED_AGENTS_DIR
from phonebot.emulator import (
    Hangup,
    MediaStreamCaller,
    Pause,
    Step,
    TwilioRestEmulator,
    WaitForBot,
    dial_in,
)
from phonebot.web.app import create_app
from phonebot.web.workers import EXIT_OK, Supervisor, listening_socket
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY, make_settings, shipped_agents
from tests.live_server import ROOT, LiveServer, free_port, twilio_for
from tests.test_calls import CALLER, OUR_NUMBER, say, server_env
from tests.test_campaigns_emulator import noon_zone

pytest_plugins = ["tests.redis_server"]

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OLD_GREETING = "Hello, you've reached Acme Outdoor sales."
NEW_GREETING = "Welcome to the new Acme Outdoor sales line."
VIP_GREETING, NEW_VIP_GREETING = "Hello, this is the VIP line.", "Hi, the new VIP line here."
VIP_HOURS, NEW_VIP_HOURS = "open day and night", "open from eight to eight"
TOOLS_MODULE = "agents_reload_tools"
# An agent with both kinds of tool, outcome fields and an analysis; and one only a dial
# that names it gets.
ORDERS = f"""\
name: orders
description: Order status by phone.
match: {{direction: inbound, session_type: orders}}
instructions: You help with orders.
greeting: Orders desk.
tools:
  - name: check_order_status
    description: Look up the delivery status of an order by its number.
    parameters: {{type: object, properties: {{order_number: {{type: string}}}},
                 required: [order_number]}}
    url: https://example.com/tools/order-status
    timeout_s: 4
    filler: One moment while I look that up.
  - name: lookup_customer
    description: Find the customer.
    parameters: {{type: object, properties: {{customer_id: {{type: string}}}}}}
    python: {TOOLS_MODULE}:lookup_customer
outcome_fields:
  - name: resolved
    description: Whether the caller's question was sorted.
    values: ["yes", "no"]
analysis:
  success: The caller learned where the order is.
  fields:
    - name: order_number
      description: The order asked about.
"""
NAMED_ONLY = f"""\
name: vip
instructions: You look after our best customers.
greeting: {VIP_GREETING}
offline:
  answers:
    - keywords: [hours, open, opening]
      answer: The VIP line is {VIP_HOURS}.
"""
TOOLS_SOURCE = '''\
def lookup_customer(customer_id: str) -> dict:
    """Find the customer."""
    return {"customer_id": customer_id}
'''


def fresh_agents(directory: Path) -> Path:
    """A copy of the shipped agents, plus `orders` and `vip`, in `directory` (replaced)."""
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(SHIPPED_AGENTS_DIR, directory)
    (directory / "orders.yaml").write_text(ORDERS)
    (directory / "vip.yaml").write_text(NAMED_ONLY)
    (directory.parent / f"{TOOLS_MODULE}.py").write_text(TOOLS_SOURCE)
    return directory


def edit(directory: Path, name: str, old: str, new: str) -> None:
    path = directory / f"{name}.yaml"
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new))


def loaded(directory: Path, name: str) -> Agent:
    """The agent as the server would load it from `directory` now."""
    agent = load_agents(directory, make_settings()).by_name(name)
    assert agent is not None
    return agent


def break_sales(directory: Path) -> tuple[str, str]:
    """A keypad action that does not exist, at the end of sales.yaml; its problem's start
    (file:line: field) and the field."""
    path = directory / "sales.yaml"
    text = path.read_text().rstrip("\n") + "\n"
    path.write_text(text + 'keypad:\n  "0": dance\n')
    line = text.count("\n") + 2
    return f"{path}:{line}: keypad.0: ", "keypad.0"


@pytest.fixture
def tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The orders agent's Python tool module importable here (it sits beside the agents)."""
    monkeypatch.syspath_prepend(str(tmp_path))


# --- GET /agents, POST /agents/reload, the page: in-process --------------------------------


@pytest.fixture
def agents_dir(tmp_path: Path, tools_on_path: None) -> Path:
    return fresh_agents(tmp_path / "agents")


def app_client(agents_dir: Path, **settings: object) -> TestClient:
    values = {"admin_api_key": ADMIN_KEY, "agents_dir": str(agents_dir), "call_records": False}
    return TestClient(create_app(make_settings(**{**values, **settings})), follow_redirects=False)


def test_the_agents_api_needs_the_admin_key(agents_dir: Path):
    with app_client(agents_dir) as client:
        for path, call in (("/agents", client.get), ("/agents/reload", client.post)):
            assert call(path).status_code == 401
            wrong = call(path, headers={"Authorization": "Bearer not-the-key"})
            assert wrong.status_code == 401
            assert wrong.headers["www-authenticate"] == "Bearer"
    with app_client(agents_dir, admin_api_key=None) as client:
        assert client.get("/agents", headers=ADMIN).status_code == 503  # off, not open


def test_get_agents_lists_each_agent_its_tools_knowledge_and_analysis(agents_dir: Path):
    with app_client(agents_dir) as client:
        listing = client.get("/agents", headers=ADMIN).json()
    assert listing["directory"] == str(agents_dir)
    assert listing["loaded_at"]
    agents = {agent["name"]: agent for agent in listing["agents"]}
    assert set(agents) == {agent.name for agent in shipped_agents().agents} | {"orders", "vip"}
    assert agents["general"]["default"] and agents["general"]["picked_by"] == "default"
    assert agents["support"]["picked_by"] == "direction=inbound, session_type=support"
    assert agents["vip"]["picked_by"] == "only when named"
    orders = agents["orders"]
    assert orders["description"] == "Order status by phone."
    assert orders["source"] == str(agents_dir / "orders.yaml")
    assert orders["version"] == loaded(agents_dir, "orders").version
    assert orders["tools"] == [
        {"name": "check_order_status", "kind": "http",
         "target": "https://example.com/tools/order-status", "timeout_s": 4.0,
         "filler": "One moment while I look that up."},
        {"name": "lookup_customer", "kind": "python",
         "target": f"{TOOLS_MODULE}:lookup_customer", "timeout_s": 5.0, "filler": None},
    ]  # fmt: skip
    assert orders["outcome_fields"] == [{"name": "resolved", "values": ["yes", "no"],
                                         "description": "Whether the caller's question was "
                                         "sorted."}]  # fmt: skip
    assert orders["analysis"]["success"] == "The caller learned where the order is."
    assert orders["analysis"]["fields"] == ["order_number"]
    assert orders["knowledge"] is None and agents["vip"]["analysis"] is None
    knowledge = agents["support"]["knowledge"]
    assert knowledge["files"] == ["acme-faq.md"] and knowledge["passages"] > 0
    assert knowledge["use"] in ("prompt", "searched")


def test_a_reload_swaps_the_agents_and_a_bad_file_keeps_them(agents_dir: Path):
    with app_client(agents_dir) as client:
        registry = client.app.state.services.agents
        old_version = registry.current.by_name("sales").version
        edit(agents_dir, "sales", OLD_GREETING, NEW_GREETING)
        answer = client.post("/agents/reload", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["loaded"] is True and body["problems"] == []
        assert body["workers_reloading"] is False  # one process: nobody else to ask
        sales = next(agent for agent in body["agents"] if agent["name"] == "sales")
        assert sales["version"] != old_version
        assert registry.current.by_name("sales").greeting == NEW_GREETING

        in_use = registry.current
        problem_start, _ = break_sales(agents_dir)
        refused = client.post("/agents/reload", headers=ADMIN)
        assert refused.status_code == 422
        body = refused.json()
        assert body["loaded"] is False
        assert [p for p in body["problems"] if p.startswith(problem_start)], body["problems"]
        assert registry.current is in_use  # the old set stays, whole
        listed = client.get("/agents", headers=ADMIN).json()["agents"]
        assert {a["name"]: a["version"] for a in listed}["sales"] == sales["version"]


def test_the_agents_page_needs_a_login_and_shows_every_agent(agents_dir: Path):
    with app_client(agents_dir) as client:
        first = client.get("/calls/ui/agents")
        assert first.status_code == 303
        assert first.headers["location"] == "/calls/ui/login?next=%2Fcalls%2Fui%2Fagents"
        login = client.post("/calls/ui/login", data={"key": ADMIN_KEY, "next": "/calls/ui/agents"})
        assert login.headers["location"] == "/calls/ui/agents"
        page = client.get("/calls/ui/agents")
    assert page.status_code == 200
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none'
    html = page.text
    for name in [agent.name for agent in shipped_agents().agents] + ["orders", "vip"]:
        assert f'<tr data-agent="{name}">' in html
    assert "direction=inbound, session_type=support" in html
    assert "only when named" in html
    assert '<tr data-tool="check_order_status"><td>check_order_status</td><td>http</td>' in html
    assert f"<code>{TOOLS_MODULE}:lookup_customer</code>" in html
    assert "The caller learned where the order is." in html
    assert "acme-faq.md" in html
    assert '<a class="brand" href="/calls/ui/agents">agents</a>' in html  # in the header


# --- the real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The server's AGENTS_DIR; its Python tool importable here too (for `loaded`)."""
    directory = fresh_agents(tmp_path_factory.mktemp("live") / "agents")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory.parent))
        yield directory


@pytest.fixture(scope="module")
def live(rest_port: int, live_agents: Path) -> Iterator[LiveServer]:
    env = server_env(
        rest_port, ADMIN_API_KEY=ADMIN_KEY, AGENTS_DIR=str(live_agents),
        PYTHONPATH=str(live_agents.parent), CAMPAIGN_TICK_S="0.2",
    )  # fmt: skip
    server = LiveServer(env, live_agents.parent)
    yield server
    server.stop()


@pytest.fixture
def agents(live: LiveServer, live_agents: Path) -> Path:
    """The server's AGENTS_DIR, back to the shipped files and reloaded before each test."""
    fresh_agents(live_agents)
    response = httpx.post(f"{live.base_url}/agents/reload", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return live_agents


@pytest.fixture
async def twilio(live: LiveServer, rest_port: int) -> AsyncIterator[TwilioRestEmulator]:
    async with twilio_for(live, rest_port) as emulator:
        yield emulator


def dialin_opening(agent: Agent) -> str:
    return opening_line(agent, {"caller_id": CALLER})


def hours_answer(agent: Agent) -> str:
    return next(entry.answer for entry in agent.answers if "hours" in entry.keywords)


ASKS_THE_HOURS: list[Step] = [WaitForBot(), say("what are your opening hours"),
                              WaitForBot(timeout=15), Hangup()]


async def start_call(live: LiveServer, twilio: TwilioRestEmulator,
                     **query: str) -> tuple[str, MediaStreamCaller]:
    dial = await dial_in(f"{live.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                         query=query, from_=CALLER, to=OUR_NUMBER)  # fmt: skip
    caller = dial.caller()
    twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
    return dial.call_sid, caller


async def greeted(live: LiveServer, twilio: TwilioRestEmulator, **query: str) -> list[str]:
    """What the bot said on a call that hangs up once the greeting starts (the log has
    the whole text the bot handed to its TTS)."""
    call_sid, caller = await start_call(live, twilio, **query)
    await caller.run([WaitForBot(until="speech"), Pause(0.3)])
    return live.bot_lines(call_sid)


async def logged(live: LiveServer, text: str, count: int = 1, timeout_s: float = 20) -> None:
    """Until `text` is in `count` lines of the server's log (without blocking the loop the
    emulated callers stream on)."""
    deadline = time.monotonic() + timeout_s
    while sum(text in line for line in live.logs) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not logged:\n" + "\n".join(
            live.logs[-30:]
        )
        await asyncio.sleep(0.05)


def count(live: LiveServer, text: str) -> int:
    return sum(text in line for line in live.logs)


async def test_a_bad_reload_answers_422_and_calls_keep_the_agents_in_use(live, agents, twilio):
    before = loaded(agents, "sales")
    problem_start, field = break_sales(agents)
    async with httpx.AsyncClient(base_url=live.base_url, headers=ADMIN, timeout=30) as client:
        refused = await client.post("/agents/reload")
        listed = (await client.get("/agents")).json()["agents"]
    assert refused.status_code == 422
    assert any(p.startswith(problem_start) for p in refused.json()["problems"]), refused.text
    assert {a["name"]: a["version"] for a in listed}["sales"] == before.version
    assert await greeted(live, twilio, session_type="sales") == [dialin_opening(before)]
    assert "Agents not reloaded, the old set stays" in live.log_text()
    assert field in live.log_text()


async def test_sighup_reloads_the_agents_for_the_next_call(live, agents, twilio):
    before = loaded(agents, "sales")
    problem_start, _ = break_sales(agents)
    refusals = count(live, "Agents not reloaded")
    live.send_signal(signal.SIGHUP)  # a bad file: logged, and the server goes on as it was
    await logged(live, "Agents not reloaded", refusals + 1)
    await logged(live, problem_start)
    assert live.health()["status"] == "ok"
    assert await greeted(live, twilio, session_type="sales") == [dialin_opening(before)]

    fresh_agents(agents)
    edit(agents, "sales", OLD_GREETING, NEW_GREETING)
    reloads = count(live, "Agents reloaded from")
    live.send_signal(signal.SIGHUP)
    await logged(live, "Agents reloaded from", reloads + 1)
    after = loaded(agents, "sales")
    assert f"sales@{after.version}" in live.log_text()
    assert await greeted(live, twilio, session_type="sales") == [dialin_opening(after)]
    assert NEW_GREETING in dialin_opening(after)
    assert "Traceback" not in live.log_text()


async def test_a_live_call_keeps_its_agent_through_a_reload(live, agents, twilio):
    """The vip agent (named by the call's `agent` parameter) changes its greeting and its
    answer while a call with it is talking: that call answers from the old file, the next
    one greets and answers from the new."""
    before = loaded(agents, "vip")
    call_sid, caller = await start_call(live, twilio, agent="vip")
    # Greeted (a second or two of speech: the reload below is done by its end), then a
    # question.
    script = [WaitForBot(), Pause(0.5), *ASKS_THE_HOURS[1:]]
    first = asyncio.create_task(caller.run(script))
    await logged(live, f"Call {call_sid} bot says")

    edit(agents, "vip", VIP_GREETING, NEW_VIP_GREETING)
    edit(agents, "vip", VIP_HOURS, NEW_VIP_HOURS)
    async with httpx.AsyncClient(base_url=live.base_url, headers=ADMIN, timeout=30) as client:
        reloaded = await client.post("/agents/reload")
    assert reloaded.status_code == 200, reloaded.text
    after = loaded(agents, "vip")
    second_sid, second = await start_call(live, twilio, agent="vip")
    await asyncio.gather(first, second.run(ASKS_THE_HOURS))

    assert live.bot_lines(call_sid) == [dialin_opening(before), hours_answer(before)]
    assert VIP_HOURS in hours_answer(before)
    assert live.bot_lines(second_sid) == [dialin_opening(after), hours_answer(after)]
    assert NEW_VIP_GREETING in dialin_opening(after) and NEW_VIP_HOURS in hours_answer(after)
    # The reload came while the first call was talking, before its question was answered.
    reload_at = next(i for i, line in enumerate(live.logs) if f"vip@{after.version}" in line)
    answer_at = next(i for i, line in enumerate(live.logs)
                     if f"Call {call_sid} bot says" in line and VIP_HOURS in line)  # fmt: skip
    assert reload_at < answer_at


async def dialout(live: LiveServer, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(f"{live.base_url}/dialout", json=body,
                                 headers={"Authorization": f"Bearer {DIALOUT_KEY}"})


async def answered_call(twilio: TwilioRestEmulator):
    """The next call the server places, answered by a callee who says hello and listens."""
    async def callee(call, caller: MediaStreamCaller) -> None:
        call.result = await caller.run([say("hello?"), WaitForBot(timeout=15), Hangup()])

    twilio.on_answer = callee
    call = await twilio.wait_for_call(timeout=20)
    await call.wait_finished(timeout=40)
    assert call.exception is None
    return call


async def test_dialout_naming_an_agent_is_greeted_by_it(live, agents, twilio):
    unknown = await dialout(live, {"to": "+15551234567", "agent": "nobody"})
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "agent"
    assert "no agent named 'nobody'" in unknown.json()["detail"]
    clash = await dialout(live, {"to": "+15551234567", "agent": "vip",
                                 "parameters": {"agent": "sales"}})  # fmt: skip
    assert clash.status_code == 422 and "names another agent" in clash.text
    hidden = await dialout(live, {"to": "+15551234567", "parameters": {"agent": "nobody"}})
    assert hidden.status_code == 422 and hidden.json()["field"] == "parameters.agent"
    assert twilio.requests == []  # none of them reached Twilio

    placed = await dialout(live, {"to": "+15551234567", "agent": "vip"})
    assert placed.status_code == 201, placed.text
    call = await answered_call(twilio)
    parameters = call.twiml.stream.parameters
    assert parameters["agent"] == "vip" and parameters["call_type"] == "outbound"
    # Without the name, an outbound call would have the `outbound` agent.
    vip = loaded(agents, "vip")
    assert live.bot_lines(call.sid) == [opening_line(vip, parameters)]


async def test_a_campaign_naming_an_agent_calls_with_it(live, agents, twilio):
    contact = {"to": "+12025550150", "timezone": noon_zone()}
    body = {"name": "vip calls", "agent": "vip", "contacts": [contact],
            "parameters": {"campaign_id": "summer_sale"},
            "window": {"start": "00:00", "end": "23:59"}}  # fmt: skip
    async with httpx.AsyncClient(base_url=live.base_url, headers=ADMIN, timeout=30) as client:
        unknown = await client.post("/campaigns", json={**body, "agent": "nobody"})
        assert unknown.status_code == 422
        assert unknown.json()["detail"][0]["loc"] == ["body", "agent"]
        assert "no agent named 'nobody'" in unknown.json()["detail"][0]["msg"]
        created = await client.post("/campaigns", json=body)
        assert created.status_code == 201, created.text
        call = await answered_call(twilio)
        detail = (await client.get(f"/campaigns/{created.json()['id']}")).json()
    assert detail["agent"] == "vip" and detail["parameters"]["agent"] == "vip"
    parameters = call.twiml.stream.parameters
    # campaign_id=summer_sale alone would pick summer_sale: the named agent wins.
    assert parameters["agent"] == "vip" and parameters["campaign_id"] == "summer_sale"
    assert live.bot_lines(call.sid) == [opening_line(loaded(agents, "vip"), parameters)]


# --- a bad file at start ----------------------------------------------------------------


def start_refused(tmp_path: Path, agents_dir: Path, *argv: str, **env: str) -> str:
    """`python server.py ARGV` with AGENTS_DIR=agents_dir: exit 2, one "refuses to start"
    line, no traceback, no worker started; its whole output."""
    full_env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HOST": "127.0.0.1",
        "PORT": str(free_port()), "AGENTS_DIR": str(agents_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'phonebot.db'}", **env,
    }  # fmt: skip
    done = subprocess.run([sys.executable, str(ROOT / "server.py"), *argv], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert sum("refuses to start" in line for line in output.splitlines()) == 1, output
    assert "Traceback" not in output
    assert "started (pid" not in output  # no worker was started
    return output


def test_a_bad_agent_file_stops_the_server_with_exit_2_naming_it(tmp_path: Path, tools_on_path):
    agents_dir = fresh_agents(tmp_path / "agents")
    problem_start, _ = break_sales(agents_dir)
    output = start_refused(tmp_path, agents_dir)
    assert problem_start in output
    assert "Input should be 'transfer' or 'end'" in output


def test_a_bad_agent_file_stops_the_workers_supervisor_with_exit_2(tmp_path: Path):
    """With --workers 2 the supervisor checks the files once, before starting any worker.
    (It checks REDIS_URL and STREAM_SECRET first, so they are given; nothing connects.)"""
    agents_dir = fresh_agents(tmp_path / "agents")
    problem_start, _ = break_sales(agents_dir)
    output = start_refused(
        tmp_path, agents_dir, "--workers", "2",
        REDIS_URL="redis://127.0.0.1:9/0", STREAM_SECRET="s" * 32,
        PYTHONPATH=str(tmp_path),
    )  # fmt: skip
    assert problem_start in output


# --- SIGHUP with --workers N ------------------------------------------------------------

# A stand-in worker: SIGHUP only after a moment (as a real one, once its app started),
# each one written to RELOAD_LOG; SIGTERM ends it.
FAKE_WORKER = r"""
import os, signal, sys, time
log = os.environ["RELOAD_LOG"]
time.sleep(float(os.environ["HANDLER_AFTER_S"]))
def on_sighup(sig, frame):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
stopping = []
signal.signal(signal.SIGHUP, on_sighup)
signal.signal(signal.SIGTERM, lambda sig, frame: stopping.append(sig))
with open(log + ".ready", "a") as f:
    f.write(f"{os.getpid()}\n")
while not stopping:
    time.sleep(0.02)
time.sleep(0.5)  # "draining"
sys.exit(0)
"""


def lines_of(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_until(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_supervisor_forwards_sighup_to_every_worker(tmp_path: Path, monkeypatch):
    # Supervisor.run installs signal handlers, which only the main thread may do; signals
    # are handed to it directly here (as test_workers.py does). A worker about to exec is
    # its own main thread: its SIGHUP is really ignored there.
    install = signal.signal
    monkeypatch.setattr(signal, "signal", lambda sig, handler: install(sig, handler)
                        if threading.current_thread() is threading.main_thread() else None)
    log = tmp_path / "reloads"
    sock = listening_socket("127.0.0.1", 0)
    env = {**os.environ, "RELOAD_LOG": str(log), "HANDLER_AFTER_S": "1.5"}
    supervisor = Supervisor([sys.executable, "-c", FAKE_WORKER], 2, sock, 10.0, env=env)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.rstrip()), format="{message}")
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(supervisor.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(supervisor.workers) == 2)
        pids = {worker.pid for worker in supervisor.workers.values()}
        # Before the workers handle SIGHUP (still "importing"): ignored, not fatal.
        supervisor.signals.append(signal.SIGHUP)
        wait_until(lambda: len(lines_of(Path(f"{log}.ready"))) == 2)
        assert lines_of(log) == []
        assert {worker.pid for worker in supervisor.workers.values()} == pids  # none died
        supervisor.signals.append(signal.SIGHUP)  # now each one reloads, and goes on
        wait_until(lambda: len(lines_of(log)) == 2)
        assert set(lines_of(log)) == {str(pid) for pid in pids}
        assert supervisor.stopping_since is None and len(supervisor.workers) == 2
        supervisor.signals.append(signal.SIGTERM)
        wait_until(lambda: supervisor.stopping_since is not None)
        supervisor.signals.append(signal.SIGHUP)  # while stopping: not forwarded
        thread.join(20)
        assert status == [EXIT_OK]
    finally:
        for worker in supervisor.workers.values():
            worker.process.kill()
        logger.remove(sink)
    assert len(lines_of(log)) == 2
    assert sum("SIGHUP: 2 worker(s) reload their agents" in line for line in lines) == 2
    assert any("SIGHUP while the workers stop: not forwarded" in line for line in lines)
    assert not any("died unexpectedly" in line for line in lines)


def test_two_real_workers_reload_on_sighup_and_on_post(redis_server, tmp_path: Path):
    agents_dir = fresh_agents(tmp_path / "agents")
    env = {"WORKERS": "2", "REDIS_URL": redis_server.url, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
           "STREAM_SECRET": "s" * 32, "SHUTDOWN_GRACE_S": "1", "ADMIN_API_KEY": ADMIN_KEY,
           "AGENTS_DIR": str(agents_dir), "PYTHONPATH": str(tmp_path)}  # fmt: skip
    server = LiveServer(env, tmp_path)
    try:
        for index in (1, 2):
            assert server.wait_for_log(f"Worker {index}/2 (pid", timeout_s=60)
        assert server.wait_for_log("Application startup complete", timeout_s=60)
        time.sleep(2)  # both lifespans are up (their SIGHUP handlers installed)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log_text().count("Agents reloaded from") == 2, 30)
        assert "SIGHUP: 2 worker(s) reload their agents" in server.log_text()

        edit(agents_dir, "sales", OLD_GREETING, NEW_GREETING)
        new_version = loaded(agents_dir, "sales").version
        answer = httpx.post(f"{server.base_url}/agents/reload", headers=ADMIN, timeout=30)
        assert answer.status_code == 200 and answer.json()["workers_reloading"] is True
        # The worker that answered reloads twice (the request, then the forwarded SIGHUP).
        wait_until(lambda: server.log_text().count("Agents reloaded from") == 5, 30)
        versions = set()
        for _ in range(40):  # a new connection each time: the workers race to accept
            listed = httpx.get(f"{server.base_url}/agents", headers=ADMIN, timeout=5).json()
            versions.add({a["name"]: a["version"] for a in listed["agents"]}["sales"])
        assert versions == {new_version}
        assert not [line for line in server.error_lines() if "Traceback" in line]
    finally:
        server.stop()


def test_sales_copy_is_what_the_tests_edit():
    """The edits above need these lines in the shipped sales agent."""
    assert OLD_GREETING in (SHIPPED_AGENTS_DIR / "sales.yaml").read_text()
