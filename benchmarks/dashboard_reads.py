"""How long the dashboard's server takes to answer over a database of a million runs.

    python benchmarks/dashboard_reads.py --url postgresql://postgres@127.0.0.1:5432/dash_bench \\
        [--runs 1000000] [--repeat 20]

Drops and creates the database the URL names and fills it with ``--runs`` runs written
straight into durable.runs (20 functions, every status, created over 30 days, a tenant tag on
one run in ten, an idempotency key on each), then runs one run with a 1,000-step journal. It
then asks the dashboard's ASGI application, in process, for each page ``--repeat`` times and
prints one JSON line per page: the median and the 95th percentile of the server time (the
request handled, rendered and returned; no network, no browser) in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import durable  # noqa: E402
from durable.dashboard import asgi  # noqa: E402

FILL = """
INSERT INTO durable.runs (id, function, input, status, idempotency_key, attempt, created_at,
                          updated_at, started_at, finished_at, tags, versions, queue)
SELECT gen_random_uuid(), 'function_' || (i % 20), jsonb_build_object('n', i),
       (ARRAY['completed', 'completed', 'completed', 'failed', 'cancelled', 'suspended',
              'pending'])[1 + i % 7],
       'order-' || i, 1, now() - make_interval(secs => i * 2.592),
       now() - make_interval(secs => i * 2.592), now() - make_interval(secs => i * 2.592),
       CASE WHEN i % 7 < 5 THEN now() - make_interval(secs => i * 2.592) END,
       CASE WHEN i % 10 = 0 THEN jsonb_build_object('tenant', 'tenant-' || (i % 1000))
            ELSE '{}' END,
       ARRAY['v1'], 'default'
  FROM generate_series($1::bigint, $2::bigint) AS i
"""


async def _recreate(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


app = durable.App(pool_size=4)


async def thousand_steps(n: int) -> int:
    return n


@app.function(name="long_journal")
async def long_journal(ctx: durable.Context) -> int:
    total = 0
    for i in range(1000):
        total += await ctx.step(f"step-{i}", thousand_steps, i)
    return total


async def _fill(url: str, runs: int) -> tuple[float, str]:
    began = time.perf_counter()
    app.configure(database_url=url)
    async with app:
        conn = await asyncpg.connect(url)
        try:
            for first in range(0, runs, 100_000):
                await conn.execute(FILL, first, min(first + 100_000, runs) - 1)
            await conn.execute("VACUUM ANALYZE durable.runs")
        finally:
            await conn.close()
        worker = asyncio.create_task(app.run_worker(concurrency=10))
        handle = await app.start(long_journal)
        await handle.result(timeout=600)
        app.stop_workers()
        await worker
    return time.perf_counter() - began, str(handle.run_id)


async def _measure(url: str, run_id: str, repeat: int) -> list[dict[str, object]]:
    pages = {
        "runs list (newest 50, counts by status)": "/",
        "runs list, status failed": "/?status=failed",
        "runs list, tag tenant=tenant-500": "/?tag=tenant%3Dtenant-500",
        "runs list, search an idempotency key": "/?q=order-777777",
        "runs list, page 100 (keyset)": None,
        "a run with a 1,000-entry journal": f"/runs/{run_id}",
    }
    app.configure(database_url=url)
    results = []
    async with app:
        site = asgi(app)
        transport = httpx.ASGITransport(app=site)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            deep = "/"
            for _ in range(100):  # follow "older runs" links to the hundredth page
                page = (await client.get(deep)).text
                marker = 'rel="next"'
                at = page.find(marker)
                deep = "/" + page[page.rfind('href="', 0, at) + 6 : page.rfind('"', 0, at)]
                deep = deep.replace("&amp;", "&")
            pages["runs list, page 100 (keyset)"] = deep
            for label, path in pages.items():
                assert path is not None
                times = []
                for _ in range(repeat):
                    began = time.perf_counter()
                    response = await client.get(path)
                    times.append((time.perf_counter() - began) * 1000)
                    assert response.status_code == 200, (label, response.status_code)
                times.sort()
                results.append(
                    {
                        "page": label,
                        "median_ms": round(statistics.median(times), 1),
                        "p95_ms": round(times[int(len(times) * 0.95) - 1], 1),
                        "bytes": len(response.content),
                    }
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the database to create and fill")
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(_recreate(args.url))
    filled, run_id = asyncio.run(_fill(args.url, args.runs))
    print(json.dumps({"runs": args.runs, "fill_s": round(filled, 1)}), flush=True)
    for result in asyncio.run(_measure(args.url, run_id, args.repeat)):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
