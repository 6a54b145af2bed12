"""How ``RunHandle.result`` hears of a run's end: announced only while a process awaits one,
and read, not lost, when it ends as the first waiter comes."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

import durable
from engine import RunRow
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


async def test_a_run_attempted_here_is_awaited_on_its_attempt_and_read_once_it_ends(
    database_url: str,
) -> None:
    """A run that a worker of this process runs (started beside it) is awaited on its
    attempt: no read goes to the database while the attempt runs, and the one after it ends
    finds the end written. A timeout still holds and leaves the attempt running."""
    app = make_app(database_url)
    entered, release = asyncio.Event(), asyncio.Event()

    @app.function(name="gated")
    async def gated(ctx: durable.Context, n: int) -> int:
        entered.set()
        await release.wait()
        return n + 1

    reads = 0
    async with app, running_worker(app):
        read = app._client.read_awaited

        async def counted(run_id: uuid.UUID) -> tuple[RunRow | None, float]:
            nonlocal reads
            reads += 1
            return await read(run_id)

        app._client.read_awaited = counted  # type: ignore[method-assign]
        handle = await app.start("gated", 1)
        await entered.wait()
        with pytest.raises(durable.ResultTimeout):
            await handle.result(timeout=0.2)
        assert reads == 1  # once the attempt had run past the timeout
        waiting = asyncio.create_task(handle.result(timeout=20))
        await asyncio.sleep(0)  # it waits on the attempt, which cannot end before the release
        assert reads == 1
        release.set()
        assert await waiting == 2
        info = await handle.info()
    assert reads == 2
    assert info.attempt == 1  # the timeout did not touch the attempt
