"""A throw-away redis-server: free loopback port, temporary folder, persistence off.

The load benchmark's cluster (`load_cluster.py`) and the tests' `redis_server` fixture
(tests/redis_server.py) both start theirs with `start_redis()`. `.stop()`, `.start()` and
`.restart()` keep the port, so a client built from `.url` sees a real outage and a real
recovery, not a new server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.balancer import free_port

NOT_INSTALLED = "redis-server not installed (apt-get install redis-server)"
START_TIMEOUT_S = 10.0


class RedisMissing(RuntimeError):
    """No redis-server binary on this machine."""


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def ping(port: int) -> bool:
    """A raw RESP PING, so the fixture doesn't depend on the client library under test."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `.url` stays valid across stop/start/restart."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root = Path(tempfile.mkdtemp(prefix="phonebot-redis-"))
        self._process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start on the same port (data from before a stop is gone: persistence is off)."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.root), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.root / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at startup:\n{self.log()}")
            if ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")

    def stop(self) -> None:
        """Kill it (like a crash: SIGKILL, no goodbye to clients) and wait for the exit."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def restart(self, down_s: float = 0.0) -> None:
        """An outage: stop, stay down `down_s` seconds, start again on the same port."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def log(self) -> str:
        try:
            return (self.root / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_redis() -> RedisServer:
    """A started redis-server (`.close()` stops it and removes its folder); also the
    benchmark's (bench/load_cluster.py). RedisMissing without the binary, RuntimeError or
    OSError when it does not start."""
    binary = redis_binary()
    if binary is None:
        raise RedisMissing(NOT_INSTALLED)
    server = RedisServer(binary)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
