"""Migrations: applied once under concurrency, and proven equal to schema.sql."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from engine import PostgresStore
from engine._queries import schema
from tests.conftest import with_database

pytestmark = pytest.mark.postgres


async def test_migrating_twice_at_once_applies_each_migration_once(database_url: str) -> None:
    stores = [await PostgresStore.connect(database_url, max_size=2) for _ in range(3)]
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
