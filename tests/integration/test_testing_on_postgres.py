"""durable.testing's databases: given a URL, a simulation creates its own database on that
server (the named one is left untouched) and moves its clock; the databases are dropped when
the process exits, those of dead processes swept; the embedded server is the default; a run
exported with `durable runs export` replays against the current code."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

import durable
from durable import _cli, _embedded, _pg
from durable.testing import RecordedRun, Send, Simulation, _databases, crash_at_every_point, replay
from tests.conftest import embedded_base
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


ROOT = Path(__file__).resolve().parents[2]
# A process that simulates once and exits (normally, or at once with os._exit: as if killed).
SIMULATE_ONCE = """
import asyncio, os, sys
import durable
from durable.testing import Simulation

app = durable.App("postgresql://unused")

@app.function(name="hello")
async def hello(ctx: durable.Context) -> str:
    return await ctx.step("hi", str, "hi")

print(asyncio.run(Simulation(app).run(hello)).result, flush=True)
if sys.argv[1] == "killed":
    os._exit(0)
"""


async def test_a_simulation_on_postgres_sleeps_a_week_on_the_virtual_clock(
    database_url: str, db: asyncpg.Connection
) -> None:
    event = Send("approved", True, key="3", at=timedelta(days=7, hours=2))
    async with Simulation(app, database_url=database_url) as sim:
        outcome = await sim.run(weekly, 3, events=[event])
    assert (outcome.status, outcome.result) == ("completed", 7)
    assert outcome.elapsed == timedelta(days=7, hours=2)
    assert [e.kind for e in outcome.journal] == ["step", "sleep", "event"]
    # It ran in a database of its own beside the one the URL names, which is left untouched.
    assert await db.fetchval("SELECT count(*) FROM durable.runs") == 0


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


@pytest.fixture
def restricted_role(server_url: str) -> Iterator[str]:
    """A role that may log in but not create databases (cluster-wide: dropped afterwards)."""
    role = f"durable_no_createdb_{os.getpid()}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE ROLE "{role}" NOCREATEDB'))
    try:
        yield role
    finally:
        asyncio.run(admin(f'DROP ROLE IF EXISTS "{role}"'))


async def test_a_role_that_may_not_create_databases_is_told_what_to_do(
    server_url: str, restricted_role: str
) -> None:
    # The connection's role setting makes the session act as that role.
    separator = "&" if "?" in server_url else "?"
    url = f"{server_url}{separator}role={restricted_role}"
    with pytest.raises(durable.ConfigurationError, match="grant the role CREATEDB"):
        await Simulation(app, database_url=url).run(weekly, 1)


async def _simulate_in_a_process(how: str, **env: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIMULATE_ONCE,
        how,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert (process.returncode, out.decode().strip()) == (0, "hi")
    return process.pid


async def _simulation_databases(url: str, pid: int) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            f"durable\\_sim\\_%\\_{pid}\\_%",
        )
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


async def test_simulation_databases_go_when_their_process_exits_or_the_next_one_starts(
    server_url: str,
) -> None:
    server = {_databases.ENVIRONMENT: server_url}
    killed = await _simulate_in_a_process("killed", **server)
    assert len(await _simulation_databases(server_url, killed)) == 1  # left behind
    survivor = await _simulate_in_a_process("exits", **server)
    assert await _simulation_databases(server_url, survivor) == []  # dropped at its exit
    assert await _simulation_databases(server_url, killed) == []  # swept by it at its start


@pytest.mark.slow
async def test_with_no_url_a_simulation_runs_on_the_embedded_server() -> None:
    with embedded_base("durable-test-sim-") as base:
        server = await asyncio.to_thread(_embedded.pin, base)  # kept up after the process
        try:
            pid = await _simulate_in_a_process("exits", DURABLE_DATA_DIR=str(base))
            url = _pg.dsn(server.socket_dir, "postgres")
            assert await _simulation_databases(url, pid) == []
        finally:
            await asyncio.to_thread(_embedded.unpin, base)


async def test_urls_that_name_other_databases_of_one_server_share_its_pool(
    server_url: str, database_url: str
) -> None:
    first = await _databases.lease(server_url)
    first.release()
    again = await _databases.lease(database_url)  # the same server, another database named
    try:
        assert again.name == first.name  # handed back and leased again: not swept
        assert not again.fresh  # so the simulation empties it first
    finally:
        again.release()
