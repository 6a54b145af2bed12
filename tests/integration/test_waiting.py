"""Sleeps and events on real Postgres: suspension, wake-ups, timeouts, delivery rules."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

import durable
from tests.helpers import attempt_at_least, make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


async def test_a_sleeping_run_is_suspended_and_holds_no_worker_slot(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def nap(ctx: durable.Context, seconds: float) -> str:
        await ctx.sleep(seconds)
        return "awake"

    @app.function()
    async def quick(ctx: durable.Context) -> str:
        return "done"

    async with app, running_worker(app, concurrency=1):
        sleeper = await app.start(nap, 3600.0)
        await until(lambda: status_is(sleeper, "suspended"), what="suspended")
        # With one slot, this completes only because the sleeper holds none.
        assert await (await app.start(quick)).result(timeout=20) == "done"
        info = await sleeper.info()
    assert info.available_at is not None
    assert info.available_at - datetime.now(UTC) > timedelta(minutes=59)


async def test_a_sleep_never_fires_early_and_its_wake_time_is_fixed_once(
    database_url: str,
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    woke: list[datetime] = []

    @app.function()
    async def nap(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(seconds=1))
        woke.append(datetime.now(UTC))

    async with app, running_worker(app):
        run = await app.start(nap)
        await run.result(timeout=20)
        entries = await run.journal()
    wake_at = datetime.fromisoformat(entries[0].value["wake_at"])
    assert entries[0].kind == "sleep"
    assert woke[0] >= wake_at
    assert (woke[0] - wake_at) < timedelta(seconds=1)


async def test_sleep_until_a_past_time_returns_at_once(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def past(ctx: durable.Context) -> str:
        await ctx.sleep_until(datetime(2000, 1, 1, tzinfo=UTC))
        return "on"

    async with app, running_worker(app):
        assert await (await app.start(past)).result(timeout=20) == "on"


async def test_an_event_sent_before_the_wait_is_reached_is_delivered(database_url: str) -> None:
    app = make_app(database_url)
    reached = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        reached.set()
        await release.wait()

    @app.function()
    async def waiter(ctx: durable.Context, user: str) -> Any:
        await ctx.step("hold", hold)
        return await ctx.wait_for_event("upgraded", key=user, timeout=30)

    async with app, running_worker(app):
        run = await app.start(waiter, "u1")
        await reached.wait()
        await app.send_event("upgraded", {"plan": "pro"}, key="u1")
        release.set()
        assert await run.result(timeout=20) == {"plan": "pro"}


async def test_an_event_sent_during_a_suspended_wait_wakes_the_run(database_url: str) -> None:
    app = make_app(database_url, poll_interval=timedelta(seconds=30))

    @app.function()
    async def waiter(ctx: durable.Context, user: str) -> Any:
        return await ctx.wait_for_event("upgraded", key=user)

    async with app, running_worker(app):
        run = await app.start(waiter, "u2")
        await until(lambda: status_is(run, "suspended"), what="suspended")
        sent = asyncio.get_running_loop().time()
        await app.send_event("upgraded", {"plan": "team"}, key="u2")
        assert await run.result(timeout=20) == {"plan": "team"}
        # Woken by NOTIFY, not by the (30 s) poll.
        assert asyncio.get_running_loop().time() - sent < 5


async def test_a_wait_with_a_timeout_and_no_event_returns_none_after_the_timeout(
    database_url: str,
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))

    @app.function()
    async def waiter(ctx: durable.Context) -> Any:
        started = await ctx.now()
        payload = await ctx.wait_for_event("never", key="k", timeout=timedelta(seconds=1))
        return {"payload": payload, "waited": (await ctx.now() - started).total_seconds()}

    async with app, running_worker(app):
        run = await app.start(waiter)
        result = await run.result(timeout=20)
    assert result["payload"] is None
    assert result["waited"] >= 1.0


async def test_events_sent_before_the_run_started_are_not_delivered(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def waiter(ctx: durable.Context) -> Any:
        return await ctx.wait_for_event("ping", timeout=0.5)

    async with app, running_worker(app):
        await app.send_event("ping", "old")
        assert await (await app.start(waiter)).result(timeout=20) is None


async def test_each_event_satisfies_a_wait_once_and_every_waiting_run_receives_it(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function()
    async def collector(ctx: durable.Context) -> list[Any]:
        first = await ctx.wait_for_event("tick", key="k")
        second = await ctx.wait_for_event("tick", key="k", timeout=0.5)
        return [first, second]

    async with app, running_worker(app):
        runs = [await app.start(collector) for _ in range(3)]
        for run in runs:
            await until(functools.partial(status_is, run, "suspended"), what="suspended")
        await app.send_event("tick", 1, key="k")
        results = [await run.result(timeout=20) for run in runs]
    assert results == [[1, None]] * 3


async def test_two_events_are_received_in_send_order_by_consecutive_waits(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function()
    async def collector(ctx: durable.Context) -> list[Any]:
        await ctx.sleep(0.3)
        return [await ctx.wait_for_event("n", key="k") for _ in range(2)]

    async with app, running_worker(app):
        run = await app.start(collector)
        await app.send_event("n", "first", key="k")
        await app.send_event("n", "second", key="k")
        await app.send_event("n", "other key", key="j")
        assert await run.result(timeout=20) == ["first", "second"]


async def test_a_wait_deadline_is_fixed_when_first_reached_and_survives_a_replay(
    database_url: str, db: asyncpg.Connection
) -> None:
    app = make_app(database_url)

    @app.function()
    async def waiter(ctx: durable.Context) -> Any:
        return await ctx.wait_for_event("decision", timeout=timedelta(days=2))

    async with app, running_worker(app):
        run = await app.start(waiter)
        await until(lambda: status_is(run, "suspended"), what="suspended")
        first = await db.fetchval(
            "SELECT timeout_at FROM durable.waits WHERE run_id = $1", run.run_id
        )
        # Wake it without the event: the replay registers the same wait again.
        await db.execute("UPDATE durable.runs SET available_at = now() WHERE id = $1", run.run_id)
        await until(lambda: attempt_at_least(run, 2), what="replayed")
        await until(lambda: status_is(run, "suspended"), what="suspended again")
        again = await db.fetchval(
            "SELECT timeout_at FROM durable.waits WHERE run_id = $1", run.run_id
        )
    assert again == first
