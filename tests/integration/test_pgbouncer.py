"""Behind PgBouncer in transaction pooling mode nothing depends on a server session: clients
that share one server connection see neither each other's prepared statements, nor a virtual
clock's time, nor a migration's lock; LISTEN goes to a direct URL when one is given, and
workers and waiting clients poll when none is. (The fault suite runs through PgBouncer too:
``tests/acceptance/test_faults_pgbouncer.py``.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import durable
from engine import PostgresStore, VirtualClock
from engine._queries import migrations, queries
from engine.errors import ConfigurationError, DatabaseError, DatabaseUnavailable
from tests.conftest import with_database
from tests.helpers import running_worker
from tests.pgbouncer import PgBouncer, pgbouncer

pytestmark = pytest.mark.postgres

VIRTUAL = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.fixture
def one_connection(server_url: str) -> Iterator[PgBouncer]:
    """A PgBouncer whose every client of a database shares one server connection."""
    with pgbouncer(server_url, pool_size=1) as running:
        yield running


async def database_now(store: PostgresStore) -> datetime:
    _schedules, now = await store.list_schedules()
    return now


async def advisory_locks(direct_url: str) -> int:
    conn = await asyncpg.connect(direct_url)
    try:
        held: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    return held


async def test_clients_of_a_one_connection_pool_really_share_its_session(
    one_connection: PgBouncer, database_url: str
) -> None:
    """The premise of the tests below: a session setting made by one client of the pool is
    seen by the next, so whatever the engine leaves in a session would leak."""
    url = one_connection.url(database_url)
    one = await asyncpg.connect(url, statement_cache_size=0)
    other = await asyncpg.connect(url, statement_cache_size=0)
    try:
        await one.execute(queries()["set_fake_time"], VIRTUAL.isoformat())
        assert await other.fetchval(queries()["now"]) == VIRTUAL
        await one.execute(queries()["set_fake_time"], "")
    finally:
        await one.close()
        await other.close()


async def test_a_virtual_clock_behind_a_pooler_is_not_seen_by_another_client_of_its_connection(
    one_connection: PgBouncer, database_url: str
) -> None:
    url = one_connection.url(database_url)
    clocked = await PostgresStore.connect(url, pooled=True, clock=VirtualClock(VIRTUAL))
    plain = await PostgresStore.connect(url, pooled=True)
    try:
        for _ in range(5):
            virtual, real = await asyncio.gather(database_now(clocked), database_now(plain))
            assert virtual == VIRTUAL
            assert abs(real - datetime.now(UTC)) < timedelta(minutes=5)
            assert await database_now(plain) != VIRTUAL
    finally:
        await clocked.close()
        await plain.close()


async def test_many_clients_through_a_pooler_meet_no_prepared_statement_of_another(
    bouncer: PgBouncer, database_url: str
) -> None:
    """asyncpg names the statements it caches, per session: behind a pooler the next
    transaction of a client may run in another session, which lacks the name. A pooled
    store caches none: eight clients on five server connections, each reading again and
    again, all succeed."""
    url = bouncer.url(database_url)
    stores = [await PostgresStore.connect(url, pooled=True, max_size=1) for _ in range(8)]

    async def read_again_and_again(store: PostgresStore) -> list[object]:
        return [await store.get_run(uuid.uuid4()) for _ in range(25)]

    try:
        reads = await asyncio.gather(*(read_again_and_again(s) for s in stores))
    finally:
        for store in stores:
            await store.close()
    assert reads == [[None] * 25] * 8


async def test_migrating_at_once_through_a_pooler_applies_each_migration_once_and_holds_no_lock(
    bouncer: PgBouncer, empty_database_url: str
) -> None:
    url = bouncer.url(empty_database_url)
    stores = [await PostgresStore.connect(url, pooled=True, max_size=2) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        again = await stores[0].migrate()
    finally:
        for store in stores:
            await store.close()
    assert sorted(applied) == [[], [], [m.version for m in migrations()]]
    assert again == []
    assert await advisory_locks(empty_database_url) == 0


async def test_a_migration_refused_behind_a_pooler_leaves_no_lock_in_a_pooled_session(
    one_connection: PgBouncer, database_url: str, db: asyncpg.Connection
) -> None:
    """A refusal found in Python (a changed migration) and a statement that fails (a column
    gone) both release the session lock before their transaction ends: a rollback would
    keep it, held by the one server connection every other client then gets."""
    url = one_connection.url(database_url)
    store = await PostgresStore.connect(url, pooled=True)
    try:
        recorded = await db.fetch("SELECT version, checksum FROM durable.schema_migrations")
        await db.execute("UPDATE durable.schema_migrations SET checksum = 'edited'")
        with pytest.raises(ConfigurationError, match="must not change once applied"):
            await store.migrate()
        assert await advisory_locks(database_url) == 0
        await db.executemany(
            "UPDATE durable.schema_migrations SET checksum = $2 WHERE version = $1", recorded
        )
        await db.execute("ALTER TABLE durable.schema_functions RENAME COLUMN checksum TO gone")
        with pytest.raises(DatabaseError) as failed:
            await asyncio.wait_for(store.migrate(), 30)
        assert failed.value.sqlstate == "42703"  # the statement's error, not "aborted"
        assert await advisory_locks(database_url) == 0
    finally:
        await store.close()


async def waiter(ctx: durable.Context, key: str) -> object:
    return await ctx.wait_for_event("go", key=key)


async def test_an_app_behind_a_pooler_with_no_listen_url_polls_and_nothing_waits_forever(
    bouncer: PgBouncer, database_url: str
) -> None:
    app = durable.App(
        bouncer.url(database_url),
        pooled=True,
        lease=timedelta(seconds=2),
        poll_interval=timedelta(milliseconds=300),
    )
    app.function(name="waiter")(waiter)
    async with app, running_worker(app):
        assert app._connection.listener.polling
        handles = await app.start_many(waiter, [f"k{n}" for n in range(20)])
        await asyncio.sleep(0.5)
        for n in range(20):
            await app.send_event("go", {"n": n}, key=f"k{n}")
        results = [await h.result(timeout=30) for h in handles]
    assert results == [{"n": n} for n in range(20)]


async def test_an_app_behind_a_pooler_listens_on_its_listen_url(
    bouncer: PgBouncer, database_url: str
) -> None:
    """With polls a minute apart, a run started while the worker idles and an event sent to
    a waiting run are each taken up at once: by notification, over the direct URL."""
    app = durable.App(
        bouncer.url(database_url),
        listen_url=database_url,
        lease=timedelta(seconds=2),
        poll_interval=timedelta(seconds=60),
    )
    app.function(name="waiter")(waiter)
    async with app, running_worker(app):
        assert not app._connection.listener.polling
        await asyncio.sleep(0.5)  # the worker idles, waiting for a minute
        handle = await app.start(waiter, "k")
        await asyncio.sleep(0.5)
        await app.send_event("go", "now", key="k")
        assert await handle.result(timeout=10) == "now"


async def test_a_listen_url_that_cannot_serve_fails_the_connect_instead_of_hanging(
    bouncer: PgBouncer, database_url: str
) -> None:
    app = durable.App(bouncer.url(database_url), listen_url=with_database(database_url, "nope"))
    with pytest.raises(ConfigurationError, match="cannot LISTEN on"):
        await asyncio.wait_for(app.connect(), 30)
    await app.close()


async def test_a_listen_url_out_of_reach_fails_the_connect_after_connect_timeout(
    bouncer: PgBouncer, database_url: str
) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"
    app = durable.App(bouncer.url(database_url), listen_url=unreachable, connect_timeout=1)
    with pytest.raises(DatabaseUnavailable, match="no LISTEN connection to"):
        await asyncio.wait_for(app.connect(), 30)
    await app.close()
