"""The store's pool (engine._driver.HoldingPool): a connection is kept between calls, and goes
back to asyncpg's pool whenever keeping it could hand the next call a broken, busy or stale one,
or starve a call waiting for one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine._driver import TRANSIENT, HoldingPool, open_pool
from tests.helpers import until

pytestmark = pytest.mark.postgres

PID = "SELECT pg_backend_pid()"


@contextlib.asynccontextmanager
async def over_asyncpg(
    database_url: str, hold: float = 30.0
) -> AsyncIterator[tuple[asyncpg.Pool, HoldingPool]]:
    """A HoldingPool over an asyncpg pool the test can look into."""
    inner = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    pool = HoldingPool(inner, hold=hold)
    try:
        yield inner, pool
    finally:
        await pool.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[HoldingPool]:
    opened = await open_pool(database_url, 2, None)
    assert isinstance(opened, HoldingPool)
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_call_gets_the_connection_the_last_call_finished_with(pool: HoldingPool) -> None:
    first = await pool.fetchval(PID)
    assert [await pool.fetchval(PID) for _ in range(5)] == [first] * 5
    async with pool.acquire() as conn:
        assert await conn.fetchval(PID) == first


async def test_a_cancelled_call_does_not_hand_its_busy_connection_to_the_next(
    pool: HoldingPool,
) -> None:
    sleeper = asyncio.ensure_future(pool.fetchval("SELECT pg_sleep(30)"))
    async with pool.acquire() as conn:  # the other connection: the sleep has begun on one
        await until(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            ),
            what="the sleep to begin",
        )
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    # Both connections, the one whose statement was cancelled included, serve calls at once.
    one, two = await asyncio.wait_for(
        asyncio.gather(pool.fetchval("SELECT 1"), pool.fetchval("SELECT 2")), 10
    )
    assert (one, two) == (1, 2)


async def test_a_connection_left_in_a_transaction_is_rolled_back_before_it_is_lent_again(
    pool: HoldingPool,
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMPORARY TABLE left_open (x int)")
    for _ in range(2):
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open') IS NULL")


async def test_a_call_waiting_for_the_only_connection_gets_it_when_the_holder_is_done(
    database_url: str,
) -> None:
    pool = await open_pool(database_url, 1, None)
    try:
        holding, done = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                holding.set()
                await done.wait()

        holder = asyncio.ensure_future(hold())
        await holding.wait()
        waiter = asyncio.ensure_future(pool.fetchval("SELECT 42"))
        await asyncio.sleep(0)  # the waiter asks asyncpg's pool, which has nothing free
        assert not waiter.done()
        done.set()
        assert await asyncio.wait_for(waiter, 10) == 42
        await holder
        assert await asyncio.wait_for(pool.fetchval("SELECT 43"), 10) == 43
    finally:
        await pool.close()


async def test_expired_connections_kept_or_lent_are_not_lent_again(pool: HoldingPool) -> None:
    kept = await pool.fetchval(PID)
    async with pool.acquire() as conn:
        lent = await conn.fetchval(PID)
        await pool.expire_connections()
    seen = {await pool.fetchval(PID) for _ in range(3)}
    async with pool.acquire() as a, pool.acquire() as b:
        seen |= {await a.fetchval(PID), await b.fetchval(PID)}
    assert not seen & {kept, lent}


async def test_a_connection_whose_backend_was_terminated_while_kept_is_not_lent_again(
    database_url: str, db: asyncpg.Connection
) -> None:
    async with over_asyncpg(database_url) as (inner, pool):
        first = await pool.fetchval(PID)
        assert await db.fetchval("SELECT pg_terminate_backend($1, 5000)", first)
        await until(lambda: inner.get_size() == 0, what="asyncpg to see the connection closed")
        assert await pool.fetchval(PID) != first


async def test_a_connection_whose_backend_is_gone_fails_its_call_alone(
    pool: HoldingPool, db: asyncpg.Connection
) -> None:
    async with pool.acquire() as conn:
        first = await conn.fetchval(PID)
        assert await db.fetchval("SELECT pg_terminate_backend($1, 5000)", first)
        with pytest.raises(TRANSIENT):
            await conn.fetchval(PID)
    assert await pool.fetchval(PID) != first


async def test_a_connection_kept_idle_for_the_hold_time_goes_back_to_asyncpg(
    database_url: str,
) -> None:
    async with over_asyncpg(database_url, hold=0.2) as (inner, pool):
        await pool.fetchval("SELECT 1")
        assert inner.get_idle_size() == 0  # kept here: asyncpg counts it as in use
        await until(lambda: inner.get_idle_size() == 1, what="the trim, 0.2 s after the call")
        assert await pool.fetchval("SELECT 2") == 2


async def test_a_connection_held_past_the_hold_time_goes_back_when_its_call_ends(
    database_url: str,
) -> None:
    async with over_asyncpg(database_url, hold=0.2) as (inner, pool):
        async with pool.acquire() as conn:
            await asyncio.sleep(0.3)  # borrowed longer than the hold time
            await conn.fetchval("SELECT 1")
        assert inner.get_idle_size() == 1


async def test_closing_the_pool_closes_the_connections_it_kept(
    database_url: str, db: asyncpg.Connection
) -> None:
    pool = await open_pool(database_url, 2, None)
    async with pool.acquire() as a, pool.acquire() as b:
        pids = [await a.fetchval(PID), await b.fetchval(PID)]
    await pool.close()

    async def gone() -> bool:  # a backend exits soon after its client closes the connection
        alive = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        return not alive

    await until(gone, what="the backends to exit")
