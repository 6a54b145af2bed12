"""The store's contracts: fencing by claim, lease expiry, migrations equal to schema.sql."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from engine import Store
from engine._queries import schema
from tests.conftest import with_database

pytestmark = pytest.mark.postgres

LEASE = timedelta(milliseconds=300)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await Store.connect(database_url, max_size=4)
    yield store
    await store.close()


async def _started(store: Store, function: str = "f") -> uuid.UUID:
    run_id, created = await store.start_run(uuid.uuid4(), function, None, None, None)
    assert created
    return run_id


async def test_a_claim_lost_to_another_worker_cannot_append(store: Store) -> None:
    run_id = await _started(store)
    [first] = await store.claim(["f"], 10, "worker-a", LEASE)
    assert await store.append(run_id, first.attempt, "0", "step", "a", 1)
    await asyncio.sleep(LEASE.total_seconds() + 0.1)  # let the lease lapse: the subject here
    [second] = await store.claim(["f"], 10, "worker-b", timedelta(seconds=30))
    assert second.attempt == first.attempt + 1
    assert not await store.append(run_id, first.attempt, "1", "step", "zombie", 1)
    assert (
        await store.append_sleep(run_id, first.attempt, "1", "sleep", duration=timedelta(seconds=1))
        is None
    )
    outcome = await store.await_event(run_id, first.attempt, "1", "e", "", None)
    assert outcome.outcome == "fenced"
    assert not await store.suspend(run_id, first.attempt, None)
    assert not await store.finish(run_id, first.attempt, "completed", result=1)
    assert await store.append(run_id, second.attempt, "1", "step", "b", 2)
    entries = await store.load_journal(run_id)
    assert [(e.position, e.name, e.attempt) for e in entries] == [
        ("0", "a", first.attempt),
        ("1", "b", second.attempt),
    ]


async def test_a_position_is_never_written_twice(store: Store) -> None:
    run_id = await _started(store)
    [claim] = await store.claim(["f"], 10, "w", timedelta(seconds=30))
    assert await store.append(run_id, claim.attempt, "0", "step", "a", 1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.append(run_id, claim.attempt, "0", "step", "a", 2)


async def test_a_held_lease_is_renewed_and_a_lapsed_one_is_reported_lost(store: Store) -> None:
    kept_id = await _started(store)
    lost_id = await _started(store)
    claims = {c.run_id: c for c in await store.claim(["f"], 10, "w", LEASE)}
    kept = await store.renew_leases([(kept_id, claims[kept_id].attempt)], "w", LEASE)
    assert kept == {kept_id}
    await asyncio.sleep(LEASE.total_seconds() + 0.1)  # the lease must lapse for this test
    retaken = await store.claim(["f"], 10, "other", timedelta(seconds=30))
    assert {c.run_id for c in retaken} == {kept_id, lost_id}
    held = [(kept_id, claims[kept_id].attempt), (lost_id, claims[lost_id].attempt)]
    assert await store.renew_leases(held, "w", LEASE) == set()


async def test_a_paused_run_is_not_claimed_until_resumed(store: Store) -> None:
    run_id = await _started(store)
    [claim] = await store.claim(["f"], 10, "w", timedelta(seconds=30))
    assert await store.finish(run_id, claim.attempt, "paused", error={"type": "X"})
    assert await store.claim(["f"], 10, "w", timedelta(seconds=30)) == []
    assert await store.resume(run_id)
    assert not await store.resume(run_id)
    [again] = await store.claim(["f"], 10, "w", timedelta(seconds=30))
    assert again.attempt == claim.attempt + 1


async def test_claims_only_take_the_functions_asked_for(store: Store) -> None:
    await _started(store, "mine")
    await _started(store, "theirs")
    claims = await store.claim(["mine"], 10, "w", timedelta(seconds=30))
    assert [c.function for c in claims] == ["mine"]


async def test_migrating_twice_at_once_applies_each_migration_once(database_url: str) -> None:
    stores = [await Store.connect(database_url, max_size=2) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert applied == [[], [], []]  # the template database is already migrated


async def test_the_migrations_produce_exactly_the_schema_in_schema_sql(
    server_url: str, database_url: str
) -> None:
    name = f"durable_schema_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        direct = await asyncpg.connect(with_database(server_url, name))
        try:
            await direct.execute(schema())
            from_schema = await _catalog(direct)
        finally:
            await direct.close()
        migrated = await asyncpg.connect(database_url)
        try:
            from_migrations = await _catalog(migrated)
        finally:
            await migrated.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    assert from_schema == from_migrations
    assert any("durable.journal" in line for line in from_schema)


async def _catalog(conn: asyncpg.Connection) -> list[str]:
    """Tables, columns, constraints, indexes, functions and triggers of schema durable."""
    rows = await conn.fetch(
        """
        SELECT 'column ' || table_schema || '.' || table_name || '.' || column_name || ' '
               || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
          FROM information_schema.columns
         WHERE table_schema = 'durable' AND table_name <> 'schema_migrations'
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'durable'::regnamespace
           AND conrelid::oid <> coalesce(to_regclass('durable.schema_migrations')::oid, 0)
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes
         WHERE schemaname = 'durable' AND tablename <> 'schema_migrations'
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc)
          FROM pg_proc p WHERE p.pronamespace = 'durable'::regnamespace
        UNION ALL
        SELECT 'trigger ' || tgrelid::regclass || ' ' || pg_get_triggerdef(oid)
          FROM pg_trigger WHERE NOT tgisinternal
        """
    )
    return sorted(r[0] for r in rows)
