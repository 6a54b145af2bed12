"""Stopping workers: SIGTERM never lets a step run in two processes at once, a second SIGTERM
exits at once, and a worker still waiting for its database stops when told to."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta

import asyncpg
import pytest

import durable
from tests.acceptance.conftest import Workers, counted
from tests.helpers import until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

APP = "tests.acceptance.stopping_app:app"
LEASE = timedelta(seconds=2)  # the workers' lease ($TEST_LEASE_SECONDS, stopping_app.py)


async def held_by(
    db: asyncpg.Connection, run: durable.RunHandle[int], owner: str, beyond: datetime
) -> bool:
    """Whether ``owner`` still holds the run with a lease renewed past ``beyond``."""
    row = await db.fetchrow(
        "SELECT status, lease_owner, available_at FROM durable.runs WHERE id = $1", run.run_id
    )
    assert row is not None
    assert (row["status"], row["lease_owner"]) == ("running", owner), dict(row)
    return bool(row["available_at"] > beyond)


async def test_sigterm_during_a_sync_step_keeps_the_run_until_the_step_returns(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """The step's thread outlives the grace period: the run stays with its worker, lease
    renewed, until the thread returns; only then is it handed back and run by the other
    worker. The two executions of the step never overlap."""
    first = workers.start(app=APP, args=("--shutdown-grace", "1"))
    async with durable.App(database_url) as app:
        run = await app.start("sync_step", "t")
        await until(counted(workers, "t-step"), timeout=30, what="the step started")
        owner = await db.fetchval("SELECT lease_owner FROM durable.runs WHERE id = $1", run.run_id)
        second = workers.start(app=APP)
        first.send_signal(signal.SIGTERM)
        await until(
            lambda: "still running in threads" in workers.log_of(first),
            timeout=30,
            what="the grace period over, the step still running",
        )
        expiry = await db.fetchval(
            "SELECT available_at FROM durable.runs WHERE id = $1", run.run_id
        )
        await until(
            lambda: held_by(db, run, owner, expiry + 2 * LEASE),
            timeout=30,
            what="the lease renewed for two more leases",
        )
        assert workers.lines("t-step") == [f"start {first.pid}"], "started beside the thread"
        workers.open_gate("t-go")
        assert await run.result(timeout=60) == second.pid
        assert first.wait(timeout=30) == 0
    assert workers.lines("t-step") == [
        f"start {first.pid}",
        f"end {first.pid}",
        f"start {second.pid}",
        f"end {second.pid}",
    ]


async def test_a_second_sigterm_exits_at_once_and_the_run_is_resumed_elsewhere(
    workers: Workers, database_url: str
) -> None:
    first = workers.start(app=APP, args=("--shutdown-grace", "60"))
    async with durable.App(database_url) as app:
        run = await app.start("sync_step", "u")
        await until(counted(workers, "u-step"), timeout=30, what="the step started")
        first.send_signal(signal.SIGTERM)
        await until(lambda: "stopping" in workers.log_of(first), timeout=30, what="stopping")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 128 + signal.SIGTERM
        assert "exiting at once" in workers.log_of(first)
        second = workers.start(app=APP)
        workers.open_gate("u-go")
        assert await run.result(timeout=60) == second.pid
    assert workers.lines("u-step") == [
        f"start {first.pid}",
        f"start {second.pid}",
        f"end {second.pid}",
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_worker_waiting_for_an_unreachable_database_stops_when_told(
    workers: Workers, sig: signal.Signals
) -> None:
    waiting = workers.start(app=APP, DURABLE_DATABASE_URL="postgresql://u@127.0.0.1:1/x")
    await until(
        lambda: "unreachable" in workers.log_of(waiting), timeout=30, what="retrying to connect"
    )
    waiting.send_signal(sig)
    assert waiting.wait(timeout=20) == 0
