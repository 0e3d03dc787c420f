"""The real server, started as `python server.py` on a loopback port, for integration tests.

A subprocess, not an in-process app: the server gets its own interpreter and core (as in
production), its settings come from the environment only (its working directory is a
scratch folder, so no developer `.env` leaks in), and its log is captured for assertions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from phonebot.call.bot_speech import bot_lines
from phonebot.emulator import CalleeBook, TwilioRestEmulator
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, DIALOUT_KEY

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90
CALLER = "+15557654321"
OUR_NUMBER = "+15550001111"


def server_env(rest_port: int, **settings: str) -> dict[str, str]:
    """A server with a Twilio account whose REST API is the emulator on `rest_port`."""
    return {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": OUR_NUMBER,
        "TWILIO_API_BASE_URL": f"http://127.0.0.1:{rest_port}",
        "DIALOUT_API_KEY": DIALOUT_KEY,
        **settings,
    }


def records_server(name: str, **settings: str) -> tuple[Callable, Callable]:
    """A module's `rest_port` and `server` fixtures: `python server.py` with Twilio's REST
    API on the emulator's port, call records in a SQLite file of its own (folder `name`),
    and `settings` (e.g. ADMIN_API_KEY to read the records)."""

    @pytest.fixture(scope="module")
    def rest_port() -> int:
        return free_port()

    @pytest.fixture(scope="module")
    def server(rest_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
        folder = tmp_path_factory.mktemp(name)
        database = f"sqlite:///{folder / 'calls.db'}"
        live = LiveServer(server_env(rest_port, DATABASE_URL=database, **settings), folder)
        yield live
        live.stop()

    return rest_port, server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A running `server.py`; `logs` holds every line it has written to stderr."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.logs: list[str] = []
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(workdir)),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "INFO",
            "LOG_BOT_SPEECH": "true",  # "Call <CallSid> bot says: ..." lines, for bot_lines()
            # Call records in the scratch folder, never a phonebot.db in the repository.
            "DATABASE_URL": f"sqlite:///{Path(workdir).resolve() / 'phonebot.db'}",
            **env,
        }
        self._process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py")],
            cwd=workdir,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        self._wait_until_healthy()

    def _read_logs(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.logs.append(line.rstrip("\n"))

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError("server exited at startup:\n" + "\n".join(self.logs[-40:]))
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy:\n" + "\n".join(self.logs[-40:]))

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=5).json()

    def log_text(self) -> str:
        return "\n".join(self.logs)

    def error_lines(self) -> list[str]:
        """Lines logged at ERROR or worse, and tracebacks."""
        markers = ("| ERROR", "| CRITICAL", "Traceback (most recent call last)")
        return [line for line in self.logs if any(m in line for m in markers)]

    def wait_for_log(self, text: str, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.logs):
                return True
            time.sleep(0.05)
        return False

    def bot_lines(self, call_sid: str, timeout_s: float = 10.0) -> list[str]:
        """The texts the bot of call `call_sid` handed to its TTS, in order.

        Read from the server's "bot says" lines (phonebot.call.bot_speech) once the call's end
        line is in, so none is still on its way: what the bot said, exactly, instead of a
        guess from its audio.
        """
        ended = f"Call {call_sid} ended after"
        assert self.wait_for_log(ended, timeout_s), f"{ended!r} not logged:\n" + "\n".join(
            self.logs[-40:]
        )
        return bot_lines(list(self.logs), call_sid)

    def send_signal(self, sig: int) -> None:
        """E.g. SIGTERM, to test the graceful shutdown without waiting for it."""
        self._process.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The server's exit status, or None if it is still running after `timeout_s`."""
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._reader.join(timeout=5)


def twilio_for(server: LiveServer, rest_port: int, **options: Any) -> TwilioRestEmulator:
    """Twilio's REST side for `server`, on `rest_port` (one emulator at a time holds it);
    `options` are the emulator's own (`callees=`, …)."""
    return TwilioRestEmulator(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port,
        local_server_url=server.base_url, **options,
    )  # fmt: skip


def scripted_callees(numbers: dict[str, str]) -> Callable:
    """A module's `twilio` fixture: the REST emulator for its `server` (on its `rest_port`),
    with these numbers played by scripted callees (phonebot.emulator.callees)."""

    @pytest.fixture
    async def twilio(rest_port: int, server: LiveServer) -> AsyncIterator[TwilioRestEmulator]:
        callees = CalleeBook(numbers, rule=None)
        async with twilio_for(server, rest_port, callees=callees) as emulator:
            yield emulator

    return twilio


async def closed_record(
    server: LiveServer, call_sid: str, admin_key: str, timeout_s: float = 10.0
) -> dict:
    """`GET /calls/{call_sid}` once the record is closed (writes are batched: a little late)."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            response = await client.get(
                f"{server.base_url}/calls/{call_sid}",
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            if response.status_code == 200 and (body := response.json())["ended_at"]:
                return body
            await asyncio.sleep(0.2)
    raise AssertionError(f"record of {call_sid} not closed: {body or 'no record'}")


def refused_start(env: dict[str, str], workdir: Path) -> str:
    """Run `python server.py` with only `env`; assert it refuses to start (exit 2) with one
    "refuses to start" line and no traceback; return that line."""
    process = subprocess.run(
        [sys.executable, str(ROOT / "server.py")], cwd=workdir, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    lines = [line for line in output.splitlines() if "refuses to start" in line]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def instant_services_env(ai_api_url: str) -> dict[str, str]:
    """Settings that point every provider at the AI API emulator (instant-test mode)."""
    return {
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": f"{ai_api_url}/v1",
        "OPENAI_STT_BASE_URL": f"{ai_api_url}/v1",
        "OPENAI_TTS_BASE_URL": f"{ai_api_url}/v1",
    }


@contextmanager
def ai_api_process() -> Iterator[str]:
    """The instant AI API emulator (`phonebot.emulator.ai_api`) as its own process, like a
    provider's endpoint; yields its base URL once it answers, and stops it after."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "phonebot.emulator.ai_api", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_emulator/requests", timeout=1).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "ai_api did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
