"""The crash demo: a five-step run whose worker is killed with SIGKILL mid-flow.

    python examples/crash_demo.py

It starts a worker process, starts a run, kills the worker (SIGKILL) once step 3 is journaled,
starts a new worker, and shows the run finishing without repeating steps 1-3. With no
DURABLE_DATABASE_URL it uses the embedded PostgreSQL, shared by this script and its workers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import durable

app = durable.App(lease=timedelta(seconds=3))
HERE = Path(__file__).resolve().parent


def fulfil(step: str, order: str) -> str:
    """A plain (sync) step function: the engine runs it in a thread."""
    with open(os.environ["DEMO_LOG"], "a") as log:
        log.write(f"{step} {os.getpid()}\n")
    print(f"    [worker {os.getpid()}] {step} for {order}", flush=True)
    time.sleep(0.6)  # real work takes time
    return f"{step}-done"


STEPS = ["reserve-stock", "charge-card", "pack", "ship", "send-receipt"]


@app.function(name="fulfil_order")
async def fulfil_order(ctx: durable.Context, order: str) -> list[str]:
    return [await ctx.step(step, fulfil, step, order) for step in STEPS]


def start_worker(log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DEMO_LOG": str(log), "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "durable",
            "worker",
            "examples.crash_demo:app",
            "--log-level",
            "WARNING",
        ],
        env=env,
    )


async def wait_for_journal(run: durable.RunHandle[list[str]], length: int) -> None:
    while len(await run.journal()) < length:  # noqa: ASYNC110 (written by another process)
        await asyncio.sleep(0.05)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="durable-demo-") as scratch:
        log = Path(scratch) / "executions.log"
        log.touch()
        async with app:
            print(f"database: {app.database_url}")
            worker = start_worker(log)
            run = await app.start(fulfil_order, f"order-{int(time.time())}")
            print(f"started run {run.run_id}")
            await wait_for_journal(run, 3)
            worker.kill()
            worker.wait()
            print(f"\n*** killed worker {worker.pid} with SIGKILL after step 3 was journaled ***")
            print(
                f"    status: {await run.status()}, "
                f"journal: {[e.name for e in await run.journal()]}\n"
            )
            replacement = start_worker(log)
            print(
                f"started worker {replacement.pid}; it takes the run over when the lease "
                f"(3 s) runs out\n"
            )
            result = await run.result(timeout=120)
            replacement.terminate()
            replacement.wait()
            print(f"\nresult: {result}\n\njournal:")
            for entry in await run.journal():
                print(
                    f"  #{entry.position} {entry.name:<14} attempt {entry.attempt}  {entry.value}"
                )
            runs = [line.split()[0] for line in log.read_text().splitlines()]
            print("\nexecutions per step (a step interrupted by the crash runs again):")
            for step in STEPS:
                print(f"  {step:<14} {runs.count(step)}")
            repeated = [s for s in STEPS[:3] if runs.count(s) != 1]
            print("\nsteps 1-3 ran exactly once" if not repeated else f"\nREPEATED: {repeated}")
            if repeated:
                raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
