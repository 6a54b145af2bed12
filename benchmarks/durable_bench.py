"""durable's side of the benchmark: one workload per process, one JSON line on stdout.

    python benchmarks/durable_bench.py W2 --url postgresql://... [--quick]

Run by benchmarks/harness.py, which starts a fresh process per workload and compares the
figures with the peers'. The database named in --url is dropped and created first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import durable

CONCURRENCY = 100  # the worker concurrency budget every system gets
app = durable.App(pool_size=20)
marks: dict[str, float] = {}


async def small(i: int) -> dict[str, int]:
    return {"i": i}


def mark(tag: str) -> float:
    marks[tag] = time.perf_counter()
    return time.time()


@app.function(name="noop")
async def noop(ctx: durable.Context, n: int) -> int:
    return n


@app.function(name="five_steps")
async def five_steps(ctx: durable.Context, n: int) -> int:
    for i in range(5):
        await ctx.step(f"s{i}", small, i)
    return n


@app.function(name="probe")
async def probe(ctx: durable.Context, tag: str) -> None:
    await ctx.step("mark", mark, tag)


@app.function(name="napper")
async def napper(ctx: durable.Context, tag: str) -> float:
    await ctx.sleep(timedelta(seconds=1))
    return await ctx.step("woke", mark, tag)


@app.function(name="waiter")
async def waiter(ctx: durable.Context, tag: str) -> None:
    await ctx.wait_for_event("go", key=tag)
    await ctx.step("resumed", mark, tag)


@app.function(name="long")
async def long(ctx: durable.Context, steps: int) -> int:
    for i in range(steps):
        await ctx.step("s", small, i)
    await ctx.wait_for_event("resume", key=str(ctx.run_id))
    return steps


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fresh_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def completed(conn: asyncpg.Connection[Any]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM durable.runs WHERE status = 'completed'"))


async def until_completed(conn: asyncpg.Connection[Any], total: int) -> float:
    """Poll the database every 10 ms until ``total`` runs are completed; returns the time."""
    while await completed(conn) < total:  # noqa: ASYNC110 (the database is the judge, as for the peers)
        await asyncio.sleep(0.01)
    return time.perf_counter()


async def with_worker(work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    worker = asyncio.create_task(app.run_worker(concurrency=CONCURRENCY))
    await asyncio.sleep(1.0)  # an idle, listening worker, as the peers get
    try:
        return await work()
    finally:
        app.stop_workers()
        await worker


async def floor_table(conn: asyncpg.Connection[Any]) -> None:
    """The table of the floor's inserts (W1's and W3's): two columns, a primary key."""
    await conn.execute("CREATE TABLE bench_floor (id uuid PRIMARY KEY, v jsonb)")


async def floor_insert(conn: asyncpg.Connection[Any]) -> None:
    """One committing one-row insert into ``floor_table``: no start that is durable when it
    returns costs less on this machine."""
    await conn.execute("INSERT INTO bench_floor VALUES ($1, '{}')", uuid.uuid4())


async def single_insert_rate(conn: asyncpg.Connection[Any], n: int) -> float:
    """The floor under starts made one call at a time: ``n`` of the floor's inserts, back to
    back, on one connection."""
    await floor_table(conn)
    began = time.perf_counter()
    for _ in range(n):
        await floor_insert(conn)
    return n / (time.perf_counter() - began)


