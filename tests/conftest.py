"""Shared fixtures: a real PostgreSQL, a template database built once, a fresh database per test.

The server is $DURABLE_TEST_DATABASE_URL when set, else the embedded PostgreSQL started in a
private temporary directory for this session. DURABLE_* and PG* variables are removed from the
environment so that nothing on the machine leaks into the tests.

Every embedded server a test starts lives in a directory from ``embedded_base``, which stops
the server and removes the directory when the test ends, passes, fails or is interrupted
(pytest tears fixtures down on Ctrl-C too), with an ``atexit`` backstop for a block that never
reached its end.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from durable import _embedded
from engine import PostgresStore
from tests.pgbouncer import PgBouncer, pgbouncer

_TEST_URL = os.environ.get("DURABLE_TEST_DATABASE_URL")
EMBEDDED = not _TEST_URL  # the session's server is the embedded PostgreSQL
# The ways through PgBouncer the fault suite takes, when asked for (see
# tests/acceptance/test_faults_pgbouncer.py): read before the environment is cleaned.
PGBOUNCER_MODES = os.environ.get("DURABLE_TEST_PGBOUNCER_MODES")
for _name in list(os.environ):
    if _name.startswith(("DURABLE_", "PG")):
        del os.environ[_name]


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def private_dir(prefix: str) -> Path:
    """A temporary directory the unprivileged server user can traverse (0711)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


_NOT_REMOVED: set[Path] = set()


@contextlib.contextmanager
def embedded_base(prefix: str) -> Iterator[Path]:
    """A private directory (see ``private_dir``) for embedded servers: when the block ends,
    however it ends, every server kept anywhere inside it is stopped and it is removed."""
    path = private_dir(prefix)
    _NOT_REMOVED.add(path)
    try:
        yield path
    finally:
        remove_embedded(path)


def remove_embedded(path: Path) -> None:
    """Stop the embedded servers whose base directories are in ``path`` (their socket
    directories in /tmp go with them), then remove ``path``."""
    _NOT_REMOVED.discard(path)
    try:
        for base in _bases_in(path):
            _embedded.control_for(base).stop()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _bases_in(path: Path) -> list[Path]:
    """The base directories in ``path``: those holding a ``pgdata-N.lock`` (every start
    makes one). Data directories are not entered."""
    found = []
    for folder, subfolders, files in os.walk(path):
        if any(f.startswith("pgdata-") and f.endswith(".lock") for f in files):
            found.append(Path(folder))
        subfolders[:] = [d for d in subfolders if not d.startswith("pgdata-")]
    return found


# SIGTERM (a CI job's timeout, `kill`) ends pytest through SystemExit, so that the backstop
# below runs; Python's default would skip it and leave a server running.
_embedded.exit_on_sigterm()


@atexit.register
def _remove_the_rest() -> None:
    """The backstop: whatever an ``embedded_base`` block did not get to remove."""
    for path in list(_NOT_REMOVED):
        remove_embedded(path)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    if _TEST_URL:
        yield _TEST_URL
        return
    with embedded_base("durable-test-pg-") as base:
        control = _embedded.control_for(base)
        server = _embedded.ensure_running(control, user_pid=os.getpid())
        yield server.dsn
        _embedded.release(control, os.getpid())


@pytest.fixture(scope="session")
def bouncer(server_url: str) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the session's server, five server connections
    per database (``tests/pgbouncer.py``); ``bouncer.url(database_url)`` reaches a test's
    database through it."""
    with pgbouncer(server_url) as running:
        yield running


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    name = f"durable_tpl_{os.getpid()}"

    async def build() -> None:
        admin = await _admin(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        store = await PostgresStore.connect(with_database(server_url, name), max_size=2)
        try:
            await store.migrate()
        finally:
            await store.close()

    async def drop() -> None:
        admin = await _admin(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(build())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"durable_t_{uuid.uuid4().hex[:12]}"
    admin = await _admin(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await admin.close()
    yield with_database(server_url, name)
    admin = await _admin(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for assertions."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A database with nothing in it, dropped after the test."""
    name = f"durable_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(server_url, name)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
