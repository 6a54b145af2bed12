"""Timeouts and cancellation: a step that hangs, a run that takes too long, a start that comes
too late, and a run cancelled mid-step.

    python examples/timeouts.py
    durable runs cancel RUN_ID      # what handle.cancel() does, from a shell

- A step timeout cancels the attempt and counts as a failed attempt for its retries.
- A run's execution timeout fixes its deadline when it first starts; past it the run fails
  with RunTimedOut, even while it sleeps or waits.
- A start timeout fails a run that no worker started in time with RunExpired.
- Cancelling a running run delivers CancelledError to the step in progress, and the run ends
  as cancelled (its children with it).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import durable

app = durable.App()
started = asyncio.Event()
cleaned_up = asyncio.Event()


@durable.step(timeout=timedelta(milliseconds=200), retries=1)
async def flaky_lookup(sku: str) -> int:
    await asyncio.sleep(10)  # the supplier's API hangs
    return 1


@app.function(name="check_stock")
async def check_stock(ctx: durable.Context, sku: str) -> str:
    try:
        return f"{sku}: {await ctx.step('lookup', flaky_lookup, sku)} in stock"
    except durable.StepFailed as failure:
        return f"{sku}: unknown ({failure.error.message})"


@app.function(name="await_payment", timeout=timedelta(seconds=1))
async def await_payment(ctx: durable.Context, order: str) -> str:
    await ctx.wait_for_event("paid", key=order)
    return "paid"


@app.function(name="flash_sale", start_timeout=timedelta(milliseconds=300), queue="sales")
async def flash_sale(ctx: durable.Context) -> str:
    return "sold"


async def export_rows() -> None:
    started.set()
    try:
        await asyncio.sleep(3600)  # a long export
    except asyncio.CancelledError:
        cleaned_up.set()  # close files, release locks
        raise


@app.function(name="export")
async def export(ctx: durable.Context) -> None:
    await ctx.step("rows", export_rows)


async def outcome(handle: durable.RunHandle[Any]) -> str:
    try:
        return str(await handle.result(timeout=30))
    except durable.RunFailed as failed:
        return f"{type(failed).__name__}: {failed.error.type}"


async def main() -> dict[str, str]:
    async with app:
        worker = asyncio.create_task(app.run_worker())
        stock = await app.start(check_stock, "sku-1")
        payment = await app.start(await_payment, "order-7")
        sale = await app.start(flash_sale)
        job = await app.start(export)
        await asyncio.wait_for(started.wait(), 30)
        await job.cancel("the user closed the page")
        await asyncio.wait_for(cleaned_up.wait(), 30)
        await asyncio.sleep(0.5)  # the sale's start timeout passes with no "sales" worker
        sales = asyncio.create_task(app.run_worker(queues=["sales"]))
        results = {
            "stock": await outcome(stock),
            "payment": await outcome(payment),
            "sale": await outcome(sale),
            "export": await outcome(job),
        }
        app.stop_workers()
        await asyncio.gather(worker, sales)
    for name, result in results.items():
        print(f"{name:8} {result}")
    return results


if __name__ == "__main__":
    asyncio.run(main())
