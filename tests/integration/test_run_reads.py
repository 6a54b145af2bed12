"""Reading runs as people do (migration 0003): tags, filters with keyset pagination, capped
counts by status, capacity, each step's tries with their times, and the notifications that
keep a page live."""

from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable import RunFilter
from engine.errors import InvalidInput
from tests.helpers import hearing, make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def _waiting(app: durable.App, queue: str = "default") -> None:
    @app.function(name="waiting", queue=queue)
    async def waiting(ctx: durable.Context, key: str) -> Any:
        return await ctx.wait_for_event("go", key=key, timeout=timedelta(hours=1))


async def test_tags_are_stored_and_select_runs_alone_or_together(database_url: str) -> None:
    app = make_app(database_url)
    _waiting(app, queue="reports")
    async with app:
        acme = await app.start("waiting", "a", tags={"tenant": "acme", "tier": "gold"})
        other = await app.start("waiting", "b", tags={"tenant": "other", "tier": "gold"})
        many = await app.start_many("waiting", ["c", "d"], tags={"tenant": "acme"})
        plain = await app.start("waiting", "e")
        by_tenant = await app.list_runs(RunFilter(tags={"tenant": "acme"}))
        both = await app.list_runs(RunFilter(tags={"tenant": "acme", "tier": "gold"}))
        gold = await app.list_runs(RunFilter(tags={"tier": "gold"}))
        info = await acme.info()
        plain_info = await plain.info()
    assert {r.run_id for r in by_tenant} == {acme.run_id, *(h.run_id for h in many)}
    assert [r.run_id for r in both] == [acme.run_id]
    assert {r.run_id for r in gold} == {acme.run_id, other.run_id}
    assert info.tags == {"tenant": "acme", "tier": "gold"}
    assert info.queue == "reports"
    assert plain_info.tags == {}


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"tenant": 5}, "must be a str"),
        ({"": "x"}, "a tag name is empty"),
        ({f"t{i}": "x" for i in range(21)}, "at most 20 tags"),
        ({"tenant": "x" * 2000}, "the limit is 1024"),
        (["tenant"], "must be a dict"),
    ],
)
async def test_bad_tags_are_refused_and_nothing_is_stored(
    database_url: str, tags: Any, message: str
) -> None:
    app = make_app(database_url)
    _waiting(app)
    async with app:
        with pytest.raises(InvalidInput, match=message):
            await app.start("waiting", "a", tags=tags)
        assert await app.list_runs() == []


async def test_filters_search_and_pages_newest_first(database_url: str) -> None:
    app = make_app(database_url)
    _waiting(app)

    @app.function(name="other")
    async def other(ctx: durable.Context) -> None:
        return None

    async with app:
        started = [
            await app.start("waiting", f"k{i}", idempotency_key=f"order-{i}", tags={"n": str(i)})
            for i in range(7)
        ]
        done = await app.start("other")
        async with running_worker(app):
            await done.result(timeout=20)
            for handle in started[:3]:
                await until(functools.partial(status_is, handle, "suspended"), what="waiting")
        newest_first = [h.run_id for h in reversed(started)]
        pages, after = [], None
        while True:
            page = await app.list_runs(RunFilter(function="waiting"), limit=3, after=after)
            pages.append([r.run_id for r in page])
            if len(page) < 3:
                break
            after = page[-1]
        by_id = await app.list_runs(RunFilter(search=str(started[4].run_id)))
        by_key = await app.list_runs(RunFilter(search="order-2"))
        by_tag_value = await app.list_runs(RunFilter(search="5"))
        nothing = await app.list_runs(RunFilter(search="no such thing"))
        completed = await app.list_runs(status="completed")
        in_default = await app.list_runs(RunFilter(queue="default"))
        future = await app.list_runs(RunFilter(since=datetime.now(UTC) + timedelta(hours=1)))
        past = await app.list_runs(RunFilter(until=datetime.now(UTC) - timedelta(hours=1)))
        version = (await done.info()).version
        of_version = await app.list_runs(RunFilter(version=version))
        with pytest.raises(InvalidInput, match="not a run status"):
            await app.list_runs(status="broken")
    assert [run for page in pages for run in page] == newest_first
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [r.run_id for r in by_id] == [started[4].run_id]
    assert [r.run_id for r in by_key] == [started[2].run_id]
    assert [r.run_id for r in by_tag_value] == [started[5].run_id]
    assert nothing == []
    assert [r.run_id for r in completed] == [done.run_id]
    assert len(in_default) == 8
    assert future == past == []
    assert [r.run_id for r in of_version] == [done.run_id]


