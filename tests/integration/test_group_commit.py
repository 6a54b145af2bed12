"""Group commit keeps the durability contract: a step returns only after its journal entry is
committed, and a statement that fails makes none of the steps in it return success."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

import durable
from tests.helpers import make_app, running_worker, until

pytestmark = pytest.mark.postgres

STALL = """
CREATE TABLE public.stall (on_ boolean);
CREATE FUNCTION public.stall_journal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.stall) THEN
        PERFORM pg_sleep(30);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER stall_journal BEFORE INSERT ON durable.journal
    FOR EACH STATEMENT EXECUTE FUNCTION public.stall_journal();
INSERT INTO public.stall VALUES (true);
"""


async def test_a_flush_killed_mid_commit_returns_no_step_and_its_steps_run_again(
    database_url: str, db: asyncpg.Connection
) -> None:
    await db.execute(STALL)  # every journal insert now hangs until its backend is terminated
    # A lease longer than the test: the hanging flush holds its runs' rows, so no renewal gets
    # through, and with the suite's 2 s lease the worker gave the runs up (cancelling the flush
    # before the test could kill it) when a loaded machine took that long to see it hang.
    app = make_app(database_url, lease=timedelta(seconds=60))
    order: list[tuple[str, str]] = []

    def slow(tag: str) -> str:
        order.append(("slow", tag))
        return tag

    def after(tag: str) -> str:
        order.append(("after", tag))
        return tag + "!"

    @app.function(name="paired")
    async def paired(ctx: durable.Context, tag: str) -> str:
        await ctx.step("slow", slow, tag)
        return await ctx.step("after", after, tag)

    tags = [f"r{i}" for i in range(10)]
    async with app, running_worker(app, concurrency=20):
        handles = [await app.start(paired, tag) for tag in tags]
        await until(lambda: len(order) == len(tags), what="every first step ran")
        await until(
            lambda: db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%append_entries%' "
                "AND state = 'active' AND pid <> pg_backend_pid() "
                "AND datname = current_database()"
            ),
            what="a flush hanging in its commit",
        )
        assert not any(kind == "after" for kind, _tag in order), "a step returned uncommitted"
        await db.execute("DELETE FROM public.stall")
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE '%append_entries%' AND pid <> pg_backend_pid() "
            "AND datname = current_database()"
        )
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert killed >= 1
    assert results == [tag + "!" for tag in tags]
    for tag in tags:
        mine = [kind for kind, t in order if t == tag]
        # The first step ran once, or again after its statement died; the second step only
        # ever ran after the first step's entry was committed.
        assert mine in (["slow", "after"], ["slow", "slow", "after"]), (tag, mine)
    assert any(order.count(("slow", tag)) == 2 for tag in tags), "no step was in the lost flush"
    entries = await db.fetchval("SELECT count(*) FROM durable.journal")
    assert entries == 2 * len(tags)


async def test_concurrent_steps_share_statements(database_url: str, db: asyncpg.Connection) -> None:
    app = make_app(database_url)

    @app.function(name="three")
    async def three(ctx: durable.Context, n: int) -> int:
        for i in range(3):
            await ctx.step(f"s{i}", str, i)
        return n

    async with app, running_worker(app, concurrency=50):
        handles = await app.start_many(three, range(100))
        assert [await h.result(timeout=60) for h in handles] == list(range(100))
    statements, entries = await db.fetchrow(
        "SELECT count(DISTINCT xmin::text), count(*) FROM durable.journal"
    )
    assert entries == 300
    assert statements < entries, "every entry was committed on its own"


async def test_journals_loaded_together_come_in_shared_queries_each_to_its_run(
    database_url: str,
) -> None:
    """Runs resumed together (one claim's worth) ask for their journals at once: the loads
    asked for while one is under way go in one query, and each run gets its own journal, an
    empty one for a run with none."""
    app = make_app(database_url)

    @app.function(name="counted")
    async def counted(ctx: durable.Context, n: int) -> int:
        for i in range(n):
            await ctx.step(f"s{i}", str, i)
        return n

    async with app:
        async with running_worker(app, concurrency=50):
            handles = await app.start_many(counted, range(1, 21))
            assert [await h.result(timeout=60) for h in handles] == list(range(1, 21))
        blank = await app.start(counted, 0)  # never claimed: no journal
        store = app._connection.store  # a test that counts queries looks inside on purpose
        before = store.journal_loads.statements
        ids = [h.run_id for h in handles]
        journals = await asyncio.gather(*(store.load_journal(i) for i in [*ids, blank.run_id]))
        shared = store.journal_loads.statements - before
    assert [[e.value for e in j] for j in journals] == [
        *([str(i) for i in range(n)] for n in range(1, 21)),
        [],
    ]
    assert shared < len(ids), "every journal was loaded on its own"


async def test_a_full_workers_ends_do_not_wait_out_the_spacing(database_url: str) -> None:
    """Runs' ends are spaced so that lone ends share statements; a full worker's ends go at
    once when a claim's worth wait, since due runs wait for the slots they free. With an
    hour's spacing, six due runs through one slot (a claim of one) all finish only if every
    end after the first skips it."""
    app = make_app(database_url)

    @app.function(name="quick")
    async def quick(ctx: durable.Context, n: int) -> int:
        return n

    async with app:
        store = app._connection.store  # a test of the spacing sets it past the test's length
        store.finishes._spacing = 3600
        async with running_worker(app, concurrency=1):
            handles = await app.start_many(quick, range(6))
            assert [await h.result(timeout=30) for h in handles] == list(range(6))
        assert store.finishes.writes == 6
