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
from typing import Any, ParamSpec, Protocol, TypeVar

import asyncpg

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
    """What the store asks of its pool: asyncpg's ``Pool``, or ``TimedPool`` over one."""

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
    unreachable database is found (and retried) by the caller.

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
        setup=None if clock is None or pooled else _time_from(clock),
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
    plain: Pool = pool
    return plain


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