async def w1(url: str, n: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    began = time.perf_counter()
    for i in range(n):
        await app.start(noop, i)
    single = n / (time.perf_counter() - began)
    await conn.execute("ANALYZE durable.runs")
    began, cpu = time.perf_counter(), time.process_time()
    worker = asyncio.create_task(app.run_worker(concurrency=CONCURRENCY))
    drain = n / (await until_completed(conn, n) - began)
    drain_cpu = (time.process_time() - cpu) / n
    await asyncio.sleep(1.0)  # idle and listening
    began, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        await app.start(noop, i)
    e2e = n / (await until_completed(conn, 2 * n) - began)
    e2e_cpu = (time.process_time() - cpu) / n
    app.stop_workers()
    await worker
    began = time.perf_counter()
    for chunk in range(0, n, 1000):
        await app.start_many(noop, range(chunk, min(n, chunk + 1000)))
    batched = n / (time.perf_counter() - began)
    floor = await single_insert_rate(conn, n)
    await conn.close()
    return {
        "start_single_per_s": single,
        "start_batch_per_s": batched,
        "floor_single_per_s": floor,
        "drain_per_s": drain,
        "e2e_per_s": e2e,
        "drain_cpu_us_per_run": drain_cpu * 1e6,
        "e2e_cpu_us_per_run": e2e_cpu * 1e6,
    }


async def w2(url: str, n: int) -> dict[str, Any]:
    """Started singly while the worker runs (as the peers are measured), then a second batch
    started with start_many before the worker starts and drained (where group commit shows)."""
    conn = await asyncpg.connect(url)

    async def work() -> dict[str, Any]:
        before = await completed(conn)
        began, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            await app.start(five_steps, i)
        finished = await until_completed(conn, before + n)
        rate = n / (finished - began)
        per_step = (time.process_time() - cpu) / (5 * n)
        return {"workflows_per_s": rate, "steps_per_s": 5 * rate, "cpu_us_per_step": per_step * 1e6}

    try:
        singly = await with_worker(work)
        before = await completed(conn)  # W7 counts on top of its seeded history
        await app.start_many(five_steps, range(n))
        await conn.execute("ANALYZE durable.runs")
        began, cpu = time.perf_counter(), time.process_time()
        worker = asyncio.create_task(app.run_worker(concurrency=CONCURRENCY))
        drained = n / (await until_completed(conn, before + n) - began)
        drain_cpu = (time.process_time() - cpu) / (5 * n)
        app.stop_workers()
        await worker
    finally:
        await conn.close()
    return {
        **singly,
        "drain_workflows_per_s": drained,
        "drain_steps_per_s": 5 * drained,
        "drain_cpu_us_per_step": drain_cpu * 1e6,
        "rss_mb": _rss_mb(),
    }


async def w3(url: str, n: int) -> dict[str, Any]:
    """Start to first step, each start after an idle spell; and, between the probes, the floor
    under them on this machine: after the same idle spell, a committing one-row insert into a
    two-column table, then the hop to a thread (the probe's step is a plain ``def``), on a
    connection of its own. No start that is durable when it returns goes below it."""
    conn = await asyncpg.connect(url)
    await floor_table(conn)

    async def work() -> dict[str, Any]:
        latencies, floor = [], []
        for i in range(n):
            tag = f"p{i}"
            began = time.perf_counter()
            handle = await app.start(probe, tag)
            await handle.result(timeout=30)
            latencies.append((marks[tag] - began) * 1000)
            await asyncio.sleep(random.uniform(0, 0.25))
            began = time.perf_counter()
            await floor_insert(conn)
            floor.append((await asyncio.to_thread(time.perf_counter) - began) * 1000)
            await asyncio.sleep(random.uniform(0, 0.25))
        return {
            "p50_ms": statistics.median(latencies),
            "p99_ms": pct(latencies, 0.99),
            "floor_p50_ms": statistics.median(floor),
            "floor_p99_ms": pct(floor, 0.99),
        }

    try:
        return await with_worker(work)
    finally:
        await conn.close()


async def w4(url: str, n: int) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        handles = [await app.start(napper, f"n{i}") for i in range(n)]
        # Every result first, as DBOS's side waits for each: the wake times are read from the
        # journals afterwards, not by queries in the window the runs wake in.
        woke = [await handle.result(timeout=60) for handle in handles]
        late = []
        for handle, at in zip(handles, woke, strict=True):
            [sleep] = [e for e in await handle.journal() if e.kind == "sleep"]
            late.append((at - datetime.fromisoformat(sleep.value["wake_at"]).timestamp()) * 1000)
        return {
            "late_p50_ms": statistics.median(late),
            "late_p99_ms": pct(late, 0.99),
            "late_max_ms": max(late),
        }

    return await with_worker(work)


async def w5(url: str, n: int) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        handles = [await app.start(waiter, f"e{i}") for i in range(n)]
        for handle in handles:
            while await handle.status() != "suspended":  # noqa: ASYNC110 (state in the database)
                await asyncio.sleep(0.01)
        latencies = []
        for i, handle in enumerate(handles):
            sent = time.perf_counter()
            await app.send_event("go", key=f"e{i}")
            await handle.result(timeout=30)
            latencies.append((marks[f"e{i}"] - sent) * 1000)
        return {"p50_ms": statistics.median(latencies), "p99_ms": pct(latencies, 0.99)}

    return await with_worker(work)


async def w6(url: str, steps: int) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        handle = await app.start(long, steps)
        while await handle.status() != "suspended":  # noqa: ASYNC110 (state in the database)
            await asyncio.sleep(0.05)
        calls = _count_queries()
        began = time.perf_counter()
        await app.send_event("resume", key=str(handle.run_id))
        await handle.result(timeout=60)
        elapsed = time.perf_counter() - began
        # Store calls from the send to the result, by call (the client's own get_run polls
        # included). Before the run is live again the worker makes one claim and one journal
        # load, whatever the journal's length.
        by_call = calls()
        return {
            "journal_steps": steps,
            "resume_ms": elapsed * 1000,
            "queries_by_call": by_call,
        }

    return await with_worker(work)


async def w7(url: str, n: int, rows: int, suspended: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    began = time.perf_counter()
    await conn.execute(_SEED_HISTORY, rows // 10)
    await conn.execute(_SEED_WAITING, suspended)
    await conn.execute("ANALYZE")
    seeded = time.perf_counter() - began
    await conn.close()
    result = await w2(url, n)
    return {**result, "journal_rows": rows, "suspended_runs": suspended, "seed_s": seeded}


# Into the segment of runs kept for ever (the app sets no retention), as the app's own are.
_SEED_HISTORY = """
WITH segment AS (
    SELECT durable.open_segment(NULL) AS id
), done AS (
    INSERT INTO durable.runs (id, function, status, attempt, result, finished_at, segment)
    SELECT gen_random_uuid(), 'history', 'completed', 1, '1', now(), segment.id
      FROM generate_series(1, $1), segment
    RETURNING id, segment
)
INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, segment)
SELECT done.id, s::text, 'step', 's', '{"i": 1}', 1, done.segment
  FROM done, generate_series(0, 9) AS s
"""

_SEED_WAITING = """
WITH waiting AS (
    INSERT INTO durable.runs (id, function, status, attempt, available_at, segment)
    SELECT gen_random_uuid(), 'waiter', 'suspended', 1, NULL, durable.open_segment(NULL)
      FROM generate_series(1, $1)
    RETURNING id
)
INSERT INTO durable.waits (run_id, position, name, key, timeout_at)
SELECT waiting.id, '0', 'never', waiting.id::text, NULL FROM waiting
"""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_queries() -> Callable[[], dict[str, int]]:
    """Count the store's round trips from now on, by call: each store call is one statement."""
    store = app._connection.store  # the harness looks inside on purpose: it counts queries
    counts: dict[str, int] = {}
    for method in _STORE_CALLS:
        original = getattr(store, method)

        async def counted(
            *args: Any, _original: Any = original, _name: str = method, **kw: Any
        ) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return await _original(*args, **kw)

        setattr(store, method, counted)
    return lambda: dict(counts)


_STORE_CALLS = [
    "start_runs",
    "claim",
    "claim_due",
    "next_due",
    "renew_leases",
    "load_journal",
    "append",
    "append_sleep",
    "await_event",
    "send_event",
    "suspend",
    "finish",
    "release",
    "resume",
    "get_run",
    "find_runs",
    "list_waits",
]


SIZES = {  # full, quick
    "W1": (5000, 500),
    "W2": (1000, 200),
    "W3": (200, 40),
    "W4": (200, 50),
    "W5": (200, 50),
    "W6": (1000, 1000),
    "W7": (1000, 200),
}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(SIZES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = SIZES[args.workload][1 if args.quick else 0]
    await fresh_database(args.url)
    os.environ["DURABLE_DATABASE_URL"] = args.url
    async with app:
        if args.workload == "W7":
            rows, waiting = (100_000, 1000) if args.quick else (1_000_000, 10_000)
            figures = await w7(args.url, size, rows, waiting)
        else:
            runner = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6}[args.workload]
            figures = await runner(args.url, size)
    print(json.dumps({"system": "durable", "workload": args.workload, "size": size, **figures}))


if __name__ == "__main__":
    asyncio.run(main())
