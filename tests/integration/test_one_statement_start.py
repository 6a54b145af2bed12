"""A fresh run with no idempotency key or concurrency strategy starts in one statement
(queries.sql's start_run, or start_run_claimed when the worker starting it runs it) rather than
by durable.create_runs. Its row is the same; a class with no open segment falls back to
create_runs, which opens one; and a start whose reply was lost is tried again as a named run, so
that it is found, wherever it went, and not started twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typing_extensions import TypedDict

import durable
from engine import NewRun, PostgresStore, _codec
from engine._store import _claim, _run_args
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres


class LosingTheReply:
    """The store's pool, but its first run of ``statement`` commits and then loses its reply
    (a connection that died after the commit), calling ``after`` in between; with no ``after``,
    it loses nothing and only records the statements."""

    def __init__(
        self, pool: Any, statement: str, after: Callable[[], Awaitable[None]] | None
    ) -> None:
        self.pool, self.statement, self.after = pool, statement, after
        self.seen: list[str] = []  # the statements fetchrow ran
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.seen.append(query)
        row = await self.pool.fetchrow(query, *args)
        if query == self.statement and not self.lost and self.after is not None:
            self.lost = True
            await self.after()
            raise asyncpg.ConnectionDoesNotExistError("the reply was lost")
        return row


def losing_the_reply(
    store: PostgresStore,
    after: Callable[[], Awaitable[None]] | None,
    statement: str = "start_run",
) -> LosingTheReply:
    """Put a ``LosingTheReply`` of queries.sql's ``statement`` under ``store``."""
    # The test looks inside on purpose: it loses one reply.
    losing = LosingTheReply(store._pool, store._q[statement], after)
    store._pool = losing
    return losing


THREE_DAYS = timedelta(days=3)

# Every option start_run takes as a parameter, so that each is seen to land as create_runs puts
# it; the time it starts at given as a delay (each statement reads the clock) or as a moment.
EVERY_OPTION: dict[str, Any] = {
    "trace_context": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    "priority": 5,
    "start_timeout": timedelta(minutes=5),
    "run_timeout": timedelta(minutes=1, microseconds=250),
    "parent_id": uuid.UUID(int=7),
    "concurrency_key": "tenant-1",
    "concurrency_limit": 2,
    "slot_while_suspended": True,
    "rate_limit": "per-tenant",
    "rate_key": "tenant-1",
    "tags": {"team": "billing"},
    "queue": "bulk",
    "retention": THREE_DAYS,
}

# Durations of days, which must stay spans of seconds: as calendar days they would be 23 or 25
# hours across a daylight-saving change of the session's zone. The database's clock is held
# the day before New York's change (both statements then read the same time, so the rows must
# match in every column), and its sessions' zone is New York's.
ZONE = "America/New_York"
BEFORE_THE_CHANGE = datetime(2027, 3, 13, 17, 0, tzinfo=UTC)  # noon; clocks go forward on the 14th


async def hold_the_clock(db: asyncpg.Connection) -> None:
    """Hold the database's clock at ``BEFORE_THE_CHANGE`` and its sessions' zone at ``ZONE``,
    for the sessions opened after this."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET TimeZone TO '{ZONE}'")
    await db.execute(
        f"ALTER DATABASE \"{name}\" SET durable.fake_now TO '{BEFORE_THE_CHANGE.isoformat()}'"
    )


async def same_rows(db: asyncpg.Connection, first: uuid.UUID, second: uuid.UUID) -> dict[str, Any]:
    """Assert that runs ``first`` and ``second`` differ only in their ids and the moments their
    rows were written; returns ``first``'s row."""
    rows = await db.fetch(
        "SELECT to_jsonb(r)::text AS doc, r.* FROM durable.runs r"
        " WHERE id = ANY($1::uuid[]) ORDER BY id = $2 DESC",
        [first, second],
        first,
    )
    assert len(rows) == 2
    one, other = dict(rows[0]), dict(rows[1])
    # Every column as Python reads it (SQL's NULL is not JSON's null) and as PostgreSQL writes
    # it ("1 day" and "24:00:00" are two intervals there, one timedelta here).
    as_text = [json.loads(row["doc"]) for row in rows]
    differ = {key for key in one if one[key] != other[key]}
    differ |= {key for key in as_text[0] if as_text[0][key] != as_text[1][key]}
    assert differ == {"id", "doc", "created_at", "updated_at"}
    return one


