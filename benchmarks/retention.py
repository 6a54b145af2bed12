"""What retention's cleanup costs a running load: W2 (five-step workflows, drained by one worker
of concurrency 100) with and without a cleanup that drops a day of 1,000,000 journal rows.

    python benchmarks/retention.py --url postgresql://postgres@127.0.0.1:5432/retention_bench \\
        [--rounds 3] [--workflows 10000] [--day-runs 200000]

Drops and creates the database, then per round: fills a segment of the app's retention class
(1 day) with --day-runs finished five-step runs and their journal (5 rows each: 1,000,000 for
the default), written by SQL as the worker would have written them, and ages it (closed two days
ago, so due); then drains two batches of --workflows W2 workflows, each started with one
start_many call and timed from the start to the last completion: one alone, one with a cleanup
pass (``app.clean_up``) started when a tenth of the batch has completed. The order alternates
between rounds, so that a drift of the machine does not favour either. Prints one JSON line per
round: W2's workflows/s alone and with the cleanup, their ratio, how long the pass took, what it
dropped, and the worker process's CPU time per workflow (microseconds) in each batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

import durable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fleet import _recreate

app = durable.App(pool_size=10, retention=timedelta(days=1))


async def small(i: int) -> dict[str, int]:
    return {"i": i}


@app.function(name="five_steps")
async def five_steps(ctx: durable.Context, n: int) -> int:
    for i in range(5):
        await ctx.step(f"s{i}", small, i)
    return n


# A segment of its own, filled as W2's worker would have, then closed two days ago.
OPEN = "SELECT durable.add_segment('1 day')"
FILL = """
WITH runs AS (
    INSERT INTO durable.runs (id, function, input, status, attempt, result, created_at,
                              started_at, updated_at, finished_at, versions, queue, segment)
    SELECT gen_random_uuid(), 'five_steps', to_jsonb(i), 'completed', 1, to_jsonb(i),
           now() - interval '3 days', now() - interval '3 days', now() - interval '3 days',
           now() - interval '3 days', '{v}', 'default', $2
      FROM generate_series(1, $1) i
    RETURNING id, segment
)
INSERT INTO durable.journal (run_id, position, kind, name, value, attempt, created_at,
                             started_at, duration_ms, segment)
SELECT r.id, p::text, 'step', 's' || p, jsonb_build_object('i', p), 1,
       now() - interval '3 days', now() - interval '3 days', 0.01, r.segment
  FROM runs r, generate_series(1, 5) p
"""

AGE = """
UPDATE durable.segments
   SET opened_at = now() - interval '3 days', closed_at = now() - interval '2 days'
 WHERE id = $1
"""

DONE = "SELECT count(*) FROM durable.runs WHERE status = 'completed' AND segment = $1"


async def _batch(
    conn: asyncpg.Connection[Any], workflows: int, with_cleanup: bool
) -> dict[str, Any]:
    segment = await conn.fetchval("SELECT durable.open_segment('1 day')")
    before = await conn.fetchval(DONE, segment)
    cpu = time.process_time()
    began = time.perf_counter()
    await app.start_many(five_steps, range(workflows))
    cleanup: dict[str, Any] = {}
    if with_cleanup:
        while await conn.fetchval(DONE, segment) < before + workflows // 10:  # noqa: ASYNC110 (rows, not a task)
            await asyncio.sleep(0.005)
        at = time.perf_counter()
        done = await app.clean_up()
        cleanup = {
            "cleanup_s": round(time.perf_counter() - at, 3),
            "dropped": done.dropped if done else None,
        }
    while await conn.fetchval(DONE, segment) < before + workflows:  # noqa: ASYNC110 (rows, not a task)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - began
    return {
        "wf_per_s": workflows / elapsed,
        "cpu_us_per_wf": (time.process_time() - cpu) / workflows * 1e6,
        **cleanup,
    }


async def _round(url: str, index: int, workflows: int, day_runs: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        filled = time.perf_counter()
        aged = await conn.fetchval(OPEN)
        await conn.execute(FILL, day_runs, aged)
        await conn.fetchval(OPEN)
        await conn.execute(AGE, aged)
        rows = await conn.fetchval("SELECT count(*) FROM durable.journal WHERE segment = $1", aged)
        filled = time.perf_counter() - filled
        await conn.execute("VACUUM ANALYZE durable.runs, durable.journal")
        order = (False, True) if index % 2 == 0 else (True, False)
        batches = {flag: await _batch(conn, workflows, flag) for flag in order}
    finally:
        await conn.close()
    alone, cleaned = batches[False], batches[True]
    return {
        "round": index + 1,
        "journal_rows_dropped": rows,
        "fill_s": round(filled, 1),
        "w2_alone_wf_per_s": round(alone["wf_per_s"]),
        "w2_with_cleanup_wf_per_s": round(cleaned["wf_per_s"]),
        "ratio": round(cleaned["wf_per_s"] / alone["wf_per_s"], 3),
        "cleanup_s": cleaned["cleanup_s"],
        "dropped": cleaned["dropped"],
        "cpu_us_per_wf_alone": round(alone["cpu_us_per_wf"]),
        "cpu_us_per_wf_with_cleanup": round(cleaned["cpu_us_per_wf"]),
    }


async def _run(url: str, rounds: int, workflows: int, day_runs: int) -> None:
    await _recreate(url)
    app.configure(database_url=url)
    async with app:
        worker = asyncio.create_task(app.run_worker(concurrency=100))
        try:
            for index in range(rounds):
                result = await _round(url, index, workflows, day_runs)
                print(json.dumps(result), flush=True)
        finally:
            app.stop_workers()
            await worker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the database to create and fill")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--day-runs", type=int, default=200_000)
    args = parser.parse_args()
    asyncio.run(_run(args.url, args.rounds, args.workflows, args.day_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
