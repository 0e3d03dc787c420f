"""A real headless Chromium and a served records app, for the calls page's tests and for
`bench/screenshot_ui.py`.

Chromium comes from the Debian package (`apt-get install chromium`, /usr/bin/chromium);
Playwright's Python API drives it through `executable_path` (`playwright install`, which
downloads its own browser build, is never needed). Without Chromium or Playwright the
browser tests skip with one line, except under CI=true, where they fail: CI installs both
(.ci/run), so a missing browser there is a broken setup, not a skip.

The app runs on uvicorn in a thread of the test process, on a free loopback port, with a
throw-away SQLite database that `seed_calls` fills through the real `RecordWriter`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import wave
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy import update

from phonebot.config import Settings
from phonebot.records import Records
from phonebot.records.schema import CallRecord
from phonebot.web.calls_api import router as api_router
from phonebot.web.calls_ui import router as ui_router
from phonebot.web.services import AppServices, app_services

MISSING = "Chromium not installed (apt-get install chromium): browser tests skipped"
DEBIAN_CHROMIUM = "/usr/bin/chromium"
# Root on a machine without network: no sandbox (root), no GPU, and nothing that phones
# home (updates, sync, QUIC probes, first-run pages). --headless comes from headless=True.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 30
# The hostile transcript line: caller speech is untrusted and must show as text.
HOSTILE_TEXT = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & \"42\""
RICH_SID = "CA" + "a1" * 16
HOSTILE_SID = "CA" + "b2" * 16


def chromium_executable() -> str | None:
    """Debian's Chromium (PHONEBOT_CHROMIUM overrides the path), or None."""
    configured = os.environ.get("PHONEBOT_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or (
        DEBIAN_CHROMIUM if Path(DEBIAN_CHROMIUM).is_file() else None
    )


def require_chromium() -> str:
    """The Chromium path for a test: skip (fail under CI=true) when it or Playwright is
    missing."""
    import pytest

    executable = chromium_executable()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        executable = None
    if executable is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "CI=true but Chromium or Playwright is missing (.ci/run installs chromium;"
                " tests/requirements.txt has playwright)"
            )
        pytest.skip(MISSING)
    return executable


@contextlib.contextmanager
def chromium(executable: str, viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """A fresh headless Chromium profile (a Playwright BrowserContext), removed afterwards."""
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory(prefix="phonebot-chromium-") as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=viewport or {"width": 1200, "height": 800},
        )
        try:
            yield context
        finally:
            context.close()


# --- the app under test ---------------------------------------------------------------------
def records_app(
    settings: Settings, seed: Callable[[Records], Awaitable[None]] | None = None
) -> FastAPI:
    """The records API and the calls page on their own app, as `create_app` includes them
    (the page's router first: `/calls/{call_sid}` would otherwise answer `/calls/ui`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        records = Records(settings)
        await records.start()
        app_services(app).records = records
        if seed is not None:
            await seed(records)
        try:
            yield
        finally:
            await records.stop()

    app = FastAPI(lifespan=lifespan)
    app.state.services = AppServices.build(settings)  # its records: made in the lifespan
    app.include_router(ui_router)
    app.include_router(api_router)
    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServedApp:
    """An ASGI app on uvicorn in a background thread, on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the records app did not start (see the log above)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(START_TIMEOUT_S)


# --- the calls on record --------------------------------------------------------------------
def write_recording(path: Path, seconds: float = 6.0, rate: int = 8000) -> Path:
    """A stereo 8 kHz WAV like the server's: caller tone left, bot tone right, taking turns."""
    frames = bytearray()
    for n in range(int(seconds * rate)):
        t = n / rate
        caller_on, bot_on = int(t) % 2 == 0, int(t) % 2 == 1
        left = int(8000 * math.sin(2 * math.pi * 440 * t)) if caller_on else 0
        right = int(8000 * math.sin(2 * math.pi * 660 * t)) if bot_on else 0
        frames += struct.pack("<hh", left, right)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return path


