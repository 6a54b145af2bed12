"""Timers claimed ahead: a worker claims a run whose timer falls due within the next moments
(at most ``short_wait``, 50 ms by default) before it is due, and the run waits in the worker
until then, so that it is not late by a claim's round trip and a journal load; it never resumes
early, and a cancellation while it waits ends it at once."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

import durable
from engine import _worker
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
