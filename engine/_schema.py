"""Bringing a database's schema ``durable`` to the code's: the migrations, then the functions.

The schema exists in one place, in two parts that change differently:

- **Tables** are in the numbered migrations (``sql/migrations/NNNN_verb_object.sql``). Each is
  applied once, in its own transaction, and recorded in ``durable.schema_migrations`` with the
  sha256 of its text. A migration never changes once applied: a database whose recorded checksum
  differs from the code's is refused, since its tables are not the ones this code expects.
- **Functions** are all in ``sql/functions.sql``, whose header states a version. It is applied as
  a whole after the migrations, in the transaction that records it (``durable.schema_functions``):
  when the database has a lower version (or none), every durable function except trigger
  functions is dropped and the file is run, so a function taken out of the file is gone; the
  same version and checksum means nothing to do; the same version with another checksum is
  refused (the file changed without raising its version); a higher version is left alone with a
  warning, so that an older process in a rolling deploy does not downgrade the functions.

Dropping a function other sessions use does not break them: PostgreSQL invalidates the cached
plans that depend on it (an asyncpg prepared statement included), so their next execution
resolves the new function by name. Only a function whose result columns changed is felt: asyncpg
prepares the statement again by itself outside a transaction, and raises
InvalidCachedStatementError inside one (a caller's transaction, ``start_runs_on``), once.

Everything runs under a session advisory lock, so a second process waits for the first instead
of migrating twice, and then finds nothing to do. Behind a transaction pooler, where a session
lock outlives nothing, it all runs in one transaction holding the lock until it commits
(``migrate_pooled``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import asyncpg

from engine._queries import FunctionFile, Migration, functions, migrations, queries
from engine.errors import ConfigurationError

log = logging.getLogger(__name__)

_PRE_RELEASE = (
    "schema durable in this database was created by a pre-release schema (its migrations are "
    "recorded without checksums), which this version cannot upgrade; drop schema durable or "
    "use a new database"
)


async def migrate(conn: asyncpg.Connection[Any]) -> list[int]:
    """Apply the migrations not yet applied and, when its version rose, functions.sql; returns
    the versions of the migrations applied now (``[]``: the tables were up to date).

    Raises ConfigurationError, having changed nothing, for a database this code must not touch:
    one made by the pre-release schema, one where an applied migration differs from the code's,
    or one whose functions.sql has the code's version but another text.
    """
    q = queries()
    await conn.execute(q["lock_migrations"])
    try:
        history = await conn.fetchrow(q["schema_history"])
        if history["recorded"] and not history["checksummed"]:
            raise ConfigurationError(_PRE_RELEASE)
        await conn.execute(q["bootstrap_migrations"])
        applied = {r["version"]: r for r in await conn.fetch(q["applied_migrations"])}
        code = migrations()
        _check_applied(applied, {m.version: m for m in code})
        done = await conn.fetchrow(q["applied_functions"])
        _check_functions(done, functions())
        applied_now = []
        for migration in code:
            if migration.version not in applied:
                applied_now.append(await _apply(conn, migration))
        if done is None or done["version"] < functions().version:
            await _apply_functions(conn, functions())
    finally:
        await conn.execute(q["unlock_migrations"])
    return applied_now


async def migrate_pooled(conn: asyncpg.Connection[Any]) -> list[int]:
    """``migrate`` in one transaction, for a connection through a transaction
    pooler. Its session advisory lock is released before its end, and a second process would
    take it before this transaction commits, and migrate again: so the same lock is also held
    at transaction level, until the commit. The session lock is taken and released within the
    transaction; after a failed statement, which the savepoint rolls back, it is released here
    (the unlock in ``migrate`` failed in the aborted transaction), since a rollback does not
    release it and the pooler would hand the session holding it to another client."""
    q = queries()
    async with conn.transaction():
        await conn.execute(q["lock_migrations_in_transaction"])
        try:
            async with conn.transaction():  # a savepoint
                return await migrate(conn)
        except asyncpg.InFailedSQLTransactionError as exc:
            # The unlock after the failed statement failed: the statement's error is the one.
            await conn.execute(q["unlock_migrations"])
            raise (exc.__context__ or exc) from None
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute(q["unlock_migrations"])
            raise


def _check_applied(applied: dict[int, asyncpg.Record], code: dict[int, Migration]) -> None:
    """Refuse a database where a migration the code has was applied from another text."""
    for version, row in applied.items():
        migration = code.get(version)
        if migration is None:
            log.warning(
                "migration %04d_%s is applied to this database but unknown to this code (a "
                "newer version of it migrated the database); continuing without it",
                version,
                row["name"],
            )
        elif row["checksum"] != migration.checksum:
            raise ConfigurationError(
                f"migration {migration.label} was applied to this database with checksum "
                f"{row['checksum'][:12]}, but this code's copy has checksum "
                f"{migration.checksum[:12]}: a migration must not change once applied. Restore "
                f"the file as it was and put the change in a new migration (before the first "
                f"release: drop schema durable or use a new database)"
            )


def _check_functions(done: asyncpg.Record | None, code: FunctionFile) -> None:
    """Refuse functions.sql changed without raising its version; warn about a newer one."""
    if done is None or done["version"] < code.version:
        return
    if done["version"] > code.version:
        log.warning(
            "this database has functions.sql version %d, newer than this code's %d (a newer "
            "version of the code applied it); leaving the functions as they are",
            done["version"],
            code.version,
        )
    elif done["checksum"] != code.checksum:
        raise ConfigurationError(
            f"functions.sql changed without raising its version: this database has version "
            f"{code.version} with checksum {done['checksum'][:12]}, this code's copy has "
            f"checksum {code.checksum[:12]}. Raise the '-- version:' line of "
            f"engine/sql/functions.sql with every change to it"
        )


async def _apply(conn: asyncpg.Connection[Any], migration: Migration) -> int:
    async with conn.transaction():
        await conn.execute(migration.sql)
        await conn.execute(
            queries()["record_migration"], migration.version, migration.name, migration.checksum
        )
    log.info("applied migration %s", migration.label)
    return migration.version


async def _apply_functions(conn: asyncpg.Connection[Any], code: FunctionFile) -> None:
    async with conn.transaction():
        await conn.execute(queries()["drop_functions"])
        await conn.execute(code.sql)
        await conn.execute(queries()["record_functions"], code.version, code.checksum)
    log.info("applied functions.sql version %d", code.version)
