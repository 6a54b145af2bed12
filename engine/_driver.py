"""asyncpg, as the store uses it, in one place.

Which of its errors mean the database is out of reach for now (a restart, a terminated backend,
a refused connection: retry, or hand the run back) and which mean it refused a statement, and
the ``DurableError`` each becomes (``surfacing``); how the pool is opened and each of its
connections prepared. Only the store (and ``engine._schema``, which it calls) holds asyncpg
objects, and every public method of the store surfaces what the driver raised: nothing past the
store sees a driver error, and nothing past it imports asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeVar

import asyncpg

from engine import _lineage
from engine._clock import Clock
from engine._queries import queries
from engine.errors import DatabaseError, DatabaseUnavailable, DurableError, SerializationError

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound=type)

# The driver's errors that say the database cannot be reached now (not that it refused what
# was asked): a call that failed so may succeed on another connection, later.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A connection whose server went away mid-protocol can be left in a state asyncpg refuses
    # to use ("another operation is in progress"); it is as broken as a closed one.
    asyncpg.InternalClientError,
)


def surfaced(exc: BaseException) -> BaseException:
    """The error the engine knows for what the driver raised: ``DatabaseUnavailable`` (out of
    reach), ``SerializationError`` (a value the database refused), ``DatabaseError`` (any other
    statement it refused); anything else as it is."""
    if isinstance(exc, DurableError):
        return exc
    if isinstance(exc, TRANSIENT):
        return DatabaseUnavailable(f"database unreachable: {exc}")
    if isinstance(exc, asyncpg.DataError):
        return SerializationError(f"the database refused a value ({exc})")
    if isinstance(exc, asyncpg.PostgresError):
        return DatabaseError(str(exc), exc.sqlstate)
    return exc


def surfacing(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``method`` (a coroutine) with the driver's errors surfaced (see ``surfaced``), the
    driver's own kept as ``__cause__``."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            found = surfaced(exc)
            if found is exc:
                raise
            raise found from exc

    return call


def surfacing_methods(cls: C) -> C:
    """Apply ``surfacing`` to every public coroutine method of ``cls``."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, surfacing(member))
    return cls


# -- the pool ---------------------------------------------------------------------------------


class Pool(Protocol):
    """What the store asks of its pool: ``HoldingPool`` or ``TimedPool`` over asyncpg's."""

    def acquire(self) -> contextlib.AbstractAsyncContextManager[Any]: ...
    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def expire_connections(self) -> None: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