# (kind, text, at_s, reply_latency_s, interrupted, data)
RICH_TRANSCRIPT: list[tuple[str, str | None, float, float | None, bool, dict | None]] = [
    ("bot", "Hello, thanks for calling Acme support. How can I help?", 0.4, None, False, None),
    ("caller", "Hi, I'd like to check on my order.", 3.1, None, False, None),
    ("bot", "Sure. What is your order number? You can type it on the keypad.", 4.0, 0.62,
     False, None),
    ("keypad", "42", 8.2, None, False, {"digits": "42"}),
    ("function", "lookup_order", 8.6, None, False,
     {"name": "lookup_order", "arguments": {"order": 42},
      "result": {"status": "shipped", "eta": "Friday"}, "duration_s": 0.31}),
    ("function", "check_stock", 9.1, None, False,
     {"name": "check_stock", "arguments": {"sku": "T2"},
      "error": "check_stock failed (HTTP 503)", "duration_s": 0.05}),
    ("bot", "Order 42 has shipped and arrives on Friday.", 9.5, 0.94, False, None),
    ("caller", "Great. And can I change the delivery address?", 12.7, None, False, None),
    ("bot", "Of course, I can help with the address. First I need", 13.6, 0.71, True, None),
    ("caller", "Actually, never mind.", 14.5, None, False, None),
    ("bot", "No problem. Is there anything else?", 15.3, 0.55, False, None),
    ("reprompt", "Are you still there?", 23.4, None, False, None),
    ("caller", "No, that's all, thanks.", 25.0, None, False, None),
    ("bot", "Thanks for calling. Goodbye!", 25.8, 0.66, False, None),
]
OTHER_CALLS = [
    # call_sid, direction, from, to, persona, end_reason, status, duration_s, minutes ago
    ("CA" + "c3" * 16, "outbound", "+15550100000", "+15550123456", "sales", "not connected",
     "busy", None, 12),
    ("CA" + "d4" * 16, "outbound", "+15550100000", "+15550187654", "sales", "voicemail",
     "completed", 21.4, 26),
    ("CA" + "e5" * 16, "inbound", "+15550133333", "+15550100000", "support", "caller hung up",
     "completed", 74.9, 41),
    ("CA" + "f6" * 16, "outbound", "+15550100000", "+15550155555", "sales", "not connected",
     "no-answer", None, 58),
    ("CA" + "a7" * 16, "inbound", "+15550144444", "+15550100000", "support", "bot ended",
     "completed", 132.0, 95),
]


async def seed_calls(records: Records, recording_dir: Path, spread: bool = True) -> None:
    """Calls through the real writer: a rich inbound call with a recording, a call whose
    caller said HTML, and dial-outs that ended every other way. `spread` dates the calls
    over the last two hours (the writer stamps them all "now")."""
    writer = records.writer
    recording = write_recording(recording_dir / f"{RICH_SID}.wav")
    writer.call_started(RICH_SID, direction="inbound", from_number="+15550111111",
                        to_number="+15550100000", persona="support",
                        parameters={"session_type": "support", "token": "secret"})
    for kind, text, at_s, latency, interrupted, data in RICH_TRANSCRIPT:
        writer.transcript(RICH_SID, kind, text, at_s=at_s, reply_latency_s=latency,
                          interrupted=interrupted, data=data)
    writer.call_updated(RICH_SID, recording_path=str(recording))
    writer.call_ended(RICH_SID, end_reason="bot ended", duration_s=27.3,
                      twilio_status="completed")

    writer.call_started(HOSTILE_SID, direction="inbound", from_number="+15550122222",
                        to_number="+15550100000", persona="support")
    writer.transcript(HOSTILE_SID, "bot", "Hello, how can I help?", at_s=0.5)
    writer.transcript(HOSTILE_SID, "caller", HOSTILE_TEXT, at_s=2.0)
    writer.transcript(HOSTILE_SID, "bot", "Sorry, I did not get that.", at_s=3.0,
                      reply_latency_s=0.8)
    writer.call_ended(HOSTILE_SID, end_reason="caller hung up", duration_s=4.2,
                      twilio_status="completed")

    for sid, direction, src, dst, persona, reason, status, duration, _ in OTHER_CALLS:
        if reason == "not connected":
            writer.dialout_status(sid, status, from_number=src, to_number=dst,
                                  persona=persona, campaign_id="spring")
            continue
        writer.call_started(sid, direction=direction, from_number=src, to_number=dst,
                            persona=persona)
        writer.call_ended(sid, end_reason=reason, duration_s=duration, twilio_status=status,
                          amd_verdict="machine_end_beep" if reason == "voicemail" else None)
    await writer.flush()
    if spread:
        await _spread(records)


async def _spread(records: Records) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ages = {RICH_SID: 3, HOSTILE_SID: 7, **{row[0]: row[-1] for row in OTHER_CALLS}}
    async with records.sessions.begin() as session:
        for sid, minutes in ages.items():
            await session.execute(
                update(CallRecord)
                .where(CallRecord.call_sid == sid)
                .values(created_at=now - timedelta(minutes=minutes, seconds=17 * minutes % 60))
            )
