"""The named SQL blocks of ``sql/queries.sql`` and the numbered migrations, read once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")


def _read(*parts: str) -> str:
    return resources.files(__package__).joinpath("sql", *parts).read_text(encoding="utf-8")


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
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """The numbered migrations, in order."""
    folder = resources.files(__package__).joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    return tuple(sorted(found, key=lambda m: m.version))


def schema() -> str:
    """The complete current schema (schema.sql); a test proves the migrations produce it."""
    return _read("schema.sql")
