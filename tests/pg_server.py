"""A throw-away PostgreSQL server for the records tests, and a fresh database per test.

Test modules load it with `pytest_plugins = ["tests.pg_server"]` and ask for `database_url`,
which runs the test once on a SQLite file and once on PostgreSQL. The cluster is created
with initdb/pg_ctl on a free port in a temporary folder, once per test process, and removed
afterwards. initdb refuses to run as root (CI runs as root), so as root the server runs as
the `postgres` user the Debian package creates (or `nobody`).

Without PostgreSQL the PostgreSQL half skips with one line, except under CI=true, where it
fails: CI installs it (.ci/run), so a missing server there is a broken setup, not a skip.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_procs import free_port, skip_or_fail

MISSING = "PostgreSQL not installed (apt-get install postgresql): PostgreSQL tests skipped"
_databases = itertools.count()


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    installs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(installs[-1]).parent if installs else None


def _as_user() -> tuple[list[str], str | None]:
    """The command prefix that runs PostgreSQL as a non-root user when we are root."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], user
    raise RuntimeError("running as root and no postgres/nobody user for PostgreSQL")


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="phonebot-pg-"))
        self.port = free_port()
        self.prefix, user = _as_user()
        if user:
            entry = pwd.getpwnam(user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        data = self.root / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-o", options,
            "-l", str(self.root / "log"), "-w", "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                      "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its plain postgresql:// URL."""
        name = name or f"test_{os.getpid()}_{next(_databases)}"
        subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", "postgres", "-q", "-c", f"CREATE DATABASE {name}"],
            check=True, capture_output=True, timeout=30,
        )
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        skip_or_fail(MISSING, "CI=true but PostgreSQL is not installed (.ci/run installs it)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except (subprocess.CalledProcessError, OSError, RuntimeError) as error:
        server.stop()
        detail = getattr(error, "stderr", b"") or b""
        pytest.fail(f"could not start PostgreSQL: {error} {detail.decode(errors='replace')}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the test cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.db'}"
    return request.getfixturevalue("postgres_server").create_database()
