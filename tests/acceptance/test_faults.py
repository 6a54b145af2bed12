"""The engine's fault suite: real worker processes and real Postgres, under SIGKILL, a database
restart, dropped connections and skewed clocks. Nothing may be lost, duplicated or wrong.

CI runs one bounded example of each; the long soak runs more and bigger ones:

    SOAK_RUNS=1000 SOAK_EXAMPLES=10 scripts/test tests/acceptance/test_faults.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import durable
from durable import _embedded
from durable._pg import Control
from tests.acceptance.conftest import Workers, counted
from tests.conftest import embedded_base
from tests.helpers import until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

RUNS = int(os.environ.get("SOAK_RUNS", "200"))
STEPS = 10
EXAMPLES = int(os.environ.get("SOAK_EXAMPLES", "1"))
ROUNDS = 5  # of terminated connections
HELD = 2  # runs of that load held in their last step until the rounds are over
LOG = Path(os.environ.get("SOAK_LOG", os.devnull))
LONG = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.generate],  # a failing example is reported as drawn: shrinking reruns it
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Tally:
    """What a load ended as. ``excess`` counts step executions beyond one plus the crashes
    that hit the step; every field but runs, executions and reexecutions must be zero."""

    runs: int
    lost: int
    wrong: int
    duplicate_positions: int
    executions: int
    reexecutions: int
    excess: int

    def assert_clean(self) -> None:
        assert (self.lost, self.wrong, self.duplicate_positions, self.excess) == (0, 0, 0, 0), self


async def start_load(app: durable.App, prefix: str, runs: int, held: int = 0) -> list[uuid.UUID]:
    """Start ``runs`` runs of ten_steps; the first ``held`` of them wait in their last step for
    the gate `<prefix>-go` (workflows.py)."""
    handles = [
        await app.start("ten_steps", {"tag": f"{prefix}/{k}", "n": k, "held": k < held})
        for k in range(runs)
    ]
    return [h.run_id for h in handles]


async def finished(url: str, run_ids: list[uuid.UUID]) -> bool:
    conn = await asyncpg.connect(url)
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM durable.runs WHERE id = ANY($1) AND status = 'completed'",
            run_ids,
        )
    finally:
        await conn.close()
    return bool(done == len(run_ids))


async def wait_finished(url: str, run_ids: list[uuid.UUID], timeout: float = 90) -> None:
    async def check() -> bool:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            return await finished(url, run_ids)
        return False

    with contextlib.suppress(AssertionError):
        await until(check, timeout=timeout, what="every run completed")


async def tally(url: str, workers: Workers, prefix: str, killed: set[int]) -> Tally:
    conn = await asyncpg.connect(url)
    try:
        runs = await conn.fetch(
            "SELECT id, status, input, result FROM durable.runs WHERE input->>'tag' LIKE $1",
            f"{prefix}/%",
        )
        positions = await conn.fetch(
            "SELECT run_id, count(*) AS entries, count(DISTINCT position) AS distinct_positions "
            "FROM durable.journal WHERE run_id = ANY($1) GROUP BY run_id",
            [r["id"] for r in runs],
        )
    finally:
        await conn.close()
    lost = sum(1 for r in runs if r["status"] != "completed")
    wrong = 0
    for r in runs:
        if r["status"] == "completed":
            n = json.loads(r["input"])["n"]
            wrong += json.loads(r["result"]) != [i * n for i in range(STEPS)]
    duplicates = sum(p["entries"] - p["distinct_positions"] for p in positions)
    duplicates += sum(1 for p in positions if p["entries"] != STEPS)
    executors: dict[tuple[str, str], list[int]] = defaultdict(list)
    for line in workers.lines(f"{prefix}-executions"):
        tag, step, pid = line.split()
        executors[(tag, step)].append(int(pid))
    executions = sum(len(p) for p in executors.values())
    excess = sum(
        max(0, len(pids) - 1 - len({p for p in pids if p in killed})) for pids in executors.values()
    )
    return Tally(
        runs=len(runs),
        lost=lost + (len(runs) != len({r["id"] for r in runs})),
        wrong=wrong,
        duplicate_positions=duplicates,
        executions=executions,
        reexecutions=executions - len(executors),
        excess=excess,
    )


def report(test: str, figures: dict[str, object]) -> None:
    """Append a test's figures to $SOAK_LOG (the soak's record), as one JSON line."""
    if Path(os.devnull) != LOG:
        with LOG.open("a") as out:
            out.write(json.dumps({"test": test, "at": datetime.now().isoformat(), **figures}))
            out.write("\n")


kill_schedules = st.lists(
    st.tuples(st.integers(min_value=50, max_value=RUNS * STEPS - 50), st.integers(0, 2)),
    min_size=2,
    max_size=4,
    unique_by=lambda kill: kill[0],
)


@LONG
@given(kills=kill_schedules)
async def test_runs_under_random_sigkills_complete_exactly_once_with_the_right_result(
    workers: Workers, database_url: str, kills: list[tuple[int, int]]
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    pool = [workers.start(TEST_LEASE_SECONDS="4", concurrency=8) for _ in range(3)]
    killed: set[int] = set()
    async with durable.App(database_url) as app:
        run_ids = await start_load(app, prefix, RUNS)
        for threshold, victim in sorted(kills):
            await until(
                counted(workers, f"{prefix}-executions", threshold),
                timeout=120,
                what=f"{threshold} step executions",
            )
            process = pool[victim]
            process.kill()  # SIGKILL at a moment hypothesis chose
            process.wait()
            killed.add(process.pid)
            pool[victim] = workers.start(TEST_LEASE_SECONDS="4", concurrency=8)
        await wait_finished(database_url, run_ids)
    for process in pool:  # hypothesis runs the next example with the same fixtures
        process.terminate()
        process.wait(timeout=30)
    figures = await tally(database_url, workers, prefix, killed)
    report("sigkill", {"kills": len(killed), "workers": 3, **vars(figures)})
    figures.assert_clean()
    assert figures.runs == RUNS


@contextlib.asynccontextmanager
async def own_server() -> AsyncIterator[tuple[str, Control]]:
    """An embedded PostgreSQL of this test's own, so that restarting it disturbs no one; it
    is stopped and its directory removed afterwards."""
    with embedded_base("durable-restart-") as base:
        control = _embedded.control_for(base)
        server = await asyncio.to_thread(_embedded.ensure_running, control, user_pid=os.getpid())
        try:
            yield server.dsn, control
        finally:
            await asyncio.to_thread(_embedded.release, control, os.getpid())


async def restart_under_load(dsn: str, control: Control, workers: Workers) -> Tally:
    """Two workers of concurrency 8 run the load on ``dsn``'s server, which is stopped and
    started again a third of the way through; what the load came to. The workers stop after."""
    try:
        for _ in range(2):
            workers.start(concurrency=8)
        async with durable.App(dsn) as app:
            run_ids = await start_load(app, "restart", RUNS)
            await until(
                counted(workers, "restart-executions", RUNS * STEPS // 3),
                timeout=120,
                what="a third of the steps executed",
            )
            await asyncio.to_thread(control.stop)
            await asyncio.to_thread(control.start)
            await wait_finished(dsn, run_ids)
        return await tally(dsn, workers, "restart", killed=set())
    finally:
        workers.stop_all()


async def test_runs_survive_a_restart_of_the_database_server(tmp_path: Path) -> None:
    async with own_server() as (dsn, control):
        figures = await restart_under_load(dsn, control, Workers(dsn, tmp_path))
    report("database restart", {"restarts": 1, **vars(figures)})
    assert (figures.lost, figures.wrong, figures.duplicate_positions) == (0, 0, 0), figures
    # A step whose journal write died with the server runs again, once per restart at most.
    assert figures.reexecutions <= 2 * 8, figures


async def terminate_workers_connections(admin: asyncpg.Connection) -> int:
    """Terminate every client connection to the test's database but ``admin``'s; returns how
    many were terminated. With the test's own app closed, they are the workers'."""
    terminated: int = await admin.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"
    )
    return terminated


async def test_runs_survive_connections_terminated_again_and_again(
    workers: Workers, database_url: str
) -> None:
    """Five times during the load, every connection the workers have is terminated: no run is
    lost, wrong or journaled twice, and a step runs again at most once per round and slot.

    No round can come after the load has ended: the load's first runs wait in their last step
    for a gate that opens only after the last round. Between rounds the load makes progress it
    is sure to make: every step executes at least once while the gate is shut, so RUNS * STEPS
    executions come whatever the drops make run again, and no wait asks for more."""
    for _ in range(2):
        workers.start(concurrency=8)
    async with durable.App(database_url) as app:
        run_ids = await start_load(app, "dropped", RUNS, held=HELD)
    unfinished: list[int] = []  # runs not completed, counted after each round
    admin = await asyncpg.connect(database_url)
    try:
        for _ in range(ROUNDS):
            floor = min(workers.count("dropped-executions") + RUNS, RUNS * STEPS)
            await until(
                counted(workers, "dropped-executions", floor),
                timeout=60,
                what=f"{floor} step executions",
            )
            # A worker between connections has none to terminate: it is back at once (its
            # LISTEN connection reconnects without a pause).
            await until(
                lambda: terminate_workers_connections(admin),
                timeout=30,
                what="a worker's connection to terminate",
            )
            unfinished.append(
                await admin.fetchval(
                    "SELECT count(*) FROM durable.runs WHERE status <> 'completed'"
                )
            )
    finally:
        await admin.close()
    workers.open_gate("dropped-go")
    await wait_finished(database_url, run_ids)
    figures = await tally(database_url, workers, "dropped", killed=set())
    report("terminated connections", {"rounds": ROUNDS, "unfinished": unfinished, **vars(figures)})
    # A run never leaves "completed", so each count held at its round's moment too: every
    # round came before the load had ended.
    assert min(unfinished) >= HELD, unfinished
    assert (figures.lost, figures.wrong, figures.duplicate_positions) == (0, 0, 0), figures
    assert figures.runs == RUNS
    assert figures.reexecutions <= ROUNDS * 2 * 8, figures


async def test_workers_with_skewed_clocks_neither_wake_timers_early_nor_steal_leases(
    workers: Workers, database_url: str
) -> None:
    for skew in ("3600", "-3600"):  # one worker an hour ahead, one an hour behind
        workers.start(module="tests.acceptance.skewed", CLOCK_SKEW_SECONDS=skew)
    async with durable.App(database_url) as app:
        nappers = [await app.start("napper", f"nap-{k}") for k in range(6)]
        run_ids = await start_load(app, "skew", 40)
        woke = [await n.result(timeout=120) for n in nappers]
        sleeps = [next(e for e in await n.journal() if e.kind == "sleep") for n in nappers]
        await wait_finished(database_url, run_ids)
    figures = await tally(database_url, workers, "skew", killed=set())
    report("skewed clocks", {"skews": [3600, -3600], **vars(figures)})
    assert (figures.lost, figures.wrong, figures.duplicate_positions) == (0, 0, 0), figures
    assert figures.reexecutions == 0, "a lease was taken from a live worker"
    for at, sleep in zip(woke, sleeps, strict=True):
        wake_at = datetime.fromisoformat(sleep.value["wake_at"]).timestamp()
        assert at >= wake_at, "a timer fired early on a skewed worker"
        assert at - wake_at < 2.0, f"a timer fired {at - wake_at:.2f}s late"


async def test_a_step_that_returned_before_a_kill_never_runs_again(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """Under group commit, with fifty runs sharing statements: any step whose successor had
    started in the killed worker had returned there, so it must have run exactly once."""
    victim = workers.start(concurrency=50)
    async with durable.App(database_url) as app:
        run_ids = await start_load(app, "returned", 100)
        await until(counted(workers, "returned-executions", 300), timeout=120)
        victim.kill()
        victim.wait()
        workers.start(concurrency=50)
        await wait_finished(database_url, run_ids)
    executors: dict[tuple[str, int], list[int]] = defaultdict(list)
    for line in workers.lines("returned-executions"):
        tag, step, pid = line.split()
        executors[(tag, int(step))].append(int(pid))
    returned = [
        (tag, step)
        for (tag, step), pids in executors.items()
        if step + 1 < STEPS and victim.pid in executors.get((tag, step + 1), [])
    ]
    assert returned, "the kill came before any step returned"
    rerun = [(tag, step) for tag, step in returned if len(executors[(tag, step)]) != 1]
    assert rerun == [], f"steps that had returned ran again: {rerun[:5]}"
    statements, entries = await db.fetchrow(
        "SELECT count(DISTINCT xmin::text), count(*) FROM durable.journal"
    )
    assert statements < entries, "no statement carried more than one entry"
    figures = await tally(database_url, workers, "returned", killed={victim.pid})
    figures.assert_clean()
