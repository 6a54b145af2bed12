"""Flow control end to end, on real Postgres with an in-process worker: child runs, cancellation,
step rate limits, timeouts, delayed starts, queues and concurrency strategies. (The limits
across worker processes are proven in tests/acceptance/test_flow_control.py.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import durable
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


async def test_a_parent_fans_out_children_and_gathers_their_results(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def square(ctx: durable.Context, n: int) -> int:
        return await ctx.step("square", lambda: n * n)

    @app.function()
    async def total(ctx: durable.Context, n: int) -> int:
        results = await asyncio.gather(*(ctx.run(square, i) for i in range(n)))
        return sum(results)

    async with app, running_worker(app, concurrency=4):
        run = await app.start(total, 20)
        assert await run.result(timeout=60) == sum(i * i for i in range(20))
        children = await run.children()
        journal = await run.journal()
    assert sorted(c.input for c in children) == list(range(20))
    assert {c.parent_id for c in children} == {run.run_id}
    assert [e.kind for e in journal].count("start") == 20
    assert [e.kind for e in journal].count("join") == 20


async def test_a_failed_child_raises_run_failed_in_its_parent(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def broken(ctx: durable.Context) -> None:
        raise ValueError("no")

    @app.function()
    async def parent(ctx: durable.Context) -> str:
        child = await ctx.start(broken)
        try:
            await child.result()
        except durable.RunFailed as exc:
            return f"{exc.error.type}: {exc.error.message}"
        return "unexpected"

    async with app, running_worker(app):
        assert await (await app.start(parent)).result(timeout=30) == "ValueError: no"


async def test_cancelling_a_running_run_cancels_its_step_and_its_children(
    database_url: str,
) -> None:
    app = make_app(database_url)
    step_started = asyncio.Event()
    step_cancelled = asyncio.Event()

    async def endless() -> None:
        step_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            step_cancelled.set()
            raise

    @app.function()
    async def napper(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(hours=1))

    @app.function()
    async def parent(ctx: durable.Context) -> None:
        await ctx.start(napper)
        await ctx.step("endless", endless)

    async with app, running_worker(app):
        run = await app.start(parent)
        await asyncio.wait_for(step_started.wait(), 30)
        [child] = await run.children()
        assert await run.cancel("test") == "requested"
        await asyncio.wait_for(step_cancelled.wait(), 30)
        with pytest.raises(durable.RunCancelled):
            await run.result(timeout=30)
        child_run = app.get_run(child.run_id)
        await until(lambda: status_is(child_run, "cancelled"), what="child cancelled")
        child_info = await child_run.info()
    assert child_info.status == "cancelled"
    assert child_info.error is not None
    assert "parent" in child_info.error.message


async def test_a_step_with_a_rate_limit_waits_for_budget(database_url: str) -> None:
    app = make_app(database_url, short_wait=timedelta(seconds=2))
    app.rate_limit("api", limit=2, period=timedelta(seconds=1))
    times: list[datetime] = []

    @durable.step(rate_limit="api")
    async def call(i: int) -> int:
        times.append(datetime.now(UTC))
        return i

    @app.function()
    async def burst(ctx: durable.Context) -> list[int]:
        return [await ctx.step(f"call {i}", call, i) for i in range(5)]

    async with app, running_worker(app):
        assert await (await app.start(burst)).result(timeout=30) == [0, 1, 2, 3, 4]
    # Five calls at two per second: the fifth cannot come before two full periods.
    assert times[4] - times[0] >= timedelta(seconds=2) - timedelta(milliseconds=50)
    for first, third in zip(times, times[2:], strict=False):
        assert third - first >= timedelta(seconds=1) - timedelta(milliseconds=50)


async def test_a_run_past_its_execution_timeout_fails_even_mid_step(database_url: str) -> None:
    app = make_app(database_url)
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.function(timeout=timedelta(seconds=1))
    async def bounded(ctx: durable.Context) -> None:
        await ctx.step("slow", slow)

    @app.function(timeout=timedelta(seconds=1))
    async def sleeper(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(hours=1))

    async with app, running_worker(app):
        runs = [await app.start(bounded), await app.start(sleeper)]
        for run in runs:
            with pytest.raises(durable.RunFailed) as failed:
                await run.result(timeout=30)
            assert failed.value.error.type == "RunTimedOut"
    assert cancelled.is_set()


async def test_a_delayed_run_starts_no_earlier_and_an_unstarted_one_expires(
    database_url: str,
) -> None:
    app = make_app(database_url)
    started: list[datetime] = []

    @app.function()
    async def later(ctx: durable.Context) -> None:
        started.append(datetime.now(UTC))

    @app.function(queue="nobody", start_timeout=timedelta(milliseconds=200))
    async def unserved(ctx: durable.Context) -> None:
        return None

    async with app, running_worker(app):
        asked = datetime.now(UTC)
        await (await app.start(later, delay=timedelta(seconds=1))).result(timeout=30)
        expiring = await app.start(unserved)
        expires_at = (await expiring.info()).expires_at
        assert expires_at is not None
        await until(lambda: datetime.now(UTC) > expires_at, what="the start timeout passed")
        task = asyncio.create_task(app.run_worker(queues=["nobody"]))
        try:
            with pytest.raises(durable.RunFailed) as failed:
                await expiring.result(timeout=30)
        finally:
            app.stop_workers()
            await asyncio.wait_for(task, 30)
    assert started[0] - asked >= timedelta(seconds=1) - timedelta(milliseconds=50)
    assert failed.value.error.type == "RunExpired"


async def test_a_worker_serves_only_its_queues(database_url: str) -> None:
    app = make_app(database_url)

    @app.function(queue="emails")
    async def email(ctx: durable.Context) -> str:
        return "sent"

    @app.function()
    async def other(ctx: durable.Context) -> str:
        return "done"

    async with app, running_worker(app):
        run = await app.start(email)
        # The default-queue worker claims what came after, and leaves the email alone.
        assert await (await app.start(other)).result(timeout=30) == "done"
        assert await run.status() == "pending"
        task = asyncio.create_task(app.run_worker(queues=["emails"]))
        try:
            assert await run.result(timeout=30) == "sent"
        finally:
            app.stop_workers()
            await asyncio.wait_for(task, 30)


async def test_cancel_newest_keeps_the_running_run(database_url: str) -> None:
    app = make_app(database_url)
    release = asyncio.Event()

    @app.function(concurrency=durable.Concurrency(limit=1, strategy="cancel-newest"))
    async def exclusive(ctx: durable.Context, n: int) -> int:
        await ctx.step("wait", release.wait)
        return n

    async with app, running_worker(app):
        first = await app.start(exclusive, 1)
        await until(lambda: status_is(first, "running"), what="first running")
        second = await app.start(exclusive, 2)
        assert await second.status() == "cancelled"
        release.set()
        assert await first.result(timeout=30) == 1


async def test_start_many_on_the_callers_connection_commits_with_it(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def noop(ctx: durable.Context, n: int) -> int:
        return n

    async with app:
        conn = await asyncpg.connect(database_url)
        rolled: list[durable.RunHandle[int]] = []

        async def start_then_roll_back() -> None:
            async with conn.transaction():
                rolled.extend(await app.start_many(noop, [1, 2], connection=conn))
                raise RuntimeError("roll back")

        try:
            with pytest.raises(RuntimeError):
                await start_then_roll_back()
            async with conn.transaction():
                kept = await app.start_many(noop, [3, 4], connection=conn)
        finally:
            await conn.close()
        with pytest.raises(durable.RunNotFound):
            await rolled[0].info()
        async with running_worker(app):
            assert [await h.result(timeout=30) for h in kept] == [3, 4]


async def test_a_concurrency_key_that_fails_on_an_input_refuses_the_start(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(concurrency=durable.Concurrency(key=lambda job: job["tenant"], limit=1))
    async def job(ctx: durable.Context, job: dict[str, str]) -> None:
        return None

    async with app:
        with pytest.raises(durable.InvalidInput, match="concurrency key"):
            await app.start(job, {"no tenant": "x"})
        assert await app.list_runs() == []