async def open_pool(dsn: str, max_size: int, clock: Clock | None, *, pooled: bool = False) -> Pool:
    """A pool of up to ``max_size`` connections, its first one opened now, so that an
    unreachable database is found (and retried) by the caller: asyncpg's, under a
    ``HoldingPool`` that keeps the connections it lends between calls.

    No floor of idle connections: asyncpg would restore it after every outage with a traceback
    per failed try. With a ``clock`` (a test's virtual clock), every checkout sets
    ``durable.fake_now``, which the SQL's ``durable.clock()`` honours.

    ``pooled``: ``dsn`` goes through a transaction pooler (PgBouncer's ``pool_mode =
    transaction``), where consecutive transactions of one connection may run on different
    server sessions, so nothing may outlive a transaction. asyncpg's statement cache names
    prepared statements that live in a session, so it is off: each statement is prepared
    unnamed, then executed, two round trips in one transaction. A clock's setting is made
    inside a transaction around each checkout and cleared before it commits (``TimedPool``)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        **({"statement_cache_size": 0} if pooled else {}),
    )
    try:
        async with pool.acquire():
            pass
    except BaseException:
        pool.terminate()
        raise
    if clock is not None and pooled:
        return TimedPool(pool, clock)
    return HoldingPool(pool, None if clock is None else _time_from(clock))


class HoldingPool:
    """asyncpg's pool, with the connection a call has finished with kept for the next call.

    asyncpg's checkout and return cost each statement about 50 us of CPU here, a third of a
    one-row statement's client cost (its return runs in a task of its own behind
    ``asyncio.shield``, with a timeout around the reset and an inactivity timer re-armed), and
    two turns of the event loop before the caller goes on. This pool borrows connections from
    asyncpg's and lends them to calls itself, the last one kept first (the warmest). asyncpg
    still opens, counts (a kept connection is in use there) and closes them. A connection goes
    back to asyncpg's own return when a call on it raised or was cancelled (asyncpg rolls back,
    waits out a cancellation, terminates a broken connection), when it is left in a
    transaction, when a call is waiting for asyncpg to lend one (the limit starves no one), when
    it was borrowed more than ``hold`` seconds ago (so asyncpg's limits, such as queries per
    connection, still apply), when it has been kept idle for ``hold`` seconds, and on
    ``close``. A kept connection found closed (its server went away meanwhile: asyncpg has
    taken it back) is skipped; one borrowed before ``expire_connections``, or whose ``setup``
    failed, is terminated. ``setup`` runs on every checkout (a test clock's setting)."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        setup: Callable[[Any], Awaitable[None]] | None = None,
        *,
        hold: float = 30.0,
    ) -> None:
        self._pool = pool
        self._setup = setup
        self._hold = hold
        self._kept: list[tuple[Any, _Loan, float]] = []  # connection, its loan, kept at
        self._waiting = 0  # calls waiting for asyncpg to lend a connection
        self._generation = 0  # expire_connections: loans of earlier generations end
        self._closing = False
        self._trimming: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        conn, loan = await self._checkout()
        try:
            yield conn
        except BaseException:
            await self._pool.release(conn)
            raise
        await self._checkin(conn, loan)

    async def execute(self, query: str, *args: Any) -> str:
        status: str = await self._call(lambda conn: conn.execute(query, *args))
        return status

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._call(lambda conn: conn.fetch(query, *args))
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._call(lambda conn: conn.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._call(lambda conn: conn.fetchval(query, *args))

    async def expire_connections(self) -> None:
        await self._pool.expire_connections()
        self._generation += 1
        # Terminated, not returned: asyncpg would close each gracefully, waiting for the
        # server's goodbye, which a server out of reach may never send.
        for conn in self._take_kept(len(self._kept)):
            _terminate(conn)

    async def close(self) -> None:
        self._closing = True
        if self._trimming is not None:
            self._trimming.cancel()
        try:
            await self._give_back(self._take_kept(len(self._kept)))
            await asyncio.gather(*self._returning)
            await self._pool.close()
        except BaseException:
            self._pool.terminate()
            raise

    def terminate(self) -> None:
        self._closing = True
        if self._trimming is not None:
            self._trimming.cancel()
        self._kept.clear()
        self._pool.terminate()

    async def _call(self, call: Callable[[Any], Awaitable[T]]) -> T:
        conn, loan = await self._checkout()
        try:
            result = await call(conn)
        except BaseException:
            await self._pool.release(conn)
            raise
        await self._checkin(conn, loan)
        return result

    async def _checkout(self) -> tuple[Any, _Loan]:
        conn = None
        while self._kept and conn is None:
            conn, loan, _kept_at = self._kept.pop()
            if not _alive(conn):
                _terminate(conn)
                conn = None
        if conn is None:
            loan = _Loan(self._generation, asyncio.get_running_loop().time())
            self._waiting += 1
            try:
                conn = await self._pool.acquire()
            finally:
                self._waiting -= 1
        if self._setup is not None:
            try:
                await self._setup(conn)
            except BaseException:
                _terminate(conn)
                raise
        return conn, loan

    async def _checkin(self, conn: Any, loan: _Loan) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if (
            self._closing
            or self._waiting
            or loan.generation != self._generation
            or now - loan.at > self._hold
            or not _alive(conn)
            or conn.is_in_transaction()
        ):
            await self._pool.release(conn)
            return
        self._kept.append((conn, loan, now))
        if self._trimming is None:
            self._trimming = loop.call_later(
                self._hold, self._trim, context=_lineage.detached_context()
            )

    def _trim(self) -> None:
        """Give asyncpg back the connections kept idle for ``hold`` seconds (the first kept
        are first in the list); look again when the next would be."""
        loop = asyncio.get_running_loop()
        idle = 0
        while idle < len(self._kept) and self._kept[idle][2] <= loop.time() - self._hold:
            idle += 1
        if idle:
            task = loop.create_task(
                self._give_back(self._take_kept(idle)), context=_lineage.detached_context()
            )
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
        self._trimming = None
        if self._kept:
            after = self._kept[0][2] + self._hold - loop.time()
            self._trimming = loop.call_later(
                max(after, 0.0), self._trim, context=_lineage.detached_context()
            )

    def _take_kept(self, count: int) -> list[Any]:
        """The ``count`` connections kept longest, no longer kept."""
        taken, self._kept = self._kept[:count], self._kept[count:]
        return [conn for conn, _loan, _kept_at in taken]

    async def _give_back(self, conns: list[Any]) -> None:
        for conn in conns:
            try:
                await self._pool.release(conn)
            except Exception:  # asyncpg's return failed: the connection is of no more use
                _terminate(conn)


class _Loan(NamedTuple):
    """When a connection was borrowed from asyncpg, and in which generation of the pool."""

    generation: int
    at: float


def _alive(conn: Any) -> bool:
    try:
        return not conn.is_closed()
    except (asyncpg.InterfaceError, AttributeError):  # taken back by asyncpg when it closed
        return False


def _terminate(conn: Any) -> None:
    with contextlib.suppress(asyncpg.InterfaceError, AttributeError):
        conn.terminate()


class TimedPool:
    """A pool whose every checkout is one transaction that reads its time from ``clock``:
    the setting is made at its start and cleared before its commit, and a rollback takes it
    back as well, so that no server session a pooler hands to another client keeps it.

    BEGIN, the setting, its clearing and COMMIT: four statements per checkout besides the
    caller's, where a session setting costs one. For tests' virtual clocks behind a pooler."""

    def __init__(self, pool: asyncpg.Pool[Any], clock: Clock) -> None:
        self._pool = pool
        self._clock = clock
        self._set = queries()["set_fake_time"]

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._set, self._clock.now().isoformat())
            yield conn
            await conn.execute(self._set, "")

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            status: str = await conn.execute(query, *args)
            return status

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            rows: list[Any] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def expire_connections(self) -> None:
        await self._pool.expire_connections()

    async def close(self) -> None:
        await self._pool.close()

    def terminate(self) -> None:
        self._pool.terminate()


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Skip asyncpg's reset query on release (a round trip per call): the store leaves no
    session state behind (no LISTEN, no open cursor, advisory locks released by the same
    call, ``durable.fake_now`` set again on every checkout, or within its transaction)."""


def _time_from(clock: Clock) -> Callable[[asyncpg.Connection[Any]], Awaitable[None]]:
    async def setup(conn: asyncpg.Connection[Any]) -> None:
        await conn.execute(queries()["set_fake_time"], clock.now().isoformat())

    return setup
