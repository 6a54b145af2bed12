"""Flow control held across separate worker processes: every limit is enforced in Postgres.

Runs are queued before the workers start, so each limit is tested under a backlog. Times come
from the step bodies (start and end, wall clock, one machine) and from the database.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import durable
from tests.acceptance.conftest import Workers, counted
from tests.acceptance.flow_app import make_app
from tests.helpers import status_is, until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

FLOW_APP = "tests.acceptance.flow_app:app"


def _intervals(workers: Workers, name: str) -> list[tuple[str, float, float]]:
    """(label, start, end) of every recorded execution."""
    found = []
    for line in workers.lines(name):
        label, start, end, _pid = line.split()
        found.append((label, float(start), float(end)))
    return found


def _most_at_once(intervals: list[tuple[str, float, float]]) -> int:
    edges = sorted([(s, 1) for _l, s, _e in intervals] + [(e, -1) for _l, _s, e in intervals])
    running = peak = 0
    for _time, change in edges:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    return peak


async def test_a_per_key_limit_of_one_never_overlaps_a_key_and_serves_keys_in_turn(
    workers: Workers, database_url: str
) -> None:
    async with make_app(database_url) as app:
        jobs = [{"tenant": t, "i": i} for i in range(20) for t in ("a", "b", "c")]
        # Tenant a's backlog is queued first: fairness must not let it run to the end first.
        jobs.sort(key=lambda job: job["tenant"])
        handles = await app.start_many("tenant_job", jobs)
        for _ in range(3):
            workers.start(app=FLOW_APP, concurrency=4)
        for handle in handles:
            await handle.result(timeout=120)
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for label, start, end in _intervals(workers, "tenant-jobs"):
        by_key[label.split("/")[0]].append((start, end))
    assert sorted(len(v) for v in by_key.values()) == [20, 20, 20]
    for key, spans in by_key.items():
        spans.sort()
        for (_s1, end), (start, _e2) in itertools.pairwise(spans):
            assert start >= end, f"two runs of key {key} overlapped"
    for a, b in itertools.permutations(by_key, 2):
        last_end_a = max(end for _start, end in by_key[a])
        first_start_b = min(start for start, _end in by_key[b])
        assert last_end_a > first_start_b, f"key {a} ran to the end before key {b} began"


async def test_a_global_limit_holds_across_three_worker_processes(
    workers: Workers, database_url: str
) -> None:
    async with make_app(database_url) as app:
        handles = await app.start_many("limited", list(range(30)))
        for _ in range(3):
            workers.start(app=FLOW_APP, concurrency=5)
        for handle in handles:
            await handle.result(timeout=120)
    intervals = _intervals(workers, "limited")
    assert len(intervals) == 30
    assert _most_at_once(intervals) == 2  # never more, and the limit was used


async def test_a_rate_limit_of_ten_per_second_is_never_exceeded_in_any_one_second_window(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    # Every grant the database makes is copied here, to test the algorithm exactly: units are
    # granted at t only when fewer than 10 were granted in (t - 1 s, t].
    await db.execute(
        """
        CREATE TABLE public.grant_log (granted_at timestamptz NOT NULL);
        CREATE FUNCTION public.log_grant() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.grant_log VALUES (NEW.granted_at);
            RETURN NEW;
        END $$;
        CREATE TRIGGER log_grant AFTER INSERT ON durable.rate_grants
            FOR EACH ROW EXECUTE FUNCTION public.log_grant();
        """
    )
    async with make_app(database_url) as app:
        handles = await app.start_many("api_user", list(range(100)))
        for _ in range(3):
            workers.start(app=FLOW_APP, concurrency=20)
        assert sorted([await h.result(timeout=120) for h in handles]) == list(range(100))
        attempts = [(await h.info()).attempt for h in handles]
    # A wait for budget longer than short_wait suspends the run (its slot is free meanwhile),
    # and the budget is reserved for it, so each waiting run woke once: no herd of waiters
    # waking together for the same free unit.
    assert max(attempts) == 2
    grants = [r[0] for r in await db.fetch("SELECT granted_at FROM grant_log ORDER BY 1")]
    assert len(grants) == 100  # one grant per call: no budget lost, none taken twice
    for i in range(len(grants) - 10):
        assert grants[i + 10] - grants[i] >= timedelta(seconds=1)
    assert grants[-1] - grants[0] >= timedelta(seconds=9)  # 100 calls take ten windows
    assert workers.count("api-calls") == 100


async def test_a_high_priority_run_queued_last_starts_before_the_backlog(
    workers: Workers, database_url: str
) -> None:
    async with make_app(database_url) as app:
        low = [await app.start("ranked", f"low-{i}") for i in range(20)]
        high = await app.start("ranked", "high", priority=10)
        workers.start(app=FLOW_APP, concurrency=1)
        for handle in [*low, high]:
            await handle.result(timeout=120)
        started = {}
        for handle in [*low, high]:
            started_at = (await handle.info()).started_at
            assert started_at is not None
            started[handle.run_id] = started_at
    order = [
        label for label, _start, _end in sorted(_intervals(workers, "ranked"), key=lambda x: x[1])
    ]
    assert order == ["high", *(f"low-{i}" for i in range(20))]
    assert started[high.run_id] == min(started.values())


async def test_cancelling_a_run_mid_step_cancels_the_step_the_run_and_its_children(
    workers: Workers, database_url: str
) -> None:
    workers.start(app=FLOW_APP)
    async with make_app(database_url) as app:
        run = await app.start("cancellable", "c")
        await until(counted(workers, "c-step"), timeout=30, what="the step started")
        cancelled = workers.cli("runs", "cancel", str(run.run_id), "--reason", "test")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "cancelling it" in cancelled.stdout
        await until(counted(workers, "c-cancelled"), timeout=30, what="CancelledError in the step")
        with pytest.raises(durable.RunCancelled) as ended:
            await run.result(timeout=30)
        assert ended.value.error.message == "test"
        children = [app.get_run(c.run_id) for c in await run.children()]
        assert len(children) == 2

        async def children_cancelled() -> bool:
            return all([await status_is(c, "cancelled") for c in children])

        await until(children_cancelled, timeout=30, what="both children cancelled")
        shown = workers.cli("runs", "show", str(run.run_id))
    assert workers.lines("c-cancelled") == workers.lines("c-step")  # in the same process
    assert "children (2):" in shown.stdout
    assert shown.stdout.count("cancelled") >= 3


async def test_a_fan_out_of_300_children_survives_a_sigkill_midway(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    for _ in range(2):
        workers.start(app=FLOW_APP, concurrency=50)
    async with make_app(database_url) as app:
        parent = await app.start("fan_out", 300)
        await until(counted(workers, "fan-out-midway"), timeout=60, what="half the children")
        [holder] = workers.lines("fan-out-midway")
        os.kill(int(holder), signal.SIGKILL)  # the parent's worker, between the two halves
        workers.open_gate("fan-out-go")
        workers.start(app=FLOW_APP, concurrency=50)
        assert await parent.result(timeout=180) == sum(2 * i for i in range(300))
    children = await db.fetch(
        "SELECT input, status FROM durable.runs WHERE parent_id = $1", parent.run_id
    )
    assert sorted(int(r["input"]) for r in children) == list(range(300))
    assert {r["status"] for r in children} == {"completed"}
    assert workers.count("fan-out-midway") == 2  # the midway step ran again after the kill
    assert await db.fetchval("SELECT count(*) FROM durable.runs") == 301


async def test_a_cron_schedule_every_second_starts_exactly_one_run_per_tick(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    for _ in range(3):
        workers.start(app=FLOW_APP, FLOW_CRON="1")
    await until(counted(workers, "ticks", 11), timeout=60, what="eleven ticks")
    workers.stop_all()
    rows = await db.fetch(
        "SELECT id, idempotency_key, status FROM durable.runs WHERE function = 'tick'"
    )
    # Each run's idempotency key names its tick: schedule:<name>:<tick>.
    ticks = sorted(datetime.fromisoformat(r["idempotency_key"].split(":", 2)[2]) for r in rows)
    assert len(ticks) == len(set(ticks))
    executed = workers.lines("ticks")
    assert len(executed) == len(set(executed))  # no run executed twice
    completed = {str(r["id"]) for r in rows if r["status"] == "completed"}
    assert completed <= set(executed)
    for earlier, later in itertools.pairwise(ticks):
        assert later - earlier == timedelta(seconds=1)  # every second, none missed
    assert len(ticks) >= 10
    assert all(t.tzinfo is not None for t in ticks)
    assert datetime.now(UTC) - ticks[-1] < timedelta(seconds=30)
    listed = workers.cli("schedules", "list")
    assert "every-second" in listed.stdout
