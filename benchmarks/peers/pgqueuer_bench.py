"""pgqueuer's side of the benchmark (runs in its own virtual environment, not ours).

    python benchmarks/peers/pgqueuer_bench.py W1 --url postgresql://... [--quick]

A plain queue: no journal, so only W1 (no-op jobs) and W3 (start latency) apply. Completion
counts when the database says so: the job row is gone from the queue table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

CONCURRENCY = 100
marks: dict[str, float] = {}


async def fresh_database(url: str) -> None:
    parts = urlsplit(url)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        name = parts.path.lstrip("/")
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pgqueuer"))


async def until_empty(conn: asyncpg.Connection) -> float:
    while await pending(conn) > 0:  # noqa: ASYNC110 (the database is the judge)
        await asyncio.sleep(0.01)
    return time.perf_counter()


async def start_worker(url: str) -> tuple[QueueManager, asyncio.Task[None], asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    @qm.entrypoint("probe")
    async def probe(job: Job) -> None:
        marks[(job.payload or b"").decode()] = time.perf_counter()

    task = asyncio.create_task(qm.run(max_concurrent_tasks=CONCURRENCY))
    return qm, task, conn


async def stop_worker(worker: tuple[QueueManager, asyncio.Task[None], asyncpg.Connection]) -> None:
    qm, task, conn = worker
    qm.shutdown.set()
    await task
    await conn.close()


async def w1(url: str, n: int) -> dict[str, Any]:
    producer = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(producer))
    began = time.perf_counter()
    for _ in range(n):
        await queries.enqueue("noop", None)
    single = n / (time.perf_counter() - began)
    await producer.execute("ANALYZE pgqueuer")
    began, cpu = time.perf_counter(), time.process_time()
    worker = await start_worker(url)
    drain = n / (await until_empty(producer) - began)
    drain_cpu = (time.process_time() - cpu) / n
    await asyncio.sleep(1.0)
    began, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await queries.enqueue("noop", None)
    e2e = n / (await until_empty(producer) - began)
    e2e_cpu = (time.process_time() - cpu) / n
    await stop_worker(worker)
    began = time.perf_counter()
    await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    batched = n / (time.perf_counter() - began)
    await producer.close()
    return {
        "start_single_per_s": single,
        "start_batch_per_s": batched,
        "drain_per_s": drain,
        "e2e_per_s": e2e,
        "drain_cpu_us_per_run": drain_cpu * 1e6,
        "e2e_cpu_us_per_run": e2e_cpu * 1e6,
    }


async def w3(url: str, n: int) -> dict[str, Any]:
    producer = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(producer))
    worker = await start_worker(url)
    await asyncio.sleep(1.0)
    latencies = []
    for i in range(n):
        tag = f"p{i}"
        began = time.perf_counter()
        await queries.enqueue("probe", tag.encode())
        while tag not in marks:  # noqa: ASYNC110 (the job body marks it)
            await asyncio.sleep(0.0005)
        latencies.append((marks[tag] - began) * 1000)
        await asyncio.sleep(random.uniform(0, 0.25))
    await stop_worker(worker)
    await producer.close()
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


SIZES = {"W1": (5000, 500), "W3": (200, 40)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(SIZES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = SIZES[args.workload][1 if args.quick else 0]
    await fresh_database(args.url)
    conn = await asyncpg.connect(args.url)
    await Queries(AsyncpgDriver(conn)).install()
    await conn.close()
    figures = await (w1 if args.workload == "W1" else w3)(args.url, size)
    print(json.dumps({"system": "pgqueuer", "workload": args.workload, "size": size, **figures}))


if __name__ == "__main__":
    asyncio.run(main())