@pytest.mark.parametrize(
    ("given", "options"),
    [
        (None, {}),
        ({"name": "x"}, {**EVERY_OPTION, "delay": timedelta(seconds=30, microseconds=5)}),
        (
            {"name": "x"},
            {**EVERY_OPTION, "available_at": datetime(2031, 5, 1, 12, 30, 0, 17, tzinfo=UTC)},
        ),
        ({"name": "x"}, {**EVERY_OPTION, "delay": timedelta(days=100)}),
        (
            {"name": "x"},
            {**EVERY_OPTION, "start_timeout": timedelta(days=2), "run_timeout": timedelta(days=1)},
        ),
    ],
    ids=[
        "defaults",
        "every-option-delayed",
        "every-option-at-a-moment",
        "days-of-delay",
        "days-of-timeouts",
    ],
)
async def test_a_fresh_run_is_the_same_row_by_either_statement(
    database_url: str, db: asyncpg.Connection, given: Any, options: dict[str, Any]
) -> None:
    await hold_the_clock(db)
    store = await PostgresStore.connect(database_url, max_size=2)
    try:
        assert await store._pool.fetchval("SHOW TimeZone") == ZONE
        await store.open_segments([None, THREE_DAYS])
        watching = losing_the_reply(store, None)
        one = NewRun(uuid.uuid4(), "gated", given, fresh=True, **options)
        named = replace(one, run_id=uuid.uuid4(), fresh=False)
        [(first, created)] = await store.start_runs([one])
        assert created
        assert watching.seen == [store._q["start_run"]]  # the fresh one in one statement
        [(second, created)] = await store.start_runs([named])
        assert created
    finally:
        await store.close()
    by_fresh = await same_rows(db, first, second)
    starts = options.get("available_at", BEFORE_THE_CHANGE + options.get("delay", timedelta()))
    assert by_fresh["available_at"] == starts
    assert json.loads(by_fresh["input"]) == given  # JSON text, null when none: not SQL NULL
    assert (by_fresh["status"], by_fresh["attempt"]) == ("pending", 0)
    for option in ("priority", "concurrency_key", "rate_key", "queue", "run_timeout"):
        assert by_fresh[option] == options.get(option, by_fresh[option])
    if options:
        assert json.loads(by_fresh["tags"]) == options["tags"]
        assert json.loads(by_fresh["trace_context"]) == options["trace_context"]
        assert by_fresh["expires_at"] - by_fresh["available_at"] == options["start_timeout"]
        retention = await db.fetchval(
            "SELECT retention FROM durable.segments WHERE id = $1", by_fresh["segment"]
        )
        assert retention == THREE_DAYS


