"""Outages: dropped connections, an unreachable database, tracing across resumes."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import timedelta

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import durable
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres


async def test_runs_finish_after_every_connection_is_terminated_mid_run(
    database_url: str, db: asyncpg.Connection
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    ran: Counter[str] = Counter()
    reached = asyncio.Event()
    release = asyncio.Event()

    async def first() -> int:
        ran["first"] += 1
        reached.set()
        await release.wait()
        return 1

    @app.function()
    async def flow(ctx: durable.Context) -> int:
        one = await ctx.step("first", first)
        await ctx.sleep(0.2)
        return one + await ctx.step("second", lambda: 1)

    async with app, running_worker(app):
        run = await app.start(flow)
        await reached.wait()
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        release.set()
        assert await run.result(timeout=30) == 2
    # The first attempt's append may have died with its connection: then the step ran again,
    # at-least-once; it is never journaled twice.
    assert 1 <= ran["first"] <= 2


async def test_an_unreachable_database_is_retried_with_backoff_then_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = durable.App("postgresql://nobody@127.0.0.1:1/none", connect_timeout=0.5)
    with caplog.at_level(logging.WARNING), pytest.raises(durable.DatabaseUnavailable):
        await app.connect()
    assert any("unreachable" in r.getMessage() for r in caplog.records)


async def test_a_malformed_database_url_is_a_clear_error_at_once() -> None:
    with pytest.raises(durable.ConfigurationError, match="postgresql://"):
        await durable.App("mysql://localhost/db").connect()


async def test_one_trace_follows_a_run_across_a_resume(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    app = make_app(database_url, short_wait=timedelta(0))

    @app.function()
    async def traced(ctx: durable.Context) -> None:
        await ctx.step("before", lambda: 1)
        await ctx.sleep(0.2)
        await ctx.step("after", lambda: 2)

    trace.set_tracer_provider(provider)
    async with app, running_worker(app):
        with tracer.start_as_current_span("caller") as caller:
            run = await app.start(traced)
        await run.result(timeout=20)
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name.startswith("durable.run")]
    steps = {s.name: s for s in spans if s.name.startswith("durable.step")}
    trace_id = caller.get_span_context().trace_id
    assert len(runs) == 2
    assert all(s.context.trace_id == trace_id for s in [*runs, *steps.values()])
    assert set(steps) == {"durable.step before", "durable.step after"}
    step = steps["durable.step after"]
    assert step.attributes is not None
    assert step.attributes["durable.run_id"] == str(run.run_id)
    assert step.attributes["durable.position"] == "2"


async def test_a_stopping_worker_hands_unfinished_runs_back_at_once(database_url: str) -> None:
    app = make_app(database_url, lease=timedelta(minutes=5))
    started = asyncio.Event()
    attempts: Counter[int] = Counter()

    async def long_step(ctx_attempt: int) -> str:
        attempts[ctx_attempt] += 1
        if ctx_attempt == 1:
            started.set()
            await asyncio.Event().wait()  # never finishes on the first worker
        return "finished"

    @app.function()
    async def slow(ctx: durable.Context) -> str:
        return await ctx.step("long", long_step, ctx.attempt)

    async with app:
        worker = asyncio.create_task(
            app.run_worker(concurrency=2, shutdown_grace=timedelta(milliseconds=100))
        )
        run = await app.start(slow)
        await started.wait()
        app.stop_workers()
        await asyncio.wait_for(worker, 30)
        assert await run.status() == "pending"  # not stuck behind the 5-minute lease
        async with running_worker(app):
            assert await run.result(timeout=20) == "finished"
    assert attempts == {1: 1, 2: 1}


async def test_a_function_that_cancels_itself_fails_the_run(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def quitter(ctx: durable.Context) -> None:
        await ctx.step("a", lambda: 1)
        raise asyncio.CancelledError

    async with app, running_worker(app):
        with pytest.raises(durable.RunFailed, match="CancelledError"):
            await (await app.start(quitter)).result(timeout=20)


async def test_a_step_longer_than_the_lease_keeps_its_claim(database_url: str) -> None:
    app = make_app(database_url, lease=timedelta(seconds=1))
    ran: Counter[str] = Counter()

    async def slow() -> str:
        ran["slow"] += 1
        await asyncio.sleep(2.5)  # the subject: work that outlasts the lease twice over
        return "done"

    @app.function()
    async def long(ctx: durable.Context) -> str:
        return await ctx.step("slow", slow)

    async with app, running_worker(app):
        run = await app.start(long)
        assert await run.result(timeout=20) == "done"
        assert (await run.info()).attempt == 1
    assert ran == {"slow": 1}


async def test_a_step_attempt_past_its_timeout_fails_and_is_retried(database_url: str) -> None:
    app = make_app(database_url)
    attempts: list[int] = []

    @durable.step(
        retries=1,
        timeout=timedelta(milliseconds=100),
        backoff=durable.Backoff(initial=timedelta(milliseconds=1)),
    )
    async def sometimes_slow() -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            await asyncio.Event().wait()  # hangs until the timeout cancels it
        return "second try"

    @durable.step(timeout=timedelta(milliseconds=50))
    async def always_slow() -> str:
        await asyncio.Event().wait()
        return "never"

    @app.function()
    async def timed(ctx: durable.Context) -> list[str]:
        first = await ctx.step("sometimes", sometimes_slow)
        try:
            await ctx.step("always", always_slow)
        except durable.StepFailed as failure:
            return [first, failure.error.type, failure.error.message]
        return [first]

    async with app, running_worker(app):
        result = await (await app.start(timed)).result(timeout=20)
    assert attempts == [1, 2]
    assert result == ["second try", "TimeoutError", "step 'always' timed out after 0.05s"]


async def test_a_worker_runs_at_most_its_concurrency_at_once(database_url: str) -> None:
    app = make_app(database_url)
    running = 0
    peak = 0
    two_in = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 2:
            two_in.set()
        await release.wait()
        running -= 1

    @app.function()
    async def busy(ctx: durable.Context) -> None:
        await ctx.step("hold", hold)

    async with app, running_worker(app, concurrency=2):
        runs = [await app.start(busy) for _ in range(5)]
        await two_in.wait()
        statuses = [await r.status() for r in runs]
        release.set()
        for run in runs:
            await run.result(timeout=20)
    assert peak == 2
    assert statuses.count("running") == 2
    assert statuses.count("pending") == 3
