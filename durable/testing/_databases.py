"""The databases simulations run in: each open ``Simulation`` leases one of its own.

A simulation needs a database no other simulation writes to: a run left suspended, an event or
a rate-limit grant of another test would change what its runs do. So this process keeps, per
server, a small pool of databases it created (``durable_sim_<host>_<pid>_<n>``), each migrated
once, when it is created. A lease takes an idle one, which the simulation empties
(``PostgresStore.empty``, one round trip: 4-9 ms on PostgreSQL 15 and on the embedded 18), or
creates one when none is idle; a simulation hands it back when it closes. A database per
simulation would cost more: ``CREATE DATABASE ... TEMPLATE`` took 45-120 ms and ``DROP
DATABASE`` 27-50 ms on both servers. Nor would a template database pay: a pool rarely holds
more than a database or two, and creating one and migrating it (~95 ms) costs what a copy of a
migrated template does. The databases do without ``synchronous_commit``: what a simulation
writes need not survive a crash of the server, and a commit then waits for no disk.

The databases are dropped when the process exits (``atexit``), and those that processes of this
host left when they died are dropped the first time this process uses the server.

Which server: ``database_url`` when given, else ``$DURABLE_TEST_DATABASE_URL``, else the embedded
server (``durable._embedded.acquire``, the one ``durable.App()`` uses with no URL). The database
a URL names is only connected to, to create and drop the simulation databases beside it: nothing
is created or changed in it. The role needs the CREATEDB privilege. The SQL is the engine's:
``engine._server`` creates, lists and drops the databases.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from engine import PostgresStore, _urls
from engine._server import Server
from engine.errors import ConfigurationError, DatabaseError

log = logging.getLogger(__name__)

ENVIRONMENT = "DURABLE_TEST_DATABASE_URL"
_PREFIX = "durable_sim_"
_OURS = r"durable\_sim\_%"  # a LIKE pattern: the underscores are literal
# PostgreSQL's SQLSTATEs met here: a database of that name exists, none of that name, the role
# may not create databases.
_EXISTS, _NO_SUCH_DATABASE, _NOT_ALLOWED = "42P04", "3D000", "42501"
_NAME = re.compile(r"durable_sim_(?P<host>[0-9a-f]{8})_(?P<pid>[0-9]+)_(?P<n>[0-9]+)")
_CONNECT_SECONDS = 10.0


@dataclass
class _Server:
    """The simulation databases this process made on one server, and the URLs it was given
    for it (the latest first): the database a URL names may be gone by the time another
    database is created or the process exits (a test's own database, dropped after it)."""

    urls: list[str]
    pid: int
    idle: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    swept: bool = False

    @property
    def url(self) -> str:
        return self.urls[0]

    def given(self, url: str) -> None:
        self.urls = [url, *(u for u in self.urls if u != url)]

    async def admin(self) -> Server:
        """The server, through a database of it that still exists, for CREATE/DROP."""
        for url in [*self.urls, _at(self.url, "postgres")]:
            try:
                return await Server.connect(url)
            except DatabaseError as exc:
                if exc.sqlstate != _NO_SUCH_DATABASE:
                    raise
        return await Server.connect(self.url)  # raises: no database of the server answers


# By process (a child forked from this one inherits none of its databases) and server: URLs
# that differ only in their database name reach the same server, and share its pool.
_servers: dict[tuple[int, str], _Server] = {}
# Every database this process made, on any server: never swept as a dead namesake's.
_made_here: set[str] = set()
_counter = itertools.count(1)
_exit_registered = False


class Database:
    """A simulation database leased to one simulation: ``url`` reaches it; ``fresh`` when it
    was just created (else it holds what the last simulation left: empty it first);
    ``release()`` hands it back to the pool."""

    def __init__(self, server: _Server, name: str, *, fresh: bool) -> None:
        self._server = server
        self.name = name
        self.url = _at(server.url, name)
        self.fresh = fresh

    def release(self) -> None:
        self._server.idle.append(self.name)


async def lease(database_url: str | None) -> Database:
    """A migrated database of its own for one simulation (see the module docstring)."""
    url = await _server_url(database_url)
    server = _servers.setdefault((os.getpid(), _at(url, "")), _Server([url], os.getpid()))
    server.given(url)
    if not server.swept:
        server.swept = True
        await _sweep(server)
    if server.idle:
        return Database(server, server.idle.pop(), fresh=False)
    return Database(server, await _create(server), fresh=True)


async def _server_url(database_url: str | None) -> str:
    if database_url == "":
        raise ConfigurationError(
            "database_url is empty: pass a postgresql:// URL, or None for "
            f"${ENVIRONMENT} or the embedded PostgreSQL"
        )
    url = database_url or os.environ.get(ENVIRONMENT)
    if url:
        return _urls.check(url)
    from durable import _embedded, _pg

    server = await asyncio.to_thread(_embedded.acquire)
    _embedded.exit_on_sigterm()
    return _pg.dsn(server.socket_dir, "postgres")


async def _create(server: _Server) -> str:
    admin = await server.admin()
    try:
        name = await _create_on(admin, server)
    finally:
        await admin.close()
    store = await PostgresStore.connect(
        _at(server.url, name), max_size=1, connect_timeout=_CONNECT_SECONDS
    )
    try:
        await store.migrate()
    finally:
        await store.close()
    return name


async def _create_on(admin: Server, server: _Server) -> str:
    while True:
        name = _checked(f"{_PREFIX}{_host()}_{os.getpid()}_{next(_counter)}")
        try:
            await admin.create_database(name, durable_commits=False)
        except DatabaseError as exc:
            if exc.sqlstate == _EXISTS:
                continue  # a dead namesake's, not swept yet
            if exc.sqlstate == _NOT_ALLOWED:
                raise ConfigurationError(
                    f"cannot create a simulation database on {_urls.redact(server.url)}: {exc}. "
                    f"A simulation runs in a database of its own, which it creates beside the "
                    f"one the URL names (that one is left untouched): grant the role CREATEDB, "
                    f"or pass no URL to simulate on the embedded PostgreSQL"
                ) from exc
            raise
        _remember(server, name)
        return name


def _remember(server: _Server, name: str) -> None:
    """Record a database to drop at exit (registered after the embedded server's own exit
    handler, so that it runs first, while the server is still up)."""
    global _exit_registered
    server.made.append(name)
    _made_here.add(name)
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_drop_at_exit)


