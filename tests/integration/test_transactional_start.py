"""Starting a run or sending an event on the caller's own connection, in its transaction."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest

import durable
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres

T = TypeVar("T")


class Rollback(Exception):
    pass


async def rolled_back(conn: asyncpg.Connection, action: Callable[[], Awaitable[T]]) -> T:
    """Run ``action`` in a transaction on ``conn`` and roll it back; returns what it returned."""
    result: list[T] = []
    try:
        async with conn.transaction():
            result.append(await action())
            raise Rollback
    except Rollback:
        return result[0]


async def test_a_start_in_a_rolled_back_transaction_leaves_no_run(database_url: str) -> None:
    app = make_app(database_url)

    @app.function(name="fulfil")
    async def fulfil(ctx: durable.Context, order: str) -> str:
        return await ctx.step("ship", str.upper, order)

    conn = await asyncpg.connect(database_url)
    async with app:

        async def start_and_count() -> tuple[durable.RunHandle[str], int]:
            handle = await app.start(fulfil, "o1", connection=conn)
            return handle, await conn.fetchval("SELECT count(*) FROM durable.runs")

        handle, inside = await rolled_back(conn, start_and_count)
        assert inside == 1
        with pytest.raises(durable.RunNotFound):
            await handle.info()
        assert await app.list_runs() == []
    await conn.close()


async def test_a_start_in_a_committed_transaction_runs_and_is_invisible_until_then(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(name="fulfil")
    async def fulfil(ctx: durable.Context, order: dict[str, list[int]]) -> int:
        return await ctx.step("count", sum, order["items"])

    conn = await asyncpg.connect(database_url)
    async with app, running_worker(app):
        async with conn.transaction():
            await conn.execute("CREATE TABLE orders (id text)")
            await conn.execute("INSERT INTO orders VALUES ('o1')")
            handle = await app.start(fulfil, {"items": [1, 2, 3]}, connection=conn)
            with pytest.raises(durable.RunNotFound):  # another connection cannot see it yet
                await handle.info()
        assert await handle.result(timeout=30) == 6
    await conn.close()


async def test_an_event_sent_in_a_transaction_counts_only_once_committed(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(name="approval")
    async def approval(ctx: durable.Context) -> object:
        return await ctx.wait_for_event("approved", key="r1")

    conn = await asyncpg.connect(database_url)
    async with app, running_worker(app):
        handle = await app.start(approval)
        await rolled_back(
            conn, lambda: app.send_event("approved", {"by": "nobody"}, key="r1", connection=conn)
        )
        async with conn.transaction():
            await app.send_event("approved", {"by": "ann"}, key="r1", connection=conn)
        assert await handle.result(timeout=30) == {"by": "ann"}
    await conn.close()