# An eager start's options, drawn at random: those of a run claimed as it is inserted, or any
# (a later start, a concurrency key, a rate limit or a start timeout already past: it waits).
CLAIMED: dict[str, st.SearchStrategy[Any]] = {
    "trace_context": st.just(EVERY_OPTION["trace_context"]),
    "priority": st.integers(-3, 3),
    "start_timeout": st.sampled_from([timedelta(minutes=5), timedelta(days=2)]),
    "run_timeout": st.sampled_from([timedelta(minutes=1, microseconds=250), timedelta(days=1)]),
    "parent_id": st.just(uuid.UUID(int=7)),
    "concurrency_limit": st.integers(1, 3),
    "slot_while_suspended": st.booleans(),
    "rate_key": st.just("tenant-1"),
    "tags": st.just({"team": "billing"}),
    "queue": st.just("bulk"),
    "retention": st.sampled_from([None, THREE_DAYS]),
    "delay": st.sampled_from([timedelta(seconds=-3), timedelta(0)]),
}
ANY: dict[str, st.SearchStrategy[Any]] = {
    **CLAIMED,
    "start_timeout": st.sampled_from(
        [timedelta(seconds=-1), timedelta(0), timedelta(minutes=5), timedelta(days=2)]
    ),
    "concurrency_key": st.just("tenant-1"),
    "rate_limit": st.just("per-tenant"),
    "delay": st.sampled_from([timedelta(seconds=-3), timedelta(0), timedelta(seconds=30)]),
    "available_at": st.sampled_from(
        [BEFORE_THE_CHANGE - timedelta(hours=1), BEFORE_THE_CHANGE + timedelta(hours=1)]
    ),
}
# The worker's functions and their versions ("": not known), the run's among them or not.
WORKERS = st.sampled_from(
    [
        (["gated"], ["v7"]),
        (["other", "gated"], ["v0", "v7"]),
        (["gated", "other"], ["v7", "v0"]),
        (["gated", "other"], ["", ""]),
        (["other"], ["v0"]),
    ]
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    options=st.fixed_dictionaries({}, optional=CLAIMED) | st.fixed_dictionaries({}, optional=ANY),
    worker=WORKERS,
    pinned=st.sampled_from([[], ["gated"], ["other"]]),
    given=st.sampled_from([None, {"n": 1}]),
    open_class=st.booleans(),
)
@example(  # first, while its class has no open segment: the flat statement inserts nothing
    options={"retention": THREE_DAYS},
    worker=(["gated"], ["v7"]),
    pinned=[],
    given=None,
    open_class=False,
)
@example(
    options={}, worker=(["other", "gated"], ["v0", "v7"]), pinned=[], given=None, open_class=True
)
@example(  # due 3 s ago: it expires 5 minutes after that, not after now
    options={"delay": timedelta(seconds=-3), "start_timeout": timedelta(minutes=5)},
    worker=(["gated"], ["v7"]),
    pinned=[],
    given={"n": 1},
    open_class=True,
)
@example(  # every option a run claimed at its start can have, its start due an hour ago
    options={
        **{k: v for k, v in EVERY_OPTION.items() if k not in ("concurrency_key", "rate_limit")},
        "available_at": BEFORE_THE_CHANGE - timedelta(hours=1),
    },
    worker=(["gated", "other"], ["v7", "v0"]),
    pinned=["gated"],
    given={"n": 1},
    open_class=True,
)
async def test_an_eager_start_by_the_flat_statement_is_durable_new_runs_row(
    database_url: str,
    db: asyncpg.Connection,
    options: dict[str, Any],
    worker: tuple[list[str], list[str]],
    pinned: list[str],
    given: Any,
    open_class: bool,
) -> None:
    await hold_the_clock(db)
    store = await PostgresStore.connect(database_url, max_size=1)
    try:
        await store.open_segments([None, THREE_DAYS] if open_class else [None])
        has_segment = await db.fetchval(
            "SELECT count(*) > 0 FROM durable.open_segments()"
            " WHERE retention IS NOT DISTINCT FROM $1",
            options.get("retention"),
        )
        flat = NewRun(uuid.uuid4(), "gated", given, fresh=True, **options)
        claiming = ("w-1", timedelta(seconds=30), *worker, pinned)
        row = await store._pool.fetchrow(store._q["start_run_claimed"], *_run_args(flat), *claiming)
        general = replace(flat, run_id=uuid.uuid4(), fresh=False)  # by durable.start_claimed
        _, created, claim = await store.start_claimed(general, *claiming)
    finally:
        await store.close()
    assert created
    event("waits" if claim is None else "claimed" if has_segment else "no open segment")
    if claim is None or not has_segment:  # it waits, or its class needs a segment opened
        assert row is None
        assert (
            await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", flat.run_id) == 0
        )
        return
    assert row is not None
    by_flat = await same_rows(db, flat.run_id, general.run_id)
    assert (by_flat["status"], by_flat["attempt"], by_flat["lease_owner"]) == ("running", 1, "w-1")
    assert replace(_claim(row), run_id=claim.run_id, created_at=claim.created_at) == claim


async def test_an_eager_start_the_flat_statement_cannot_make_takes_one_that_can(
    database_url: str,
) -> None:
    store = await PostgresStore.connect(database_url, max_size=2)
    claiming = ("w-1", timedelta(seconds=30), ["gated"], ["v7"])
    try:
        watching = losing_the_reply(store, None)
        # Its class has no open segment: the flat statement inserts nothing, start_claimed
        # opens one and claims the run.
        no_segment = NewRun(uuid.uuid4(), "gated", None, retention=THREE_DAYS, fresh=True)
        found, created, claim = await store.start_claimed(no_segment, *claiming)
        assert (found, created) == (no_segment.run_id, True)
        assert claim is not None
        assert watching.seen == [store._q["start_run_claimed"], store._q["start_claimed"]]
        # Expired as it starts: not claimed, so not tried flat; start_run inserts it waiting.
        watching.seen.clear()
        expired = NewRun(uuid.uuid4(), "gated", None, start_timeout=timedelta(0), fresh=True)
        found, created, claim = await store.start_claimed(expired, *claiming)
        assert (found, created, claim) == (expired.run_id, True, None)
        assert watching.seen == [store._q["start_run"]]
    finally:
        await store.close()


