"""durable.testing on real Postgres: the virtual clock moves the database's time, and a run
exported with `durable runs export` replays against the current code."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

import durable
from durable import _cli
from durable.testing import RecordedRun, Send, Simulation, crash_at_every_point, replay
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres

app = durable.App("postgresql://unused")


def double(n: int) -> int:
    return 2 * n


@app.function(name="weekly")
async def weekly(ctx: durable.Context, n: int) -> int:
    first = await ctx.step("double", double, n)
    await ctx.sleep(timedelta(days=7))
    approved = await ctx.wait_for_event("approved", key=str(n), timeout=timedelta(days=1))
    return first + (1 if approved else 0)


async def test_a_simulation_on_postgres_sleeps_a_week_on_the_virtual_clock(
    database_url: str,
) -> None:
    event = Send("approved", True, key="3", at=timedelta(days=7, hours=2))
    async with Simulation(app, database_url=database_url) as sim:
        outcome = await sim.run(weekly, 3, events=[event])
    assert (outcome.status, outcome.result) == ("completed", 7)
    assert outcome.elapsed == timedelta(days=7, hours=2)
    assert [e.kind for e in outcome.journal] == ["step", "sleep", "event"]


async def test_the_crash_check_passes_on_postgres(database_url: str) -> None:
    report = await crash_at_every_point(app, weekly, 2, database_url=database_url)
    assert report.baseline.result == 4  # no approval: the wait times out after a day
    assert len(report.points) == 8


async def test_an_exported_run_replays_and_drift_is_reported(
    database_url: str, tmp_path: Path
) -> None:
    live = make_app(database_url)

    @live.function(name="greet")
    async def greet(ctx: durable.Context, name: str) -> str:
        hello = await ctx.step("hello", str.upper, name)
        return f"{hello}!"

    async with live, running_worker(live):
        handle = await live.start(greet, "ada")
        assert await handle.result(timeout=20) == "ADA!"
        await until(lambda: status_is(handle, "completed"))
    path = tmp_path / "run.json"
    argv = ["--database-url", database_url, "runs", "export", str(handle.run_id), "-o", str(path)]
    code = await asyncio.to_thread(_cli.main, argv)
    assert code == 0
    recorded = RecordedRun.from_json(path.read_text())
    assert json.loads(path.read_text())["journal"][0]["name"] == "hello"
    assert (recorded.status, recorded.result) == ("completed", "ADA!")
    assert (await replay(live, recorded)).replayed == 1

    redeployed = durable.App("postgresql://unused")

    @redeployed.function(name="greet")
    async def greet_v2(ctx: durable.Context, name: str) -> str:
        hello = await ctx.step("hello", str.upper, name)
        return f"{hello}?"

    with pytest.raises(durable.NonDeterminismError, match="result"):
        await replay(redeployed, recorded)
