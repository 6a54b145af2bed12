"""Retention: finished runs older than the retention go with their journal by dropping whole
partitions, and nothing that a run in flight still needs goes with them.

The database's clock is moved (``durable.fake_now``, set on every connection the app's pool
hands out) a few hours at a time over three days, with a retention pass after each move, while
a worker runs the app's functions on the real clock (it follows the database's).

The hundred thousand finished runs are real runs, each finished by the worker, and making them
is most of the test's time; three things keep it to about a minute (it took two, and three and
a half on a loaded machine). The worker has a thousand slots, so that a claim or a group commit
carries hundreds of runs. The step it journals is a coroutine: a sync body would go through a
thread for each run. And the runs table is analyzed once they are started, as autovacuum would
do within its naptime: planned on the statistics of the empty table the test database was
copied from, the statement that finishes a batch of runs took longer the more runs there were
(from 0.2 s to over a second), and the last runs were finished at a fifth of the first ones'
rate.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

import durable
from engine._clock import SystemClock
from engine._store import PostgresStore
from tests.helpers import make_app, running_worker, until

DAY = timedelta(days=1)
FINISHED_RUNS = 100_000


class MovedClock(SystemClock):
    """The real clock, moved forward by ``offset``: the database's time in this test."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> MovedClock:
    """The database's time for the app's connections (its pool sets ``durable.fake_now``)."""
    moved = MovedClock()
    connect = PostgresStore.connect

    async def connect_moved(*args: Any, **kwargs: Any) -> PostgresStore:
        return await connect(*args, **kwargs, clock=moved)

    monkeypatch.setattr(PostgresStore, "connect", connect_moved)
    return moved


def declare(app: durable.App) -> dict[str, Any]:
    async def same(i: int) -> int:
        return i

    @app.function(name="noop")
    async def noop(ctx: durable.Context, i: int) -> int:
        return await ctx.step("one", same, i)

    @app.function(name="child")
    async def child(ctx: durable.Context) -> str:
        return await ctx.step("work", lambda: "child's result")

    @app.function(name="parent")
    async def parent(ctx: durable.Context) -> str:
        handle = await ctx.start(child)
        await ctx.wait_for_event("release", key="parent")
        return f"joined: {await handle.result()}"

    @app.function(name="gated")
    async def gated(ctx: durable.Context, key: str) -> str:
        await ctx.step("begin", lambda: key)
        payload = await ctx.wait_for_event("gate", key=key)
        return f"{key}: {payload}"

    @app.function(name="sleeper")
    async def sleeper(ctx: durable.Context) -> Any:
        await ctx.sleep(timedelta(days=3))
        return await ctx.wait_for_event("day-one", key="sleeper")

    return {"noop": noop, "parent": parent, "child": child, "gated": gated, "sleeper": sleeper}


async def journal_bytes(db: asyncpg.Connection) -> int:
    size: int = await db.fetchval(
        "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('durable.journal')"
    )
    return size


@pytest.mark.timeout(900)
async def test_a_day_old_finished_runs_go_by_dropping_partitions_and_runs_in_flight_stay(
    database_url: str, db: asyncpg.Connection, clock: MovedClock
) -> None:
    # Every DELETE or TRUNCATE of the journal would leave a row here (DROP leaves none).
    await db.execute(
        """
        CREATE TABLE public.journal_deletes (op text);
        CREATE FUNCTION public.note_journal_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.journal_deletes VALUES (TG_OP); RETURN NULL; END $$;
        CREATE TRIGGER note_delete AFTER DELETE OR TRUNCATE ON durable.journal
            FOR EACH STATEMENT EXECUTE FUNCTION public.note_journal_delete();
        """
    )
    app = make_app(database_url, retention=DAY, lease=timedelta(seconds=30))
    fn = declare(app)
    async with app, running_worker(app, concurrency=1_000):
        sleeper = await app.start(fn["sleeper"], None)
        parent = await app.start(fn["parent"], None)
        source = await app.start(fn["gated"], "source")
        await app.send_event("gate", "opened", key="source")
        assert await source.result() == "source: opened"
        fork = await source.fork(from_step="begin", input="the fork")
        for start in range(0, FINISHED_RUNS, 5_000):
            await app.start_many(fn["noop"], range(start, start + 5_000))
        await db.execute("ANALYZE durable.runs")
        await until(
            lambda: db.fetchval(
                "SELECT count(*) = $1 FROM durable.runs "
                "WHERE function = 'noop' AND status = 'completed'",
                FINISHED_RUNS,
            ),
            timeout=600,
            what="the finished runs",
        )
        [child] = await parent.children()
        assert child.status == "completed"
        before = await journal_bytes(db)

        clock.offset = DAY + timedelta(minutes=1)
        await app.send_event("day-one", {"sent": "on day one"}, key="sleeper")
        dropped: list[dict[str, Any]] = []
        for hours in range(30, 3 * 24 + 12, 6):
            clock.offset = timedelta(hours=hours)
            done = await app.clean_up()
            assert done is not None
            dropped += done.dropped
        after = await journal_bytes(db)

        assert sum(d["runs_removed"] for d in dropped) >= FINISHED_RUNS
        assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE function = 'noop'") == 0
        assert after < before / 10, (before, after)
        assert await db.fetchval("SELECT count(*) FROM public.journal_deletes") == 0
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await db.execute("DELETE FROM durable.journal WHERE run_id = $1", sleeper.run_id)

        # What was in flight, and what it needs, is still there and finishes.
        assert await source.status() == "completed"
        assert [c.status for c in await parent.children()] == ["completed"]
        assert await fork.status() == "suspended"
        await app.send_event("release", None, key="parent")
        await app.send_event("gate", "at last", key="the fork")
        assert await parent.result() == "joined: child's result"
        assert await fork.result() == "the fork: at last"
        assert await asyncio.wait_for(sleeper.result(), 30) == {"sent": "on day one"}