async def test_counts_by_status_stop_at_the_cap(database_url: str) -> None:
    app = make_app(database_url)
    _waiting(app)
    async with app:
        await app.start_many("waiting", [f"k{i}" for i in range(12)], tags={"tenant": "acme"})
        await app.start("waiting", "x", tags={"tenant": "other"})
        capped = await app.count_runs(cap=5)
        exact = await app.count_runs(RunFilter(tags={"tenant": "acme"}))
    assert capped == {
        "pending": 5,
        "running": 0,
        "suspended": 0,
        "paused": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert exact["pending"] == 12


async def test_capacity_shows_queues_keys_rate_limits_and_events(database_url: str) -> None:
    app = make_app(database_url)
    app.rate_limit("api", limit=5, period=timedelta(minutes=1))
    gate = asyncio.Event()

    @durable.step(rate_limit="api", weight=2)
    async def call() -> str:
        return "called"

    @app.function(name="held", concurrency=durable.Concurrency(limit=1, key=lambda k: k))
    async def held(ctx: durable.Context, key: str) -> str:
        await ctx.step("call", call)
        await ctx.step("hold", gate.wait)
        return key

    _waiting(app, queue="reports")  # which no worker here serves
    async with app:
        first = await app.start("held", "tenant-1")
        second = await app.start("held", "tenant-1")
        await app.start("waiting", "q")
        await app.send_event("hello", {"n": 1}, key="k")
        async with running_worker(app):
            await until(lambda: _holding(app), what="a slot held, one awaited, the rate used")
            capacity = await app.capacity()
            gate.set()
            await first.result(timeout=20)
            await second.result(timeout=20)
    assert [(k.key, k.limit, k.holding, k.awaiting) for k in capacity.keys] == [
        ("held:tenant-1", 1, 1, 1)
    ]
    [rate] = capacity.rate_limits
    assert (rate.name, rate.budget, rate.period, rate.used) == ("api", 5, timedelta(minutes=1), 2)
    queues = {q.queue: q for q in capacity.queues}
    assert queues["reports"].pending == 1
    assert queues["reports"].oldest_pending_age is not None
    assert [(e.name, e.key, e.payload) for e in capacity.events] == [("hello", "k", '{"n": 1}')]


async def _holding(app: durable.App) -> bool:
    """A slot held, one awaited, and the holder's first step through the rate limit: the
    claim takes the slot before the step takes its units, so the slot alone is not enough."""
    capacity = await app.capacity()
    keys, rates = capacity.keys, capacity.rate_limits
    return (
        bool(keys)
        and keys[0].holding == 1
        and keys[0].awaiting == 1
        and bool(rates)
        and rates[0].used == 2
    )


async def test_each_try_of_a_step_is_journaled_with_its_start_and_duration(
    database_url: str,
) -> None:
    app = make_app(database_url)
    tries = 0

    @durable.step(retries=3, backoff=durable.Backoff(initial=timedelta(milliseconds=20)))
    async def flaky() -> str:
        nonlocal tries
        tries += 1
        await asyncio.sleep(0.05 * tries)
        if tries < 3:
            raise RuntimeError(f"try {tries} failed")
        return "ok"

    @app.function(name="flaky")
    async def run(ctx: durable.Context) -> Any:
        await ctx.step("flaky", flaky)
        return await ctx.wait_for_event("go", timeout=timedelta(hours=1))

    async with app, running_worker(app):
        handle = await app.start("flaky")
        await until(lambda: status_is(handle, "suspended"), what="waiting for go")
        await app.send_event("go", "yes")
        assert await handle.result(timeout=20) == "yes"
        journal = await handle.journal()
    step, event = journal
    failed = step.timing["tries"]
    assert [t["error"] for t in failed] == [
        "RuntimeError: try 1 failed",
        "RuntimeError: try 2 failed",
    ]
    assert step.started_at is not None
    assert step.duration_ms is not None
    starts = [datetime.fromisoformat(t["at"]) for t in failed] + [step.started_at]
    durations = [t["ms"] for t in failed] + [step.duration_ms]
    assert starts == sorted(starts)
    # Each try slept 50, 100, 150 ms: its duration covers that, and the next began after it
    # ended (on the database's clock as the worker estimates it: a few ms of slack).
    for n, ms in enumerate(durations, 1):
        assert 50 * n <= ms < 50 * n + 1000
    for before, after, ms in zip(starts, starts[1:], durations, strict=False):
        assert after - before >= timedelta(milliseconds=ms - 5)
    assert starts[-1] <= step.created_at
    since = event.started_at
    deadline = datetime.fromisoformat(event.timing["deadline"])
    assert since is not None
    assert since <= event.created_at
    # The wait's row is stamped at its transaction's start, its deadline a moment later.
    assert timedelta(hours=1) <= deadline - since < timedelta(hours=1, seconds=1)


async def test_watch_runs_hears_each_journaled_entry_and_the_end(database_url: str) -> None:
    app = make_app(database_url)
    _waiting(app)
    heard: list[str] = []
    arrived = asyncio.Event()

    def changed(ids: str) -> None:
        heard.append(ids)
        arrived.set()

    async with app:
        handle = await app.start("waiting", "k")
        stop = await app.watch_runs(changed)
        try:
            async with running_worker(app):
                await until(lambda: status_is(handle, "suspended"), what="waiting")
                await app.send_event("go", "yes", key="k")
                await handle.result(timeout=20)
                await until(lambda: heard.count(str(handle.run_id)) >= 2, what="notified")
        finally:
            await stop()
    assert all(ids == str(handle.run_id) for ids in heard), heard


async def test_the_runs_list_command_filters_by_tag(database_url: str) -> None:
    from durable._cli import main

    app = make_app(database_url)
    _waiting(app)
    async with app:
        acme = await app.start("waiting", "a", tags={"tenant": "acme"})
        await app.start("waiting", "b", tags={"tenant": "other"})
    listed = await asyncio.to_thread(
        _cli_output, main, ["--database-url", database_url, "runs", "list", "--tag", "tenant=acme"]
    )
    assert [line.split()[0] for line in listed.splitlines()] == [str(acme.run_id)]
    assert "tenant=acme" in listed
    assert uuid.UUID(listed.split()[0]) == acme.run_id


def _cli_output(main: Any, argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


async def test_appends_are_announced_only_while_someone_watches(database_url: str) -> None:
    app = make_app(database_url)

    @app.function(name="one_step")
    async def one_step(ctx: durable.Context, n: int) -> int:
        return await ctx.step("double", lambda: n * 2)

    async with hearing(database_url, "durable_journal") as heard, app, running_worker(app):
        unwatched = await app.start("one_step", 1)
        await unwatched.result(timeout=20)
        before = await heard.everything_sent()  # an announcement of the append would be here
        stop = await app.watch_runs(lambda ids: None)
        try:
            watched = await app.start("one_step", 2)
            await watched.result(timeout=20)
            await until(lambda: str(watched.run_id) in heard.payloads, what="the announcement")
        finally:
            await stop()
    assert before == []


async def test_queue_depths_count_due_scheduled_and_running_runs(database_url: str) -> None:
    from durable._cli import main

    app = make_app(database_url)
    _waiting(app, queue="reports")
    async with app:
        await app.start_many("waiting", ["a", "b"])
        await app.start("waiting", "later", delay=timedelta(hours=1))
        depths = (await app.capacity()).queues
    [reports] = depths
    assert (reports.queue, reports.pending, reports.scheduled, reports.running) == (
        "reports",
        2,
        1,
        0,
    )
    assert reports.oldest_pending_age is not None
    printed = await asyncio.to_thread(_cli_output, main, ["--database-url", database_url, "queues"])
    header, row = printed.splitlines()
    assert header.split()[:4] == ["queue", "pending", "scheduled", "running"]
    assert row.split()[:4] == ["reports", "2", "1", "0"]
