"""Real worker processes, killed with SIGKILL, stopped with SIGSTOP, replaced by new code."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime

import asyncpg
import pytest

import durable
from tests.acceptance.conftest import Workers, counted
from tests.helpers import status_is, until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]


async def test_a_run_killed_after_step_3_finishes_with_steps_1_to_3_run_once(
    workers: Workers, database_url: str
) -> None:
    first = workers.start()
    async with durable.App(database_url) as app:
        run = await app.start("five_steps", "a")
        await until(counted(workers, "a-step-4"), timeout=30, what="step 4 started")
        first.kill()  # SIGKILL, mid step 4: steps 1-3 are journaled
        first.wait()
        assert [e.name for e in await run.journal()] == ["step-1", "step-2", "step-3"]
        workers.open_gate("a-go")
        second = workers.start()
        assert await run.result(timeout=60) == [10, 20, 30, 40, 50]
    assert [workers.count(f"a-step-{i}") for i in range(1, 6)] == [1, 1, 1, 2, 1]
    assert workers.lines("a-step-5") == [str(second.pid)]


async def test_a_two_second_sleep_survives_a_worker_restart_never_early_and_promptly(
    workers: Workers, database_url: str
) -> None:
    first = workers.start()
    async with durable.App(database_url) as app:
        run = await app.start("napper", "n")
        await until(lambda: status_is(run, "suspended"), timeout=30, what="asleep")
        first.kill()
        first.wait()
        second = workers.start()
        await until(lambda: "serving" in workers.log_of(second), timeout=30, what="a new worker")
        serving = time.time()  # no earlier than the new worker began to claim
        woke = await run.result(timeout=60)
        [sleep] = [e for e in await run.journal() if e.kind == "sleep"]
    wake_at = datetime.fromisoformat(sleep.value["wake_at"]).timestamp()
    assert woke >= wake_at, "the sleep fired early"
    # Promptly once it could fire: at its wake time, or when the new worker was up if that
    # came later (on a busy machine a worker can take longer than the sleep to start).
    could = max(wake_at, serving)
    assert woke - could < 1.5, f"the sleep fired {woke - could:.2f}s after it could"


async def test_a_stopped_worker_past_its_lease_cannot_append_after_a_takeover(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    zombie = workers.start(TEST_LEASE_SECONDS="1")
    async with durable.App(database_url) as app:
        run = await app.start("zombie", "z")
        await until(counted(workers, "z-work"), timeout=30, what="first worker in the step")
        os.kill(zombie.pid, signal.SIGSTOP)
        taker = workers.start(TEST_LEASE_SECONDS="1")
        await until(counted(workers, "z-work", 2), timeout=30, what="takeover")
        workers.open_gate("z-go")
        assert await run.result(timeout=60) == taker.pid
        os.kill(zombie.pid, signal.SIGCONT)
        await until(lambda: "lost" in workers.log_of(zombie), timeout=30, what="zombie fenced")
        rows = await db.fetch(
            "SELECT position, attempt, value FROM durable.journal WHERE run_id = $1", run.run_id
        )
    assert [(r["position"], json.loads(r["value"])) for r in rows] == [("0", taker.pid)]
    assert rows[0]["attempt"] == 2
    assert workers.lines("z-work") == [str(zombie.pid), str(taker.pid)]


async def test_changing_a_step_name_under_a_suspended_run_pauses_it_visibly(
    workers: Workers, database_url: str
) -> None:
    old = workers.start(VARIANT="v1")
    async with durable.App(database_url) as app:
        run = await app.start("drifting", "k1")
        await until(lambda: status_is(run, "suspended"), timeout=30, what="waiting")
        old.terminate()
        old.wait()
        new = workers.start(VARIANT="v2")
        sent = workers.cli("events", "send", "shipped", "--key", "k1", "--payload", '{"n": 1}')
        assert sent.returncode == 0, sent.stderr
        await until(lambda: status_is(run, "paused"), timeout=30, what="paused")
        attempts = (await run.info()).attempt
        shown = workers.cli("runs", "show", str(run.run_id))
        assert "paused" in shown.stdout
        assert "position 0" in shown.stdout
        assert "'charge'" in shown.stdout
        assert "'charge-card'" in shown.stdout
        listed = workers.cli("runs", "list", "--status", "paused")
        assert str(run.run_id) in listed.stdout
        assert (await run.info()).attempt == attempts, "a paused run was retried"
        # Roll back to code that matches the journal and resume: the run finishes.
        new.terminate()
        new.wait()
        workers.start(VARIANT="v1")
        resumed = workers.cli("runs", "resume", str(run.run_id))
        assert resumed.returncode == 0, resumed.stderr
        assert await run.result(timeout=60) == "v1"
