"""How a worker claims from the queue: at most half its slots in one claim, so that under a full
queue one half's claim or ends are in the database while the other half runs, and claims
again at once until every slot is filled."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import durable
from tests.helpers import make_app, running_worker, until

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("concurrency", [1, 2, 7])
async def test_a_worker_claims_half_its_slots_at_a_time_and_fills_them_all(
    database_url: str, concurrency: int
) -> None:
    # No poll in sight: the slots are filled by the claims one wake-up makes, or not at all.
    app = make_app(database_url, poll_interval=timedelta(minutes=10))
    gate = asyncio.Event()
    running: set[int] = set()
    most = 0

    async def hold(n: int) -> int:
        nonlocal most
        running.add(n)
        most = max(most, len(running))
        await gate.wait()
        running.discard(n)
        return n

    @app.function(name="held")
    async def held(ctx: durable.Context, n: int) -> int:
        return await ctx.step("hold", hold, n)

    async with app:
        handles = await app.start_many(held, range(3 * concurrency))  # queued: no worker yet
        store = app._connection.store  # the test looks inside on purpose: it counts claims
        original = store.claim_due
        asked: list[tuple[int, int]] = []

        async def claim_due(functions: Any, limit: int, *args: Any, **kwargs: Any) -> Any:
            claims, due, now = await original(functions, limit, *args, **kwargs)
            asked.append((limit, len(claims)))
            return claims, due, now

        store.claim_due = claim_due  # type: ignore[method-assign]
        async with running_worker(app, concurrency=concurrency):
            await until(lambda: len(running) == concurrency, what="every slot running a run")
            half = -(-concurrency // 2)
            assert all(limit <= half for limit, _got in asked), asked
            assert sum(got for _limit, got in asked) == concurrency
            gate.set()
            assert [await h.result(timeout=30) for h in handles] == list(range(3 * concurrency))
    assert most == concurrency  # never more runs at once than slots
