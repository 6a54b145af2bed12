"""How ``RunHandle.result`` hears of a run's end: announced only while a process awaits one,
and never missed by a waiter that arrives as the run ends."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import durable
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def _doubling(app: durable.App) -> None:
    @app.function(name="double")
    async def double(ctx: durable.Context, n: int) -> int:
        return n * 2


async def test_ends_are_announced_only_while_a_process_awaits_a_result(database_url: str) -> None:
    app = make_app(database_url)
    _doubling(app)
    heard: list[str] = []
    marker = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        heard.append(payload)
        if payload == "marker":
            marker.set()

    listening = await asyncpg.connect(database_url)
    await listening.add_listener("durable_done", on_notify)
    try:
        async with app, running_worker(app):
            unawaited = await app.start("double", 1)
            await until(lambda: status_is(unawaited, "completed"), what="the first run's end")
            # Notifications arrive in commit order: an announcement of that end would have come
            # before the marker.
            await listening.execute("SELECT pg_notify('durable_done', 'marker')")
            await asyncio.wait_for(marker.wait(), 20)
            before = list(heard)
            assert await unawaited.result(timeout=20) == 2  # this process now awaits results
            awaited = await app.start("double", 2)
            await until(lambda: str(awaited.run_id) in heard, what="the announcement")
            recorded = await listening.fetchval("SELECT count(*) FROM durable.result_waiters")
        left = await listening.fetchval("SELECT count(*) FROM durable.result_waiters")
    finally:
        await listening.close()
    assert before == ["marker"]
    assert (recorded, left) == (1, 0)


async def test_an_end_that_looked_for_waiters_before_the_first_one_came_is_read_not_lost(
    database_url: str,
) -> None:
    app = make_app(database_url)
    _doubling(app)
    heard: list[str] = []
    marker = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        heard.append(payload)
        if payload == "marker":
            marker.set()

    ender = await asyncpg.connect(database_url)
    listening = await asyncpg.connect(database_url)
    await listening.add_listener("durable_done", on_notify)
    try:
        async with app:
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
                lambda: listening.fetchval("SELECT count(*) FROM durable.result_waiters"),
                what="the waiter's record",
            )
            await ending.commit()
            assert await asyncio.wait_for(waiting, 20) == 42
            await listening.execute("SELECT pg_notify('durable_done', 'marker')")
            await asyncio.wait_for(marker.wait(), 20)
    finally:
        await ender.close()
        await listening.close()
    assert heard == ["marker"]  # it was read: nothing announced it
