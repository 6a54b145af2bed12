"""The app test_metrics.py runs in a worker process with --metrics-port: a function for each
way a run ends, one that waits (suspended), one that waits holding a concurrency slot, and
one on a queue no worker of the test serves (pending)."""

from __future__ import annotations

import asyncio
import uuid

import durable

app = durable.App()


@durable.step(retries=0)
async def fail() -> None:
    raise RuntimeError("broken on purpose")


@app.function(name="ok")
async def ok(ctx: durable.Context, n: int) -> int:
    return await ctx.step("double", lambda: n * 2)


@app.function(name="broken")
async def broken(ctx: durable.Context, n: int) -> None:
    await ctx.step("fail", fail)


@app.function(name="pauser")
async def pauser(ctx: durable.Context) -> None:
    # A step named anew on every attempt: its replay after the wait cannot match.
    await ctx.step(f"named-{uuid.uuid4()}", lambda: None)
    await ctx.wait_for_event("go")


@app.function(name="slow")
async def slow(ctx: durable.Context) -> None:
    await ctx.step("forever", asyncio.sleep, 600)


@app.function(name="waiter")
async def waiter(ctx: durable.Context, key: str) -> None:
    await ctx.wait_for_event("never", key=key)


@app.function(name="holder", concurrency=durable.Concurrency(limit=1, hold_while_suspended=True))
async def holder(ctx: durable.Context) -> None:
    await ctx.wait_for_event("never")


@app.function(name="report", queue="reports")
async def report(ctx: durable.Context, n: int) -> int:
    return n