async def _sweep(server: _Server) -> None:
    """Drop the simulation databases that processes of this host left when they died: those
    of a pid that is not running, and those of this process's pid that it did not make (a
    dead process's, whose pid this one reuses)."""
    admin = await server.admin()
    try:
        for name in await admin.databases(_OURS):
            found = _NAME.fullmatch(name)
            if found is None or found["host"] != _host():
                continue
            pid = int(found["pid"])
            if name in _made_here or (pid != server.pid and _alive(pid)):
                continue
            log.info("dropping %s, left by process %s", name, found["pid"])
            with contextlib.suppress(DatabaseError):
                await admin.drop_database(name)
    finally:
        await admin.close()


def _drop_at_exit() -> None:
    servers = [s for s in _servers.values() if s.pid == os.getpid() and s.made]
    for server in servers:
        try:
            asyncio.run(_drop(server))
        except Exception as exc:  # the server may be gone already: the next start sweeps
            log.debug("simulation databases not dropped at exit: %r", exc)


async def _drop(server: _Server) -> None:
    admin = await server.admin()
    try:
        for name in server.made:
            await admin.drop_database(name)
    finally:
        await admin.close()


def _at(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (the path, and any dbname parameter)."""
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("dbname", "database")
    ]
    tail = f"?{urlencode(query, safe='/')}" if query else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{tail}"


def _checked(name: str) -> str:
    """A database name of ours, safe to put between double quotes in a statement."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"not a simulation database name: {name!r}")
    return name


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
