"""The SQL files of ``engine/sql``, read once: the named blocks of ``queries.sql``, the numbered
migrations (the tables) and ``functions.sql`` (every function), the last two with the checksum
``engine._schema`` records and compares.

A checksum is the sha256 of a file's text as read (newlines translated to ``\\n``, so a checkout
with other line endings does not count as a change).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")
_VERSION = re.compile(r"^-- version: (\d+)\s*$", re.MULTILINE)


def _read(*parts: str) -> str:
    return resources.files(__package__).joinpath("sql", *parts).read_text(encoding="utf-8")


def checksum(text: str) -> str:
    """The sha256 of ``text`` in hex: what a database records for an applied SQL file."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@cache
def queries() -> dict[str, str]:
    """Every named block of queries.sql, by name."""
    text = _read("queries.sql")
    found: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for here, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        found[here.group(1)] = text[here.end() : end].strip()
    return found


@dataclass(frozen=True)
class Migration:
    """One file of ``sql/migrations``, ``NNNN_verb_object.sql``: applied once, never changed."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """The file's name without ``.sql``, as messages show it: ``0001_create_tables``."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class FunctionFile:
    """``sql/functions.sql``: every function, replaced as a whole when ``version`` rises."""

    version: int
    sql: str
    checksum: str


@cache
def migrations() -> tuple[Migration, ...]:
    """The numbered migrations, in order."""
    folder = resources.files(__package__).joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            sql = entry.read_text(encoding="utf-8")
            found.append(Migration(int(match.group(1)), match.group(2), sql, checksum(sql)))
    return tuple(sorted(found, key=lambda m: m.version))


@cache
def functions() -> FunctionFile:
    """functions.sql, with the version its header states (``-- version: N``, exactly once)."""
    sql = _read("functions.sql")
    versions = _VERSION.findall(sql)
    if len(versions) != 1:
        raise ValueError(f"functions.sql must state one '-- version: N' line, not {versions}")
    return FunctionFile(int(versions[0]), sql, checksum(sql))
