"""``Server``: a PostgreSQL server seen from outside its databases, for the databases durable
makes for itself (``durable.testing``'s simulation databases): create, list, drop.

Like the store, it is the driver's only user here and surfaces its errors
(``engine._driver``): ``DatabaseError`` carries PostgreSQL's SQLSTATE (``42P04`` a database of
that name exists, ``42501`` the role may not create databases, ``3D000`` no such database).
``CREATE DATABASE`` takes its name as an identifier, not a parameter, and cannot run inside a
function, so the statement is built here, for a name that ``NAME`` admits and nothing else.
"""

from __future__ import annotations

import re
from typing import Any, Self

import asyncpg

from engine._driver import surfaced, surfacing_methods
from engine._queries import queries
from engine._urls import redact
from engine.errors import ConfigurationError

NAME = re.compile(r"durable_[a-z0-9_]{1,50}")
_CONNECT_SECONDS = 10.0


@surfacing_methods
class Server:
    """One connection to a database of a server, to act on the server's databases."""

    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, url: str) -> Self:
        """Connect to the database ``url`` names (DatabaseError, SQLSTATE 3D000, when it does
        not exist; DatabaseUnavailable when the server cannot be reached)."""
        try:
            return cls(await asyncpg.connect(url, timeout=_CONNECT_SECONDS))
        except ValueError as exc:
            raise ConfigurationError(f"cannot use database URL {redact(url)}: {exc}") from exc
        except Exception as exc:
            raise surfaced(exc) from exc

    async def close(self) -> None:
        await self._conn.close(timeout=_CONNECT_SECONDS)

    async def create_database(self, name: str, *, durable_commits: bool = True) -> None:
        """Create database ``name``; with ``durable_commits=False`` its commits do not wait for
        the disk (``synchronous_commit = off``: for data that need not survive a crash of the
        server, such as a simulation's)."""
        await self._conn.execute(f'CREATE DATABASE "{_checked(name)}"')
        if not durable_commits:
            await self._conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')

    async def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending the sessions connected to it."""
        await self._conn.execute(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    async def databases(self, like: str) -> list[str]:
        """The names of the server's databases that match the LIKE pattern ``like``."""
        rows = await self._conn.fetch(queries()["list_databases"], like)
        return [row["datname"] for row in rows]


def _checked(name: str) -> str:
    """``name`` if ``NAME`` admits it: safe between double quotes in a statement."""
    if NAME.fullmatch(name) is None:
        raise ValueError(f"not a name of a database durable makes: {name!r}")
    return name
