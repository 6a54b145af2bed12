"""The app the flow-control acceptance tests run in separate worker processes.

``make_app(url)`` builds it: the workers import ``app`` (its URL from $DURABLE_DATABASE_URL),
and a test builds its own with the test database's URL to start runs. Step bodies record what
they did in $COUNTER_DIR (one line per execution) and wait for gate files in $GATE_DIR.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

import durable
from tests.acceptance.workflows import gate, record

Job = dict[str, Any]


async def timed(name: str, label: str, seconds: float) -> None:
    """Record start and end (wall clock, with the pid) around a short piece of work."""
    start = time.time()
    await asyncio.sleep(seconds)
    record(name, f"{label} {start} {time.time()} {os.getpid()}")


async def endless(tag: str) -> None:
    record(f"{tag}-step", os.getpid())
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        record(f"{tag}-cancelled", os.getpid())
        raise


async def midway(tag: str) -> int:
    record(f"{tag}-midway", os.getpid())
    await gate(f"{tag}-go")
    return os.getpid()


def make_app(database_url: str | None = None) -> durable.App:
    app = durable.App(
        database_url,
        lease=timedelta(seconds=2),
        poll_interval=timedelta(milliseconds=200),
        short_wait=timedelta(milliseconds=100),
    )
    app.rate_limit("api", limit=10, period=timedelta(seconds=1))

    @durable.step(rate_limit="api")
    async def call_api(i: int) -> int:
        record("api-calls", f"{i} {time.time()}")
        return i

    @app.function(
        name="tenant_job",
        concurrency=durable.Concurrency(key=lambda job: job["tenant"], limit=1),
    )
    async def tenant_job(ctx: durable.Context, job: Job) -> None:
        await ctx.step("work", timed, "tenant-jobs", f"{job['tenant']}/{job['i']}", 0.05)

    @app.function(name="limited", concurrency=2)
    async def limited(ctx: durable.Context, i: int) -> None:
        await ctx.step("work", timed, "limited", str(i), 0.1)

    @app.function(name="api_user")
    async def api_user(ctx: durable.Context, i: int) -> int:
        return await ctx.step("call", call_api, i)

    @app.function(name="ranked")
    async def ranked(ctx: durable.Context, label: str) -> None:
        await ctx.step("work", timed, "ranked", label, 0.01)

    @app.function(name="napping_child")
    async def napping_child(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(hours=1))

    @app.function(name="cancellable")
    async def cancellable(ctx: durable.Context, tag: str) -> None:
        await ctx.start(napping_child)
        await ctx.start(napping_child)
        await ctx.step("endless", endless, tag)

    @app.function(name="double")
    async def double(ctx: durable.Context, i: int) -> int:
        return await ctx.step("double", lambda: i * 2)

    @app.function(name="fan_out")
    async def fan_out(ctx: durable.Context, n: int) -> int:
        half = n // 2
        first = await asyncio.gather(*(ctx.start(double, i) for i in range(half)))
        await ctx.step("midway", midway, "fan-out")
        rest = await asyncio.gather(*(ctx.start(double, i) for i in range(half, n)))
        results: list[int] = await asyncio.gather(*(c.result() for c in [*first, *rest]))
        return sum(results)

    @app.function(name="tick")
    async def tick(ctx: durable.Context) -> None:
        await ctx.step("tick", lambda: record("ticks", str(ctx.run_id)))

    if os.environ.get("FLOW_CRON"):
        app.schedule(tick, cron="* * * * * *", name="every-second")
    return app


app = make_app()