async def test_an_eager_start_is_one_flat_statement(database_url: str) -> None:
    app = make_app(database_url)

    @app.function(name="gated")
    async def gated(ctx: durable.Context, name: str) -> str:
        return name

    async with app, running_worker(app, concurrency=4):
        warm = await app.start(gated, "warm")  # the worker serves: the next start is eager
        assert await warm.result(timeout=20) == "warm"
        store = app._connection.store
        watching = losing_the_reply(store, None)
        handle = await app.start(gated, "now")
        assert watching.seen == [store._q["start_run_claimed"]]
        assert await handle.result(timeout=20) == "now"
        watching.seen.clear()  # a run due later is not claimed at its start: start_run
        later = await app.start(gated, "later", delay=timedelta(milliseconds=1))
        assert watching.seen == [store._q["start_run"]]
        assert await later.result(timeout=20) == "later"


async def test_a_class_with_no_open_segment_gets_one_from_the_fallback(
    database_url: str, db: asyncpg.Connection
) -> None:
    store = await PostgresStore.connect(database_url, max_size=2)
    watching = losing_the_reply(store, None)
    try:  # start_run finds no open segment for the class and inserts nothing
        run = NewRun(uuid.uuid4(), "f", None, retention=THREE_DAYS, fresh=True)
        [(found, created)] = await store.start_runs([run])
    finally:
        await store.close()
    assert (found, created) == (run.run_id, True)
    assert watching.seen == [store._q["start_run"]]  # tried first, then create_runs
    segment = await db.fetchval("SELECT segment FROM durable.runs WHERE id = $1", found)
    assert await db.fetchval("SELECT retention FROM durable.segments WHERE id = $1", segment) == (
        THREE_DAYS
    )


async def test_a_start_whose_reply_was_lost_is_found_even_in_an_older_segment(
    database_url: str, db: asyncpg.Connection
) -> None:
    store = await PostgresStore.connect(database_url, max_size=2)

    async def rotate() -> None:  # the open segment changes between the try and the retry
        await db.execute("SELECT durable.add_segment(NULL)")

    try:
        await store.open_segments([None])
        losing = losing_the_reply(store, rotate)
        run = NewRun(uuid.uuid4(), "f", None, fresh=True)
        [(found, created)] = await store.start_runs([run])
    finally:
        await store.close()
    assert (found, created) == (run.run_id, False)  # the lost try had made it
    assert losing.seen == [store._q["start_run"]]  # once, then the retry by create_runs
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", found) == 1


@pytest.mark.parametrize(
    ("statement", "when"),
    [
        ("start_run_claimed", {}),
        # Given a start time (an hour ago): claimed by start_run, not the flat statement.
        ("start_run", {"start_at": datetime.now(UTC) - timedelta(hours=1)}),
    ],
    ids=["flat", "given-a-start-time"],
)
async def test_an_eager_start_whose_reply_was_lost_is_one_run_and_runs(
    database_url: str, db: asyncpg.Connection, statement: str, when: dict[str, Any]
) -> None:
    app = make_app(database_url)  # the suite's lease of two seconds

    @app.function(name="gated")
    async def gated(ctx: durable.Context, name: str) -> str:
        return name

    async def rotate() -> None:
        await db.execute("SELECT durable.add_segment(NULL)")

    async with app, running_worker(app, concurrency=4):
        warm = await app.start(gated, "warm")  # the worker serves: the next start is eager
        assert await warm.result(timeout=20) == "warm"
        losing = losing_the_reply(app._connection.store, rotate, statement)
        handle = await app.start(gated, "lost", **when)
        assert losing.lost
        # Inserted claimed by the worker, which never heard so: its lease lapses, and it runs.
        assert await handle.result(timeout=20) == "lost"
        info = await handle.info()
        assert info.attempt == 2
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", handle.run_id) == 1


class Parcel(TypedDict):
    """An input type no other test uses: its validator is built by this test's app alone."""

    weight: int


async def test_an_app_builds_its_functions_validators_when_it_connects(database_url: str) -> None:
    """A function's input validator is built when its app connects, not at its first start:
    the first in a process also loads pydantic's plugins, which made a process's first start
    some 20 ms slower than the next."""
    app = make_app(database_url)

    @app.function(name="weighs_parcels")
    async def weighs_parcels(ctx: durable.Context, parcels: list[Parcel]) -> int:
        return sum(p["weight"] for p in parcels)

    async with app:
        built = _codec.adapter.cache_info().misses
        handle = await app.start(weighs_parcels, [Parcel(weight=2), Parcel(weight=3)])
        assert _codec.adapter.cache_info().misses == built, "the first start built a validator"
        row = await app._connection.store.get_run(handle.run_id)
        assert row is not None
        assert row.input == [{"weight": 2}, {"weight": 3}]
