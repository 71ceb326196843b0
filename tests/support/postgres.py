"""PostgreSQL for tests: fresh databases on the machine's server, and a private server to kill.

The machine's server (``FC_TEST_POSTGRES_URL``, default
``postgresql://postgres@127.0.0.1:5432/test``, used as the admin connection) is shared: tests
create databases with fresh names there and drop them, never stop it. A test that must stop
PostgreSQL mid-stream starts its own with ``initdb`` / ``pg_ctl`` on a free port under its tmp
directory (:class:`PrivatePostgres`), run as the ``postgres`` user when the tests run as root.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.support.brokers import free_port

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def admin_url() -> str:
    return os.environ.get("FC_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def reachable(url: str) -> str | None:
    """None when PostgreSQL answers at ``url``, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def create_database(prefix: str = "fc_test") -> str:
    """A new, empty database on the machine's server; its URL. The name says which pytest-xdist
    worker made it (``fc_test_gw1_...``; ``main`` outside xdist) and is random beyond that, so
    workers and suites running side by side never share a database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"{prefix}_{worker}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url(), name)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty_tables(url: str) -> None:
    """Empty every table of the bridge's schema (between tests sharing one database)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " AND c.relname <> 'schema_version'")]
        if tables:
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY")


def _bin(name: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (install PostgreSQL's server package)")
    return found


class PrivatePostgres:
    """A PostgreSQL server of our own (initdb in ``directory``, a free port), to stop and start."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pwd.getpwnam(self._user)  # KeyError if the package did not create the user

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=timeout)

    def init(self) -> PrivatePostgres:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            info = pwd.getpwnam(self._user)
            os.chown(self.directory, info.pw_uid, info.pw_gid)
            for parent in self.directory.parents:  # pytest's tmp dirs are 0700 under root
                if parent == Path("/tmp") or parent == Path("/"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o711)
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                       "fsync = off\nmax_connections = 40\nshared_buffers = 32MB\n")
        return self

    def start(self) -> PrivatePostgres:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "postgres.log"), "-w", "-t", "60",
                  "start")
        deadline = time.monotonic() + 30
        while reachable(self.url) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"private PostgreSQL on port {self.port} did not answer")
            time.sleep(0.1)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def create_database(self, name: str = "firstcare") -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.url, name)
