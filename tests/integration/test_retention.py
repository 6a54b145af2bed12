"""Retention as an app meets it: its settings, the workers' passes, and `durable retention`."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import durable
from engine import Cleanup, PostgresStore
from engine._retention import Cleaner
from engine.errors import ConfigurationError, DatabaseError
from tests.helpers import make_app, running_worker, until
from tests.integration.test_cli import durable_cli

pytestmark = pytest.mark.postgres

DAY = timedelta(days=1)


def test_a_retention_is_at_least_an_hour_and_a_function_may_keep_its_runs_longer() -> None:
    with pytest.raises(ConfigurationError, match="at least an hour"):
        durable.App(retention=timedelta(minutes=59))
    with pytest.raises(ConfigurationError, match="cleanup_interval"):
        durable.App(cleanup_interval=timedelta(0))
    app = durable.App(retention=DAY)

    @app.function()
    async def inherits(ctx: durable.Context) -> None: ...

    @app.function(retention=timedelta(days=30))
    async def longer(ctx: durable.Context) -> None: ...

    @app.function(retention="forever")
    async def kept(ctx: durable.Context) -> None: ...

    with pytest.raises(ConfigurationError, match="at least an hour"):
        app.function(retention=timedelta(seconds=1))

    retention = {name: spec.options.retention for name, spec in app.functions.items()}
    assert sorted(retention.values(), key=str) == sorted([DAY, timedelta(days=30), None], key=str)
    assert sorted(map(str, app.retentions)) == sorted(map(str, [DAY, DAY, timedelta(30), None]))


async def test_runs_and_events_go_to_their_retentions_segments(
    database_url: str, db: asyncpg.Connection
) -> None:
    app = make_app(database_url, retention=DAY)

    @app.function(name="forever", retention="forever")
    async def forever(ctx: durable.Context) -> None: ...

    @app.function(name="daily")
    async def daily(ctx: durable.Context) -> None: ...

    async with app:
        # The app opened its classes' segments as it connected: no start has to.
        classes = await db.fetch("SELECT retention FROM durable.segments WHERE closed_at IS NULL")
        assert sorted(map(str, (r["retention"] for r in classes))) == ["1 day, 0:00:00", "None"]
        kept = await app.start(forever, None)
        gone = await app.start(daily, None)
        event = await app.send_event("e", 1)
    query = """SELECT s.retention FROM durable.runs r JOIN durable.segments s
                   ON s.id = r.segment WHERE r.id = $1"""
    assert await db.fetchval(query, kept.run_id) is None
    assert await db.fetchval(query, gone.run_id) == DAY
    assert (
        await db.fetchval(
            """SELECT s.retention FROM durable.events e JOIN durable.segments s
               ON s.id = e.segment WHERE e.id = $1""",
            event,
        )
        == DAY
    )


async def test_every_worker_makes_a_pass_now_and_then(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[Cleanup | None] = []
    clean_up = PostgresStore.clean_up

    async def counted(self: PostgresStore) -> Cleanup | None:
        done = await clean_up(self)
        passes.append(done)
        return done

    monkeypatch.setattr(PostgresStore, "clean_up", counted)
    app = make_app(database_url, retention=DAY, cleanup_interval=timedelta(milliseconds=50))
    async with app, running_worker(app):
        await until(lambda: len(passes) >= 3, what="three retention passes")
    assert all(p is not None and p.dropped == [] for p in passes)


class Busy:
    """A store whose tables are too busy to lock, then not."""

    def __init__(self) -> None:
        self.calls = 0

    async def clean_up(self) -> Cleanup | None:
        self.calls += 1
        if self.calls == 1:
            raise DatabaseError("canceling statement due to lock timeout", "55P03")
        if self.calls == 2:
            raise DatabaseError("something else", "XX000")
        return Cleanup(0, [dict.fromkeys(["segment", "into", "bytes"], 1) | _counts()])


def _counts() -> dict[str, Any]:
    return {"runs_removed": 5, "runs_kept": 1, "events_kept": 0}


async def test_a_pass_that_cannot_lock_or_fails_is_logged_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Busy()
    cleaner = Cleaner(store, timedelta(seconds=1))
    with caplog.at_level(logging.INFO, logger="engine._retention"):
        assert await cleaner.once() is None
        assert await cleaner.once() is None
        done = await cleaner.once()
    assert done is not None
    assert [r.levelname for r in caplog.records] == ["INFO", "ERROR", "INFO"]
    assert "too busy" in caplog.records[0].getMessage()
    assert "dropped segment 1 (5 runs" in caplog.records[2].getMessage()


async def test_a_cleaner_starved_of_the_lock_says_so(caplog: pytest.LogCaptureFixture) -> None:
    class Locked:
        async def clean_up(self) -> Cleanup | None:
            raise DatabaseError("the tables stayed busy", "55P03")

    cleaner = Cleaner(Locked(), timedelta(seconds=1))
    with caplog.at_level(logging.INFO, logger="engine._retention"):
        for _ in range(3):
            assert await cleaner.once() is None
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO", "WARNING"]
    assert "3 passes in a row" in caplog.records[2].getMessage()


async def test_the_command_line_makes_a_pass_and_shows_each_segment(database_url: str) -> None:
    app = make_app(database_url, retention=DAY)

    @app.function(name="f")
    async def f(ctx: durable.Context) -> int:
        return 1

    async with app, running_worker(app):
        assert await (await app.start(f, None)).result() == 1
    done = durable_cli("--database-url", database_url, "retention", "run")
    assert done.returncode == 0, done.stderr
    assert "opened 0 segment(s); dropped 0" in done.stdout
    shown = durable_cli("--database-url", database_url, "retention", "status")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["segment", "retention", "state", "size", "runs", "events"]
    assert any("for ever" in line and "open" in line for line in lines[1:])
    assert any("1 day" in line and "open" in line and line.split()[-2] == "1" for line in lines)
