"""Throughput of a fleet of worker processes on one database, and proof that each run is claimed
once.

    python benchmarks/fleet.py --url postgresql://postgres@127.0.0.1:5432/fleet_bench \\
        [--processes 1,2,4,8] [--runs 5000] [--workflows 1000]

For each fleet size N: drops and creates the database, starts N `durable worker` processes
(concurrency 100 each, so the budget grows with the fleet) and waits until each is serving,
then starts W1 (--runs no-op runs) and, once they are done, W2 (--workflows five-step
workflows), each with one start_many call, and times each from the start to the last
completion. Then it checks the claims: every run completed at attempt 1 (a run claimed twice
would have attempt 2), and every step of every workflow was journaled once, at attempt 1.
Prints one JSON line per fleet size: runs/s, workflows/s and the claim check. On this
project's 2-core machine more processes share the same two cores with the database: the curve
shows what a fleet costs, not what more machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import durable

ROOT = Path(__file__).resolve().parents[1]

app = durable.App(pool_size=4)


async def small(i: int) -> dict[str, int]:
    return {"i": i}


@app.function(name="noop")
async def noop(ctx: durable.Context, n: int) -> int:
    return n


@app.function(name="five_steps")
async def five_steps(ctx: durable.Context, n: int) -> int:
    for i in range(5):
        await ctx.step(f"s{i}", small, i)
    return n


async def _recreate(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


def _workers(url: str, count: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "DURABLE_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    started = []
    for i in range(count):
        with (logs / f"fleet-{count}-worker-{i}.log").open("wb") as out:
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "durable",
                        "worker",
                        "benchmarks.fleet:app",
                        "--concurrency",
                        "100",
                        "--log-level",
                        "WARNING",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return started


async def _until(conn: asyncpg.Connection[Any], query: str, target: int) -> float:
    while await conn.fetchval(query) < target:  # noqa: ASYNC110 (rows, not a task)
        await asyncio.sleep(0.01)
    return time.perf_counter()


LISTENING = """
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND query LIKE 'LISTEN%'
"""


async def _one_fleet(
    url: str, processes: int, runs: int, workflows: int, logs: Path
) -> dict[str, Any]:
    await _recreate(url)
    app.configure(database_url=url)
    async with app:  # migrates before the workers start
        fleet = _workers(url, processes, logs)
        conn = await asyncpg.connect(url)
        try:
            # Every worker connected, past its start, listening (its LISTEN connection is the
            # last it opens before it claims).
            await _until(conn, LISTENING, processes + 1)  # and this app's own listener
            done = "SELECT count(*) FROM durable.runs WHERE status = 'completed'"
            began = time.perf_counter()
            await app.start_many(noop, range(runs))
            w1 = runs / (await _until(conn, done, runs) - began)
            began = time.perf_counter()
            await app.start_many(five_steps, range(workflows))
            w2 = workflows / (await _until(conn, done, runs + workflows) - began)
            twice = await conn.fetchval("SELECT count(*) FROM durable.runs WHERE attempt <> 1")
            steps = await conn.fetchval(
                "SELECT count(*) FROM durable.journal WHERE kind = 'step' AND attempt = 1"
            )
        finally:
            await conn.close()
            for worker in fleet:
                worker.terminate()
            for worker in fleet:
                worker.wait(timeout=60)
    return {
        "processes": processes,
        "w1_runs_per_s": round(w1),
        "w2_workflows_per_s": round(w2),
        "runs_claimed_more_than_once": twice,
        "steps_journaled_once_at_attempt_1": steps == 5 * workflows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the database to create and fill")
    parser.add_argument("--processes", default="1,2,4,8")
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--workflows", type=int, default=1000)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="durable-fleet-"))
    for count in (int(n) for n in args.processes.split(",")):
        result = asyncio.run(_one_fleet(args.url, count, args.runs, args.workflows, logs))
        print(json.dumps(result), flush=True)
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
