"""Timers claimed ahead: a worker claims a run whose timer falls due within the next moments
(at most ``short_wait``, 50 ms by default) before it is due, replays it at once and holds its
first live call until then, so that it is not late by a claim's round trip, a journal load and
a replay; it never resumes early, and a cancellation while it waits ends it at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import pytest

import durable
from engine import _worker
from engine._records import Claim
from tests.helpers import claims_seen, make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


async def test_a_sleeping_run_is_claimed_before_it_is_due_and_resumes_no_earlier(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(name="nap")
    async def nap(ctx: durable.Context) -> float:
        await ctx.sleep(timedelta(milliseconds=600))  # past short_wait: the run suspends
        return await ctx.step("woke", time.time)

    await woken_no_earlier_than_due(app, nap)


async def woken_no_earlier_than_due(
    app: durable.App, nap: Callable[[durable.Context], Awaitable[float]]
) -> datetime:
    """Run ``nap`` (a sleep past short_wait, then a step returning the time) and check that it
    was claimed ahead of its timer and resumed no earlier; returns the wake time."""
    async with app, running_worker(app, concurrency=4):
        claims = claims_seen(app)
        handle = await app.start(nap, None)
        woke = await handle.result(timeout=20)
        [sleep] = [e for e in await handle.journal() if e.kind == "sleep"]
    wake_at = datetime.fromisoformat(sleep.value["wake_at"])
    resumed = claims[handle.run_id][-1]
    assert resumed.due_at == wake_at
    assert resumed.db_now < wake_at  # claimed ahead of its timer
    assert woke >= wake_at.timestamp()  # and not resumed before it
    return wake_at


async def test_a_run_claimed_ahead_replays_at_once_and_its_continuation_waits_for_the_timer(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "_CLAIM_AHEAD", timedelta(seconds=1.5))
    # A lease well past the claim's lead: the worker's own runs are not due again meanwhile.
    app = make_app(database_url, short_wait=timedelta(seconds=1.5), lease=timedelta(seconds=10))
    began: list[float] = []  # each attempt passes the top of the function: replayed or live

    @app.function(name="nap_replayed_ahead")
    async def nap(ctx: durable.Context) -> float:
        began.append(time.time())
        await ctx.sleep(timedelta(seconds=2))  # past short_wait: the run suspends
        return await ctx.step("woke", time.time)

    wake_at = await woken_no_earlier_than_due(app, nap)
    assert len(began) == 2
    assert began[1] < wake_at.timestamp()  # replayed before the timer fell due


async def died_after_step_a(
    app: durable.App, function: str, run_id: uuid.UUID, *, lease: timedelta
) -> Claim:
    """Play a worker that claims the run (the only due run of ``function``) for ``lease``,
    journals its first step "a" (the time) and dies: the run is due again once the lease
    expires."""
    store = app._connection.store  # a test that plays a worker looks inside on purpose
    [ghost], _due, _now = await store.claim_due([function], 1, "ghost", lease)
    assert ghost.run_id == run_id
    assert await store.append(run_id, ghost.attempt, "0", "step", "a", time.time())
    return ghost


async def test_a_run_replayed_ahead_makes_no_live_call_before_it_is_due(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run claimed ahead because another worker's lease on it is about to expire (that
    worker died after step "a") replays "a" at once, and runs step "b" only once the lease
    has expired: a live call waits for the due time, whatever made the run due."""
    monkeypatch.setattr(_worker, "_CLAIM_AHEAD", timedelta(seconds=1.5))
    # A lease well past the claim's lead: the worker's own runs are not due again meanwhile.
    app = make_app(database_url, short_wait=timedelta(seconds=1.5), lease=timedelta(seconds=10))

    @app.function(name="taken_over")
    async def taken_over(ctx: durable.Context) -> float:
        await ctx.step("a", time.time)
        return await ctx.step("b", time.time)

    async with app:
        handle = await app.start(taken_over, None)
        ghost = await died_after_step_a(
            app, "taken_over", handle.run_id, lease=timedelta(seconds=2)
        )
        claims = claims_seen(app)
        async with running_worker(app, concurrency=4):
            b_ran = await handle.result(timeout=20)
    taken = claims[handle.run_id][-1]
    assert taken.attempt == ghost.attempt + 1
    assert taken.due_at is not None
    assert taken.db_now < taken.due_at  # claimed ahead
    assert b_ran >= taken.due_at.timestamp()  # step "b" waited for the lease to expire


async def test_a_run_cancelled_while_it_waits_to_be_due_ends_without_resuming(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Claimed three seconds ahead here, so that the cancellation surely comes while it waits.
    monkeypatch.setattr(_worker, "_CLAIM_AHEAD", timedelta(seconds=3))
    app = make_app(database_url, short_wait=timedelta(seconds=3))
    resumed: list[str] = []

    @app.function(name="long_nap")
    async def long_nap(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(seconds=5))
        await ctx.step("woke", resumed.append, "woke")

    async with app, running_worker(app, concurrency=4):
        claims = claims_seen(app)
        handle = await app.start(long_nap, None)

        def ahead() -> bool:  # its first claim, when the worker was not serving yet, is not
            seen = claims.get(handle.run_id, [])
            return any(c.due_at is not None and c.due_at > c.db_now for c in seen)

        await until(ahead, what="the run claimed ahead of its timer")
        await handle.cancel("changed our mind")
        await until(lambda: status_is(handle, "cancelled"), timeout=2.5, what="cancelled")
    assert resumed == []


async def test_a_run_replayed_ahead_and_cancelled_before_it_is_due_ends_cancelled(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken over ahead of a dead worker's expiring lease, a run whose every step is journaled
    replays to its end at once and waits for the due time before it writes that end; a
    cancellation meanwhile ends it as cancelled, not completed."""
    monkeypatch.setattr(_worker, "_CLAIM_AHEAD", timedelta(seconds=3))
    app = make_app(database_url, short_wait=timedelta(seconds=3), lease=timedelta(seconds=10))

    @app.function(name="all_journaled")
    async def all_journaled(ctx: durable.Context) -> float:
        return await ctx.step("a", time.time)

    async with app:
        handle = await app.start(all_journaled, None)
        await died_after_step_a(app, "all_journaled", handle.run_id, lease=timedelta(seconds=3))
        claims = claims_seen(app)
        async with running_worker(app, concurrency=4):
            await until(lambda: handle.run_id in claims, what="the run taken over ahead")
            assert await handle.cancel("changed our mind") == "requested"
            await until(lambda: status_is(handle, "cancelled"), timeout=2.5, what="cancelled")
