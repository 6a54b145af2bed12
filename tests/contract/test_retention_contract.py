"""The retention rules of the store contract, on PostgreSQL (functions.sql, "Retention"): runs go
to the open segment of their retention class, a segment rotates and falls due on the class's
schedule, and its drop carries forward exactly what must stay (unfinished runs, recent ones,
unfinished families, fork sources, events a run may still receive) before the partitions go.

Each test has a fresh database (segments outlive the pooled databases' emptying) and moves the
database's clock with a VirtualClock."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from engine import NewRun, PostgresStore, VirtualClock
from engine.errors import DatabaseError
from tests.helpers import until

pytestmark = pytest.mark.postgres

DAY = timedelta(days=1)
LEASE = timedelta(seconds=30)


@pytest.fixture
async def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def store(database_url: str, clock: VirtualClock) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.connect(database_url, max_size=4, clock=clock)
    try:
        await opened.open_segments([None, DAY])
        yield opened
    finally:
        await opened.close()


async def start(store: PostgresStore, function: str = "f", **options: Any) -> uuid.UUID:
    [(run_id, created)] = await store.start_runs(
        [NewRun(uuid.uuid4(), function, None, retention=DAY, **options)]
    )
    assert created
    return run_id


async def finish(store: PostgresStore, run_id: uuid.UUID, step: str = "s") -> None:
    """Complete the run after one step (claiming it unless an earlier claim took it along)."""
    await store.claim(["f"], 100, "w", LEASE)
    row = await store.get_run(run_id)
    assert row is not None
    assert row.status == "running"
    await store.append(run_id, row.attempt, "1", "step", step, {"v": 1})
    assert await store.finish(run_id, row.attempt, "completed", result=1)


async def segment_of(db: asyncpg.Connection, run_id: uuid.UUID) -> int:
    segment: int = await db.fetchval("SELECT segment FROM durable.runs WHERE id = $1", run_id)
    return segment


async def day_later(
    store: PostgresStore, clock: VirtualClock, days: int = 2
) -> list[dict[str, Any]]:
    """Move the clock a day and a quarter at a time, cleaning up after each move."""
    dropped: list[dict[str, Any]] = []
    for _ in range(days * 4):
        clock.advance(DAY / 4 + timedelta(minutes=1))
        done = await store.clean_up()
        assert done is not None
        dropped += done.dropped
    return dropped


async def test_a_run_goes_to_its_classes_open_segment_and_its_keys_stay_unique_across_them(
    store: PostgresStore, db: asyncpg.Connection
) -> None:
    kept = await start(store, idempotency_key="order-1")
    [(forever, created)] = await store.start_runs([NewRun(uuid.uuid4(), "f", None)])
    assert created
    assert await segment_of(db, kept) != await segment_of(db, forever)
    assert (
        await db.fetchval(
            "SELECT retention FROM durable.segments WHERE id = $1", await segment_of(db, kept)
        )
        == DAY
    )
    # The same key in another class, and the same id: the run that exists, not a second one.
    [(again, created)] = await store.start_runs(
        [NewRun(uuid.uuid4(), "f", None, idempotency_key="order-1")]
    )
    assert (again, created) == (kept, False)
    # A fresh run (its id new, so neither locked nor looked for) still has its key looked for.
    [(again, created)] = await store.start_runs(
        [NewRun(uuid.uuid4(), "f", None, idempotency_key="order-1", fresh=True)]
    )
    assert (again, created) == (kept, False)
    [(same, created)] = await store.start_runs([NewRun(forever, "f", None, retention=DAY)])
    assert (same, created) == (forever, False)
    assert await db.fetchval("SELECT count(*) FROM durable.runs") == 2


async def test_an_old_finished_run_goes_with_its_journal_and_the_partitions_are_dropped(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection
) -> None:
    old = await start(store)
    await finish(store, old)
    segment = await segment_of(db, old)
    dropped = await day_later(store, clock)
    [report] = [d for d in dropped if d["segment"] == segment]
    assert (report["runs_removed"], report["runs_kept"]) == (1, 0)
    assert [d["runs_removed"] for d in dropped if d is not report] == [0] * (len(dropped) - 1)
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", old) == 0
    assert await db.fetchval("SELECT count(*) FROM durable.journal WHERE run_id = $1", old) == 0
    assert await db.fetchval("SELECT to_regclass($1)", f"durable.journal_{segment}") is None
    assert await db.fetchval("SELECT to_regclass($1)", f"durable.runs_{segment}") is None


async def test_a_forever_segment_never_rotates_nor_drops(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection
) -> None:
    [(run_id, _)] = await store.start_runs([NewRun(uuid.uuid4(), "f", None)])
    await finish(store, run_id)
    await day_later(store, clock, days=5)
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", run_id) == 1
    assert await db.fetchval("SELECT count(*) FROM durable.segments WHERE retention IS NULL") == 1


async def test_what_must_stay_is_carried_forward_with_its_journal(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection
) -> None:
    unfinished = await start(store)
    parent = await start(store)  # unfinished, with a finished child
    child = await start(store, parent_id=parent)
    await finish(store, child)
    grandparent = await start(store)  # finished, with an unfinished grandchild
    middle = await start(store, parent_id=grandparent)
    await start(store, parent_id=middle)
    await finish(store, middle)
    await finish(store, grandparent)
    source = await start(store)  # finished, forked by a run in another segment
    await finish(store, source, step="kept")
    gone = await start(store)
    await finish(store, gone)
    segment = await segment_of(db, unfinished)
    clock.advance(DAY / 2)
    await store.clean_up()  # the fork goes to a newer segment
    fork = uuid.uuid4()
    assert (
        await db.fetchval("SELECT durable.fork_run($1, $2, '{1}', '2', NULL, false)", source, fork)
        == "forked"
    )
    assert await segment_of(db, fork) != segment

    dropped = await day_later(store, clock)
    [report] = [d for d in dropped if d["segment"] == segment]
    assert report["runs_removed"] == 1
    ids = [unfinished, parent, child, grandparent, middle, source]
    assert report["runs_kept"] == len(ids) + 1  # and the unfinished grandchild
    rows = await db.fetch("SELECT id, segment FROM durable.runs WHERE id = ANY ($1)", ids)
    assert len(rows) == len(ids)
    assert all(r["segment"] != segment for r in rows)
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", gone) == 0
    assert (
        await db.fetchval(
            "SELECT name FROM durable.journal WHERE run_id = $1 AND position = '1'", source
        )
        == "kept"
    )
    assert await db.fetchval("SELECT count(*) FROM durable.journal WHERE run_id = $1", child) == 1


async def test_an_event_a_run_may_still_receive_is_carried_forward_and_no_other(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection
) -> None:
    before = await store.send_event("e", "k", "before", DAY)  # sent before the run started
    waiting = await start(store)
    received = await store.send_event("e", "k", "received", DAY)
    pending = await store.send_event("e", "k", "pending", DAY)
    other_key = await store.send_event("e", "other", "other key", DAY)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    outcome = await store.await_event(waiting, claim.attempt, "1", "e", "k", None)
    assert outcome.payload == "received"
    assert await store.suspend(waiting, claim.attempt, clock.now() + 2 * DAY)
    dropped = await day_later(store, clock)
    assert sum(d["events_kept"] for d in dropped) >= 2
    left = {r["id"] for r in await db.fetch("SELECT id FROM durable.events")}
    assert left == {pending, other_key}, (before, received)
    [claim] = await store.claim(["f"], 10, "w", LEASE)  # the event it waited for still arrives
    outcome = await store.await_event(waiting, claim.attempt, "2", "e", "k", None)
    assert outcome.payload == "pending"


async def test_a_fork_made_while_the_keepers_were_found_is_kept(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection, database_url: str
) -> None:
    source = await start(store)
    await finish(store, source)
    segment = await segment_of(db, source)
    clock.advance(DAY / 4 + timedelta(minutes=1))
    await store.clean_up()  # a newer segment opens
    clock.advance(2 * DAY)
    # Between finding the keepers and locking the tables: a transaction that forks the run and
    # holds its lock on the runs table, so that the drop tries for the lock until it commits.
    forking = db.transaction()
    await forking.start()
    fork = "SELECT durable.fork_run($1, $2, '{}', '1', NULL, false)"
    await db.execute(fork, source, uuid.uuid4())
    dropper = await asyncpg.connect(database_url)
    try:
        await dropper.execute(f"SET durable.fake_now = '{clock.now().isoformat()}'")
        dropping = asyncio.create_task(
            dropper.fetchval("SELECT durable.drop_segment($1)::text", segment)
        )
        await until(
            lambda: db.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '%drop_segment%' "
                "AND wait_event = 'PgSleep' AND datname = current_database()"
            ),
            what="the drop, having found no keeper, trying for the tables' lock",
        )
        await forking.commit()
        report = json.loads(await dropping)
    finally:
        await dropper.close()
    assert (report["runs_kept"], report["runs_removed"]) == (1, 0)
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", source) == 1


async def test_a_drop_gives_up_on_a_busy_table_and_the_pass_is_tried_again(
    store: PostgresStore, clock: VirtualClock, db: asyncpg.Connection
) -> None:
    old = await start(store)
    await finish(store, old)
    clock.advance(DAY / 4 + timedelta(minutes=1))
    await store.clean_up()
    clock.advance(2 * DAY)
    busy = db.transaction()
    await busy.start()
    await db.execute("LOCK TABLE durable.journal IN ROW EXCLUSIVE MODE")
    with pytest.raises(DatabaseError) as refused:
        await store.clean_up()
    assert refused.value.sqlstate == "55P03"
    await busy.rollback()
    done = await store.clean_up()
    assert done is not None
    assert sum(d["runs_removed"] for d in done.dropped) == 1


async def test_one_cleaner_at_a_time(store: PostgresStore, db: asyncpg.Connection) -> None:
    holder = db.transaction()
    await holder.start()
    await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('durable.retention', 19))")
    assert await store.clean_up() is None
    await holder.rollback()
    assert await store.clean_up() is not None
