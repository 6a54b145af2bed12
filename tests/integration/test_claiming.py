"""How a worker claims from the queue: at most half its slots in one claim, so that under a full
queue one half's claim or ends are in the database while the other half runs, and claims
again at once until every slot is filled."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import durable
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


class Gated:
    """An app whose runs each hold their slot in a step until the gate opens, and what those
    steps saw: the runs in them now, and the most at once. No poll in sight: the slots are
    filled by the claims a wake-up makes, or not at all."""

    def __init__(self, database_url: str) -> None:
        self.app = make_app(database_url, poll_interval=timedelta(minutes=10))
        self.gate = asyncio.Event()
        self.running: set[int] = set()
        self.most = 0

        @self.app.function(name="held")
        async def held(ctx: durable.Context, n: int) -> int:
            return await ctx.step("hold", self.hold, n)

        self.held = held

    async def hold(self, n: int) -> int:
        self.running.add(n)
        self.most = max(self.most, len(self.running))
        await self.gate.wait()
        self.running.discard(n)
        return n


@pytest.mark.parametrize("concurrency", [1, 2, 7])
async def test_a_worker_claims_half_its_slots_at_a_time_and_fills_them_all(
    database_url: str, concurrency: int
) -> None:
    gated = Gated(database_url)
    app = gated.app
    async with app:
        handles = await app.start_many(gated.held, range(3 * concurrency))  # queued: no worker yet
        store = app._connection.store  # the test looks inside on purpose: it counts claims
        original = store.claim_due
        asked: list[tuple[int, int]] = []

        async def claim_due(functions: Any, limit: int, *args: Any, **kwargs: Any) -> Any:
            claims, due, now = await original(functions, limit, *args, **kwargs)
            asked.append((limit, len(claims)))
            return claims, due, now

        store.claim_due = claim_due  # type: ignore[method-assign]
        async with running_worker(app, concurrency=concurrency):
            await until(lambda: len(gated.running) == concurrency, what="every slot running a run")
            half = -(-concurrency // 2)
            assert all(limit <= half for limit, _got in asked), asked
            assert sum(got for _limit, got in asked) == concurrency
            gated.gate.set()
            assert [await h.result(timeout=30) for h in handles] == list(range(3 * concurrency))
    assert gated.most == concurrency  # never more runs at once than slots


async def test_a_worker_stopped_during_a_claim_makes_no_further_claim(database_url: str) -> None:
    gated = Gated(database_url)
    app = gated.app
    async with app:
        handles = await app.start_many(gated.held, range(8))  # queued: no worker yet
        store = app._connection.store  # the test looks inside on purpose: it holds a claim
        original = store.claim_due
        claiming, go_on = asyncio.Event(), asyncio.Event()
        asked: list[int] = []

        async def claim_due(functions: Any, limit: int, *args: Any, **kwargs: Any) -> Any:
            asked.append(limit)
            claiming.set()
            await go_on.wait()
            return await original(functions, limit, *args, **kwargs)

        store.claim_due = claim_due  # type: ignore[method-assign]
        worker = asyncio.create_task(app.run_worker(concurrency=4))
        await claiming.wait()  # the first half's claim, in flight
        app.stop_workers()
        go_on.set()
        gated.gate.set()  # the runs it claimed end, and the worker with them
        await asyncio.wait_for(worker, 30)
        statuses = [await h.status() for h in handles]
    assert asked == [2]  # the second half was never asked for
    assert sorted(statuses) == ["completed"] * 2 + ["pending"] * 6


async def test_a_full_worker_told_of_new_work_waits_for_a_free_slot(database_url: str) -> None:
    # A notification that comes while every slot is busy is answered when one frees: the
    # worker's loop must not go round meanwhile (on Python 3.12 a wake left set would spin it
    # without ever yielding).
    gated = Gated(database_url)
    app = gated.app
    async with app, running_worker(app, concurrency=1):
        busy = await app.start(gated.held, 0)
        await until(lambda: status_is(busy, "running"), what="the worker full")
        [hosted] = app._hosting._hosted  # the test looks inside on purpose: it counts turns
        worker = hosted.worker
        assert worker is not None
        original = worker._claim_due
        turns = 0

        async def counted() -> float:
            nonlocal turns
            turns += 1
            return await original()

        worker._claim_due = counted  # type: ignore[method-assign]
        queued = await app.start(gated.held, 1)  # no slot: queued, and the worker notified
        await until(lambda: turns >= 1, what="the notification waking the worker")
        for _ in range(50):  # turns of the event loop in which a spinning worker would go round
            await asyncio.sleep(0)
        assert turns == 1
        gated.gate.set()
        assert [await busy.result(timeout=30), await queued.result(timeout=30)] == [0, 1]
