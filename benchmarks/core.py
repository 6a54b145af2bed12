"""First figures for the durable core (the full side-by-side harness is a later issue).

    python benchmarks/core.py [--runs 500] [--concurrency 50]

Uses $DURABLE_DATABASE_URL, else the embedded PostgreSQL. Reports:
  five-step workflows per second (start all, then drain with one in-process worker),
  start-to-first-step latency on an idle worker (p50, p99),
  the time to resume a run whose journal holds 1,000 steps.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import timedelta

import durable

app = durable.App(short_wait=timedelta(0))
first_step_at: dict[str, float] = {}


async def small(i: int) -> dict[str, int]:
    return {"i": i}


@app.function(name="bench.five_steps")
async def five_steps(ctx: durable.Context, n: int) -> int:
    for i in range(5):
        await ctx.step(f"s{i}", small, i)
    return n


async def mark(tag: str) -> None:
    first_step_at[tag] = time.perf_counter()


@app.function(name="bench.probe")
async def probe(ctx: durable.Context, tag: str) -> None:
    await ctx.step("mark", mark, tag)


@app.function(name="bench.long")
async def long(ctx: durable.Context, steps: int) -> int:
    for i in range(steps):
        await ctx.step("s", small, i)
    await ctx.wait_for_event("resume", key=str(ctx.run_id))
    return steps


async def throughput(runs: int) -> tuple[float, float]:
    handles = [await app.start(five_steps, i) for i in range(runs)]
    began = time.perf_counter()
    worker = asyncio.create_task(app.run_worker(concurrency=args.concurrency))
    for handle in handles:
        await handle.result(timeout=600)
    elapsed = time.perf_counter() - began
    app.stop_workers()
    await worker
    return runs / elapsed, 5 * runs / elapsed


async def latency(probes: int) -> tuple[float, float]:
    worker = asyncio.create_task(app.run_worker(concurrency=args.concurrency))
    await asyncio.sleep(0.5)
    samples = []
    for _ in range(probes):
        tag = uuid.uuid4().hex
        sent = time.perf_counter()
        handle = await app.start(probe, tag)
        await handle.result(timeout=60)
        samples.append((first_step_at[tag] - sent) * 1000)
    app.stop_workers()
    await worker
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def replay_cost(steps: int) -> float:
    worker = asyncio.create_task(app.run_worker(concurrency=1))
    handle = await app.start(long, steps)
    while await handle.status() != "suspended":  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    began = time.perf_counter()
    await app.send_event("resume", key=str(handle.run_id))
    await handle.result(timeout=120)
    elapsed = time.perf_counter() - began
    app.stop_workers()
    await worker
    return elapsed * 1000


async def main() -> None:
    async with app:
        wf, steps = await throughput(args.runs)
        p50, p99 = await latency(100)
        replay_ms = await replay_cost(1000)
    print(
        f"five-step workflows: {wf:.1f} wf/s ({steps:.0f} steps/s), "
        f"{args.runs} runs, concurrency {args.concurrency}"
    )
    print(f"start to first step, idle worker: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"resume a run with 1,000 journaled steps (event sent to result): {replay_ms:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main())
