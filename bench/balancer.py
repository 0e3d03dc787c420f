"""A websocket-capable HAProxy in front of several server processes, for tests and benchmarks.

    with start_haproxy(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]) as balancer:
        httpx.get(f"{balancer.url}/health")            # round-robin over both servers

    routes = {"/outbound": a, "/ws": b, "/amd": c}     # one hop of a call per process
    with start_haproxy([a, b, c], routes=routes) as balancer: ...

HAProxy from the Debian package (`apt-get install haproxy`, /usr/sbin/haproxy) runs in the
foreground from a generated config in a temporary folder, on a free loopback port, and is
stopped (and the folder removed) on exit. It is what a production deployment puts in front
of the webhook server (deploy/haproxy.cfg is the same shape), so a test through it sees the
same hop spreading Twilio sees: every request is balanced on its own, also on a kept-alive
connection, so the webhook, the media stream and the `/amd` callback of one call can land on
different processes.

Why each setting (see HAProxy 2.6's configuration manual):
- `mode http`: HAProxy parses each request, so it can route by path and balance per request;
  a websocket upgrade (`Connection: Upgrade`) is passed through and becomes a tunnel.
- `timeout tunnel`: once upgraded, `timeout client/server` no longer apply; a media stream
  is silent on the caller's side for long stretches and lasts as long as the call, so the
  tunnel timeout is an hour (a call's `MAX_CALL_DURATION_S` is far below that).
- `balance roundrobin` (default) spreads requests evenly; `leastconn` suits long websockets
  (a process holding fewer calls gets the next one) and is one argument away.
- `option httpchk GET /health` + `http-check expect status 200`: a draining server answers
  503, so the balancer stops sending it new webhooks while its calls finish.

A missing HAProxy raises `BalancerUnavailable` (message `MISSING`); tests turn it into a
skip locally and a failure under CI=true (`skip_or_fail_if_missing`), as tests/pg_server.py
does for PostgreSQL.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

MISSING = "HAProxy not installed (apt-get install haproxy): balancer tests skipped"
DEBIAN_PATH = "/usr/sbin/haproxy"
STARTUP_TIMEOUT_S = 10.0
# Longer than any call (MAX_CALL_DURATION_S) so the balancer never cuts a media stream.
TUNNEL_TIMEOUT = "1h"
HEALTH_PATH = "/health"


class BalancerUnavailable(RuntimeError):
    """HAProxy is not installed, or did not start."""


def haproxy_binary() -> str:
    """The haproxy executable: on PATH, else the Debian package's; BalancerUnavailable if none."""
    found = shutil.which("haproxy") or (DEBIAN_PATH if os.access(DEBIAN_PATH, os.X_OK) else None)
    if found is None:
        raise BalancerUnavailable(MISSING)
    return found


def skip_or_fail_if_missing() -> None:
    """For tests: skip with one line when HAProxy is missing, fail under CI=true (CI has it)."""
    try:
        haproxy_binary()
    except BalancerUnavailable:
        import pytest

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but HAProxy is not installed (.ci/run installs it)")
        pytest.skip(MISSING)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def host_port(backend: str) -> str:
    """ "http://127.0.0.1:8001" or "127.0.0.1:8001" → "127.0.0.1:8001" (HAProxy's address)."""
    parts = urlsplit(backend if "//" in backend else f"//{backend}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"backend {backend!r}: expected http://host:port")
    return f"{parts.hostname}:{parts.port}"


def render_config(
    backends: list[str],
    routes: dict[str, str] | None,
    port: int,
    *,
    balance: str = "roundrobin",
    health_path: str = HEALTH_PATH,
    host: str = "127.0.0.1",
) -> str:
    """The haproxy.cfg text: a frontend on `host:port`, a pool, and one backend per route.

    Routes are path prefixes, tried longest first so "/outbound" wins over "/".
    """
    if not backends:
        raise ValueError("at least one backend")
    servers = {host_port(b): f"s{i}" for i, b in enumerate(backends)}
    for target in (routes or {}).values():
        servers.setdefault(host_port(target), f"s{len(servers)}")
    check = "check inter 1s fall 2 rise 1"
    lines = [
        "global",
        f"    maxconn {max_connections()}",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 30s",
        f"    timeout tunnel {TUNNEL_TIMEOUT}",
        "    timeout client-fin 5s",
        "    option forwardfor",
        "    option redispatch",
        "    retries 2",
        "frontend phonebot",
        f"    bind {host}:{port}",
    ]
    ordered = sorted((routes or {}).items(), key=lambda item: len(item[0]), reverse=True)
    for i, (prefix, _) in enumerate(ordered):
        if not prefix.startswith("/"):
            raise ValueError(f"route {prefix!r}: a path prefix starts with /")
        lines += [f"    acl route{i} path_beg {prefix}", f"    use_backend route{i} if route{i}"]
    lines += ["    default_backend pool", "backend pool", f"    balance {balance}"]
    lines += _health_check(health_path)
    lines += [f"    server {servers[host_port(b)]} {host_port(b)} {check}" for b in backends]
    for i, (_, target) in enumerate(ordered):
        address = host_port(target)
        lines += [f"backend route{i}", *_health_check(health_path)]
        lines.append(f"    server {servers[address]} {address} {check}")
    return "\n".join(lines) + "\n"


def max_connections() -> int:
    """As many connections as the file-descriptor limit allows (HAProxy refuses to start if
    2 x maxconn + its own exceed the hard limit it may raise to), at most 10,000."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 10_000
    return max(256, min(10_000, (hard - 1_000) // 2))


def _health_check(path: str) -> list[str]:
    return [f"    option httpchk GET {path}", "    http-check expect status 200"]


@dataclass
class Balancer:
    """A running HAProxy; `url` is what clients (and PUBLIC_URL) use."""

    process: subprocess.Popen
    root: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "haproxy.cfg"

    def log_text(self) -> str:
        """HAProxy's own output (warnings such as a server going DOWN)."""
        path = self.root / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM: hard stop, closes tunnels) and remove its folder."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Balancer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def start_haproxy(
    backends: list[str],
    routes: dict[str, str] | None = None,
    port: int | None = None,
    *,
    balance: str = "roundrobin",
    health_path: str = HEALTH_PATH,
) -> Balancer:
    """Start HAProxy in front of `backends` (http://host:port URLs); returns once it listens.

    `routes` maps a path prefix to one backend URL; other paths go round-robin (or
    `balance="leastconn"`) over `backends`. Raises BalancerUnavailable if HAProxy is
    missing, rejects the config, or does not start.
    """
    binary = haproxy_binary()
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="phonebot-haproxy-"))
    config = root / "haproxy.cfg"
    config.write_text(
        render_config(backends, routes, port, balance=balance, health_path=health_path)
    )
    checked = subprocess.run(
        [binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    if checked.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise BalancerUnavailable(f"HAProxy rejected its config: {checked.stderr.strip()}")
    with open(root / "haproxy.log", "wb") as log:
        # -db: foreground, no daemon; stopped with SIGTERM by Balancer.stop.
        process = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root
        )
    balancer = Balancer(process, root, port)
    try:
        _wait_listening(balancer)
    except BaseException:
        balancer.stop()
        raise
    return balancer


def _wait_listening(balancer: Balancer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if balancer.process.poll() is not None:
            raise BalancerUnavailable(f"HAProxy exited at startup: {balancer.log_text()}")
        try:
            with socket.create_connection((balancer.host, balancer.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BalancerUnavailable(f"HAProxy did not listen within {STARTUP_TIMEOUT_S:g} s")
