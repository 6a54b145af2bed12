"""The schema: in one place, applied once, and never silently different from the code's.

Tables are in the numbered migrations, every other function in ``functions.sql``; the first
tests read those files, the others migrate real databases (``engine._schema``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from importlib import resources

import asyncpg
import pytest

from engine import PostgresStore
from engine._queries import checksum, functions, migrations, queries
from engine.errors import ConfigurationError

_DEFINED = re.compile(r"^CREATE (?:OR REPLACE )?FUNCTION durable\.(\w+)\s*\(", re.MULTILINE)
_CALLED = re.compile(r"\bdurable\.(\w+)\s*\(")
_TRIGGERED = re.compile(r"\bEXECUTE (?:FUNCTION|PROCEDURE) durable\.(\w+)\s*\(")
_TABLE_DDL = re.compile(r"\b(?:CREATE|ALTER|DROP)\s+(?:TABLE|INDEX|TRIGGER|SCHEMA|SEQUENCE|VIEW)\b")
# The one exception: a segment's partitions, which retention makes and drops as time goes
# (durable.add_segment, durable.drop_segment); their tables and indexes are the migrations'.
_PARTITION_DDL = re.compile(
    r"'CREATE TABLE durable\.%I PARTITION OF durable\.%I FOR VALUES IN \(%s\)'"
    r"|'DROP TABLE durable\.%I'"
)
_RETURNS = re.compile(r"\)\s*RETURNS\s+(\w+)")


def _code(sql: str) -> str:
    """SQL without its ``--`` comments: a name in a comment is neither a definition nor a call."""
    return re.sub(r"--[^\n]*", "", sql)


def _definitions(sql: str) -> dict[str, str]:
    """Each function ``sql`` creates, by name, with its text up to the next definition."""
    pieces = re.split(r"(?=^CREATE (?:OR REPLACE )?FUNCTION )", _code(sql), flags=re.MULTILINE)
    found = {}
    for piece in pieces:
        match = _DEFINED.match(piece)
        if match:
            found[match.group(1)] = piece
    return found


def _migrations_sql() -> str:
    return "\n".join(m.sql for m in migrations())


def test_every_function_is_reachable_from_a_named_query_or_a_trigger() -> None:
    """No unused SQL function: each one functions.sql defines is called by a query of
    queries.sql (the only SQL the store runs), by a trigger, or by a function that is itself
    reachable from those (a pair of unused functions calling each other does not count)."""
    bodies = _definitions(functions().sql)
    reachable = {name for query in queries().values() for name in _CALLED.findall(_code(query))}
    reachable |= set(_TRIGGERED.findall(_code(_migrations_sql())))
    pending = list(reachable)
    while pending:
        body = bodies.get(pending.pop(), "")
        for callee in set(_CALLED.findall(body)) - reachable:
            reachable.add(callee)
            pending.append(callee)
    assert sorted(set(bodies) - reachable) == []
    assert {"claim_due", "held_segment", "hand_over_slots"} <= reachable  # the parsing works


def test_the_schema_is_in_one_place_tables_in_migrations_and_each_function_defined_once() -> None:
    in_functions = _DEFINED.findall(_code(functions().sql))
    in_migrations = _definitions(_migrations_sql())
    assert len(_PARTITION_DDL.findall(functions().sql)) == 2
    assert _TABLE_DDL.findall(_PARTITION_DDL.sub("", _code(functions().sql))) == []
    assert "OR REPLACE" not in _code(functions().sql)
    # A migration defines a function only when a table needs it: a trigger function.
    assert {name: _RETURNS.findall(body)[:1] for name, body in in_migrations.items()} == {
        name: ["trigger"] for name in in_migrations
    }
    names = in_functions + _DEFINED.findall(_code(_migrations_sql()))
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
    assert _DEFINED.findall(_code("\n".join(queries().values()))) == []
    sql_files = resources.files("engine").joinpath("sql")
    assert sorted(entry.name for entry in sql_files.iterdir() if entry.is_file()) == [
        "functions.sql",
        "queries.sql",
    ]


async def _migrate(url: str) -> list[int]:
    store = await PostgresStore.connect(url, max_size=2)
    try:
        return await store.migrate()
    finally:
        await store.close()


@pytest.mark.postgres
async def test_migrating_twice_at_once_applies_each_migration_once(
    empty_database_url: str,
) -> None:
    stores = [await PostgresStore.connect(empty_database_url, max_size=2) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        again = await stores[0].migrate()
    finally:
        for s in stores:
            await s.close()
    everything = [m.version for m in migrations()]
    assert sorted(applied) == [[], [], everything]
    assert again == []
    conn = await asyncpg.connect(empty_database_url)
    try:
        recorded = await conn.fetch("SELECT version, checksum FROM durable.schema_migrations")
        functions_recorded = await conn.fetch("SELECT version FROM durable.schema_functions")
    finally:
        await conn.close()
    assert sorted(tuple(r) for r in recorded) == [(m.version, m.checksum) for m in migrations()]
    assert [r["version"] for r in functions_recorded] == [functions().version]


@pytest.mark.postgres
async def test_a_migration_changed_after_it_was_applied_is_refused_with_both_checksums(
    db: asyncpg.Connection, database_url: str
) -> None:
    first = migrations()[0]
    applied_from = checksum(first.sql + "-- an edit made after it was applied\n")
    await db.execute(
        "UPDATE durable.schema_migrations SET checksum = $1 WHERE version = $2",
        applied_from,
        first.version,
    )
    with pytest.raises(ConfigurationError) as refused:
        await _migrate(database_url)
    message = str(refused.value)
    assert f"migration {first.label} was applied" in message
    assert applied_from[:12] in message
    assert first.checksum[:12] in message
    assert "put the change in a new migration" in message


@pytest.mark.postgres
async def test_a_database_migrated_before_the_squash_is_refused_and_left_as_it_was(
    empty_database_url: str,
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        # What the pre-squash code left: versions 1..8 recorded, without checksums.
        await conn.execute(
            """
            CREATE SCHEMA durable;
            CREATE TABLE durable.schema_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now());
            INSERT INTO durable.schema_migrations (version, name)
            SELECT v, 'before_the_squash' FROM generate_series(1, 8) v;
            """
        )
        with pytest.raises(ConfigurationError) as refused:
            await _migrate(empty_database_url)
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'durable' ORDER BY 1"
        )
    finally:
        await conn.close()
    assert "created by a pre-release schema" in str(refused.value)
    assert "drop schema durable or use a new database" in str(refused.value)
    assert [t["tablename"] for t in tables] == ["schema_migrations"]


_CLOCK_OID = "SELECT oid FROM pg_proc WHERE oid = to_regprocedure('durable.clock()')"


@pytest.mark.postgres
async def test_a_raised_functions_version_replaces_every_function_and_removes_the_dropped_ones(
    db: asyncpg.Connection, database_url: str
) -> None:
    as_migrated = await _catalog(db)
    clock_before = await db.fetchval(_CLOCK_OID)
    await db.execute(
        """
        CREATE FUNCTION durable.taken_out_of_functions_sql() RETURNS integer
        LANGUAGE sql AS 'SELECT 1';
        UPDATE durable.schema_functions SET version = version - 1;
        """
    )
    assert await _migrate(database_url) == []  # the tables were up to date
    assert await _catalog(db) == as_migrated
    assert await db.fetchval(_CLOCK_OID) != clock_before  # created anew
    latest = await db.fetchrow(queries()["applied_functions"])
    assert tuple(latest) == (functions().version, functions().checksum)


@pytest.mark.postgres
async def test_functions_sql_changed_without_raising_its_version_is_refused(
    db: asyncpg.Connection, database_url: str
) -> None:
    applied_from = checksum(functions().sql + "-- an edit without a new version\n")
    await db.execute("UPDATE durable.schema_functions SET checksum = $1", applied_from)
    with pytest.raises(ConfigurationError) as refused:
        await _migrate(database_url)
    message = str(refused.value)
    assert "functions.sql changed without raising its version" in message
    assert applied_from[:12] in message
    assert functions().checksum[:12] in message


@pytest.mark.postgres
async def test_functions_of_a_newer_version_are_left_alone_with_a_warning(
    db: asyncpg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute(
        """
        CREATE FUNCTION durable.only_in_a_newer_version() RETURNS integer
        LANGUAGE sql AS 'SELECT 1';
        UPDATE durable.schema_functions SET version = version + 1, checksum = 'newer';
        """
    )
    newer = await _catalog(db)
    with caplog.at_level(logging.WARNING, logger="engine._schema"):
        assert await _migrate(database_url) == []
    assert await _catalog(db) == newer
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"this database has functions.sql version {functions().version + 1}, newer than this "
        f"code's {functions().version} (a newer version of the code applied it); leaving the "
        "functions as they are"
    ]


async def _catalog(conn: asyncpg.Connection) -> list[str]:
    """Tables, columns, constraints, indexes, functions (with the OID-free text of their bodies)
    and triggers of schema durable, outside its bookkeeping tables."""
    rows = await conn.fetch(
        """
        SELECT 'column ' || table_schema || '.' || table_name || '.' || column_name || ' '
               || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
          FROM information_schema.columns
         WHERE table_schema = 'durable'
           AND table_name NOT IN ('schema_migrations', 'schema_functions')
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'durable'::regnamespace
           AND conrelid::regclass::text
               NOT IN ('durable.schema_migrations', 'durable.schema_functions')
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes
         WHERE schemaname = 'durable'
           AND tablename NOT IN ('schema_migrations', 'schema_functions')
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc)
          FROM pg_proc p WHERE p.pronamespace = 'durable'::regnamespace
        UNION ALL
        SELECT 'trigger ' || tgrelid::regclass || ' ' || pg_get_triggerdef(oid)
          FROM pg_trigger WHERE NOT tgisinternal
        """
    )
    return sorted(r[0] for r in rows)
