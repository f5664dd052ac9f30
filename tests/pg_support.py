"""PostgreSQL for the outbox tests: the machine's server, or one this session starts.

``pg_url`` is a database of this test session only (created on the server at
127.0.0.1:5432 when one answers, dropped at the end).  When none answers, the
session runs its own server: ``initdb`` and ``pg_ctl`` (Debian's postgresql
package) in a temporary directory, on a free loopback port, as the ``postgres``
user when the tests run as root.  With ``CI=true`` a missing server or missing
binaries fail the tests, never skip them.

Use the fixtures in a test module with ``pytest_plugins = ["tests.pg_support"]``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from eventbus.outbox.schema import metadata as eventbus_metadata
from tests.outbox_events import metadata as test_metadata

HOST = "127.0.0.1"
DEFAULT_PORT = 5432
#: Seconds a started server may take to accept connections.
READY_TIMEOUT = 30.0


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def answers(port: int, dbname: str = "postgres", host: str = HOST) -> bool:
    """Whether PostgreSQL accepts a trusted ``postgres`` connection at host:port."""
    try:
        with psycopg.connect(
            host=host, port=port, user="postgres", dbname=dbname, connect_timeout=2
        ):
            return True
    except psycopg.Error:
        return False


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A throw-away PostgreSQL cluster (trust auth, no fsync) on a free port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="eventbus-pg-"))
        self.data = self.dir / "data"
        self.user: pwd.struct_passwd | None = None

    def _run(self, *command: str) -> None:
        if self.user is not None:  # initdb refuses to run as root
            command = ("runuser", "-u", self.user.pw_name, "--", *command)
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> PostgresServer:
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            _missing(
                "no PostgreSQL answers on 127.0.0.1:5432 and initdb/pg_ctl are not installed "
                "(apt-get install postgresql)"
            )
        assert initdb is not None and pg_ctl is not None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                _missing("running as root and there is no 'postgres' user to run initdb as")
            assert self.user is not None
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = (
            f"-c listen_addresses={HOST} -p {self.port} -c unix_socket_directories={self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        log = self.dir / "server.log"
        self._run(pg_ctl, "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start")
        deadline = time.monotonic() + READY_TIMEOUT
        while not answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        pg_ctl = _binary("pg_ctl")
        if pg_ctl is not None and self.data.exists():
            with contextlib.suppress(Exception):
                self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_port() -> Iterator[int]:
    """The port of a PostgreSQL server for this session (the machine's, or our own)."""
    if answers(DEFAULT_PORT):
        yield DEFAULT_PORT
        return
    server = PostgresServer().start()
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_port: int) -> Iterator[str]:
    """SQLAlchemy (asyncpg) URL of a database of this test session, dropped at the end."""
    name = f"eventbus_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=HOST, port=pg_port, user="postgres", dbname="postgres") as conn:
        conn.autocommit = True
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@{HOST}:{pg_port}/{name}"
    finally:
        with psycopg.connect(host=HOST, port=pg_port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            with contextlib.suppress(psycopg.Error):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the session's database; the eventbus tables and those of
    :mod:`tests.outbox_events` are created fresh and empty."""
    engine = create_async_engine(pg_url)
    async with engine.begin() as conn:
        for meta in (eventbus_metadata, test_metadata):
            await conn.run_sync(meta.drop_all)
            await conn.run_sync(meta.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()
