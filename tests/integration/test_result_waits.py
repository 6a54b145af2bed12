"""How ``RunHandle.result`` hears of a run's end: announced only while a process awaits one,
and read, not lost, when it ends as the first waiter comes."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import durable
from tests.helpers import hearing, make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def _doubling(app: durable.App) -> None:
    @app.function(name="double")
    async def double(ctx: durable.Context, n: int) -> int:
        return n * 2


async def test_ends_are_announced_only_while_a_process_awaits_a_result(database_url: str) -> None:
    app = make_app(database_url)
    _doubling(app)
    async with hearing(database_url, "durable_done") as heard:
        async with app, running_worker(app):
            unawaited = await app.start("double", 1)
            await until(lambda: status_is(unawaited, "completed"), what="the first run's end")
            before = await heard.everything_sent()
            assert await unawaited.result(timeout=20) == 2  # this process now awaits results
            awaited = await app.start("double", 2)
            await until(lambda: str(awaited.run_id) in heard.payloads, what="the announcement")
            recorded = await heard.conn.fetchval("SELECT count(*) FROM durable.result_waiters")
        left = await heard.conn.fetchval("SELECT count(*) FROM durable.result_waiters")
    assert before == []
    assert (recorded, left) == (1, 0)


async def test_an_end_that_looked_for_waiters_before_the_first_one_came_is_read_not_lost(
    database_url: str,
) -> None:
    app = make_app(database_url)
    _doubling(app)
    ender = await asyncpg.connect(database_url)
    try:
        async with hearing(database_url, "durable_done") as heard, app:
            handle = await app.start("double", 21)  # no worker: it stays pending
            # A run ending as the first waiter comes: its end has looked for waiters (none)
            # and is not committed yet.
            ending = ender.transaction()
            await ending.start()
            await ender.execute(
                "UPDATE durable.runs SET status = 'completed', result = '42' WHERE id = $1",
                handle.run_id,
            )
            await ender.execute("SELECT durable.announce_ends(ARRAY[$1::uuid])", handle.run_id)
            waiting = asyncio.create_task(handle.result(timeout=60))
            await until(
                lambda: heard.conn.fetchval("SELECT count(*) FROM durable.result_waiters"),
                what="the waiter's record",
            )
            await ending.commit()
            assert await asyncio.wait_for(waiting, 20) == 42
            announced = await heard.everything_sent()
    finally:
        await ender.close()
    assert announced == []  # it was read: nothing announced it
