"""Serve an ASGI app on loopback inside the current event loop, with a clean start/stop.

Tests and the CLI need the REST emulator (or any app) reachable over real HTTP while their
own coroutines keep running in the same loop. `uvicorn.Server.serve` would also take over
SIGINT/SIGTERM, stealing Ctrl-C from the CLI, so signal capture is switched off here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from phonebot.emulator.errors import EmulatorError


class _NoSignalServer(uvicorn.Server):
    """uvicorn without its signal handlers: the embedding program keeps Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LoopbackServer:
    """Run `app` on `host:port` (port 0 = any free port) as a background task.

    `config` overrides uvicorn settings (e.g. `ws="auto"` for an app with websockets).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.config = {
            "log_level": "warning",
            "lifespan": "off",
            "access_log": False,
            "ws": "none",
            **config,
        }
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port`, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise EmulatorError(f"cannot listen on {self.host}:{self.port}: {error}") from None
        return sock

    async def start(self) -> None:
        """Bind, start serving, and return once uvicorn reports it is up."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._server = _NoSignalServer(uvicorn.Config(self.app, **self.config))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise the startup failure
                raise EmulatorError(f"server on {self.base_url} stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Ask uvicorn to exit and wait for it (idempotent)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        self._server = self._task = None
