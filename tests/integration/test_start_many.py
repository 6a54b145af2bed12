"""app.start_many: many runs in one round trip, validated all before any is stored."""

from __future__ import annotations

import pytest

import durable
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres


async def test_start_many_starts_every_run_and_returns_handles_in_order(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(name="square")
    async def square(ctx: durable.Context, n: int) -> int:
        return await ctx.step("square", lambda: n * n)

    async with app:
        handles = await app.start_many(square, range(50))
        async with running_worker(app):
            assert [await h.result(timeout=30) for h in handles] == [n * n for n in range(50)]


async def test_one_invalid_input_starts_none_and_keys_return_existing_runs(
    database_url: str,
) -> None:
    app = make_app(database_url)

    @app.function(name="square")
    async def square(ctx: durable.Context, n: int) -> int:
        return n * n

    async with app:
        with pytest.raises(durable.InvalidInput, match="start 'square'"):
            await app.start_many(square, [1, "two", 3])
        assert await app.list_runs() == []
        with pytest.raises(durable.InvalidInput, match="distinct"):
            await app.start_many(square, [1, 2], idempotency_keys=["k", "k"])
        with pytest.raises(durable.InvalidInput, match="2 inputs but 1"):
            await app.start_many(square, [1, 2], idempotency_keys=["k"])
        first = await app.start(square, 7, idempotency_key="seven")
        again = await app.start_many(square, [7, 8], idempotency_keys=["seven", None])
        assert again[0].run_id == first.run_id
        assert len(await app.list_runs()) == 2
