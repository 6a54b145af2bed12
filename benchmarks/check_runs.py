"""How long ``durable check`` takes on a database with many unfinished runs.

    python benchmarks/check_runs.py --url postgresql://postgres@127.0.0.1:5432/check_bench \\
        [--runs 100000]

Drops and creates the database the URL names, starts ``--runs`` runs of a small approval flow
(a step, then a wait for an event) and drives them with a worker until every one waits, then
times ``durable check benchmarks.check_runs:app`` in a process of its own, twice: on the same
code (every run replays: exit 0) and on code that renamed the step without a patch (every run
fails: exit 1, the worst case for the report). Prints one JSON line per check: wall seconds,
the check process's CPU seconds (user + system) and peak memory, and runs per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import durable

ROOT = Path(__file__).resolve().parents[1]
RENAMED = os.environ.get("CHECK_BENCH_RENAMED") == "1"

app = durable.App(pool_size=20)


async def submit(n: int) -> int:
    return n


@app.function(name="approval")
async def approval(ctx: durable.Context, n: int) -> bool:
    await ctx.step("file" if RENAMED else "submit", submit, n)
    decision: bool = await ctx.wait_for_event("decision", key=str(n))
    return decision


async def _recreate(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def _fill(url: str, runs: int) -> float:
    """Start ``runs`` runs and drive them until each waits; returns the seconds it took."""
    app.configure(database_url=url)
    started = time.perf_counter()
    async with app:
        worker = asyncio.create_task(app.run_worker(concurrency=100))
        for first in range(0, runs, 1000):
            await app.start_many(approval, list(range(first, min(first + 1000, runs))))
        conn = await asyncpg.connect(url)
        try:
            count = "SELECT count(*) FROM durable.runs WHERE status = 'suspended'"
            while await conn.fetchval(count) < runs:  # noqa: ASYNC110 (rows, not a task)
                await asyncio.sleep(1)
        finally:
            await conn.close()
        app.stop_workers()
        await worker
    return time.perf_counter() - started


def _check(url: str, renamed: bool) -> dict[str, object]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "durable",
            "--database-url",
            url,
            "check",
            "benchmarks.check_runs:app",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CHECK_BENCH_RENAMED": "1" if renamed else "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "code": "renamed step, no patch" if renamed else "unchanged",
        "exit": done.returncode,
        "first_line": done.stdout.splitlines()[0] if done.stdout else done.stderr.strip(),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the database to create and fill")
    parser.add_argument("--runs", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(_recreate(args.url))
    filled = asyncio.run(_fill(args.url, args.runs))
    print(json.dumps({"runs": args.runs, "fill_s": round(filled, 1)}), flush=True)
    for renamed in (False, True):
        result = _check(args.url, renamed)
        result["runs_per_s"] = round(args.runs / float(result["wall_s"]))  # type: ignore[arg-type]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
