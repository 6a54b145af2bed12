"""Runs on real Postgres, in process: journal, replay, steps, retries, determinism."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

import durable
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


class Signup(BaseModel):
    user_id: str
    email: str


class Receipt(BaseModel):
    charge_id: str
    cents: int


async def test_a_run_executes_steps_and_returns_the_validated_result(database_url: str) -> None:
    app = make_app(database_url)

    async def charge(card: str, cents: int) -> Receipt:
        return Receipt(charge_id=f"ch_{card}", cents=cents)

    def double(n: int) -> int:  # sync: runs in a thread
        return 2 * n

    @app.function()
    async def order(ctx: durable.Context, cents: int) -> dict[str, int | str]:
        receipt = await ctx.step("charge", charge, "card1", cents)
        assert isinstance(receipt, Receipt)
        doubled = await ctx.step("double", double, receipt.cents)
        return {"charge": receipt.charge_id, "doubled": doubled}

    async with app, running_worker(app):
        run = await app.start(order, 21)
        assert await run.result(timeout=20) == {"charge": "ch_card1", "doubled": 42}
        assert await run.status() == "completed"
        entries = await run.journal()
        assert [(e.position, e.kind, e.name) for e in entries] == [
            ("0", "step", "charge"),
            ("1", "step", "double"),
        ]


async def test_replay_returns_recorded_results_without_running_steps_again(
    database_url: str,
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    ran: Counter[str] = Counter()

    async def work(name: str) -> Receipt:
        ran[name] += 1
        return Receipt(charge_id=name, cents=len(name))

    seen_types: list[type] = []

    @app.function()
    async def flow(ctx: durable.Context) -> list[str]:
        first = await ctx.step("first", work, "first")
        seen_types.append(type(first))
        await ctx.sleep(0.3)  # suspends: the rest of the run is a replay
        second = await ctx.step("second", work, "second")
        seen_types.append(type(first))
        return [first.charge_id, second.charge_id]

    async with app, running_worker(app):
        run = await app.start(flow)
        assert await run.result(timeout=20) == ["first", "second"]
        info = await run.info()
    assert ran == {"first": 1, "second": 1}
    assert info.attempt == 2  # claimed again after the sleep: the first step was replayed
    assert seen_types == [Receipt, Receipt, Receipt]


async def test_parallel_steps_replay_in_call_order_whatever_order_they_completed(
    database_url: str,
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    ran: Counter[str] = Counter()
    gates = {name: asyncio.Event() for name in ("a", "b", "c")}

    async def slow(name: str) -> str:
        ran[name] += 1
        await gates[name].wait()
        return name.upper()

    async def branch(ctx: durable.Context, name: str) -> list[str]:
        one = await ctx.step(f"{name}-1", slow, name)
        two = await ctx.step(f"{name}-2", lambda: f"{one}!")
        return [one, two]

    @app.function()
    async def fan(ctx: durable.Context) -> list[list[str]]:
        results = await asyncio.gather(*(branch(ctx, n) for n in ("a", "b", "c")))
        await ctx.sleep(0.2)
        tail = await ctx.step("tail", lambda: "done")
        return [*results, [tail]]

    async with app, running_worker(app):
        run = await app.start(fan)
        await until(lambda: ran["c"] == 1, what="all branches started")
        for name in ("c", "a", "b"):  # complete in the opposite of call order
            gates[name].set()
        result = await run.result(timeout=20)
        entries = await run.journal()
    assert result == [["A", "A!"], ["B", "B!"], ["C", "C!"], ["done"]]
    assert ran == {"a": 1, "b": 1, "c": 1}
    positions = {e.name: e.position for e in entries}
    assert positions["a-1"] == "0:0"
    assert positions["a-2"] == "0:1"
    assert positions["c-1"] == "2:0"
    assert positions["tail"] == "1"


async def test_step_failures_are_retried_then_raised_identically_on_replay(
    database_url: str,
) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    attempts: Counter[str] = Counter()

    @durable.step(retries=2, backoff=durable.Backoff(initial=timedelta(milliseconds=5)))
    async def ship(order_id: str) -> str:
        attempts["ship"] += 1
        raise RuntimeError(f"carrier refused {order_id}")

    async def refund(order_id: str) -> str:
        attempts["refund"] += 1
        return f"refunded {order_id}"

    caught: list[tuple[str, str]] = []

    @app.function()
    async def order(ctx: durable.Context, order_id: str) -> str:
        try:
            await ctx.step("ship", ship, order_id)
        except durable.StepFailed as failure:
            caught.append((failure.error.type, failure.error.message))
            outcome = await ctx.step("refund", refund, order_id)
        await ctx.sleep(0.2)  # forces a replay of the failure and the compensation
        return outcome

    async with app, running_worker(app):
        run = await app.start(order, "o1")
        assert await run.result(timeout=20) == "refunded o1"
    assert attempts == {"ship": 3, "refund": 1}
    assert caught == [("RuntimeError", "carrier refused o1")] * 2


async def test_an_exception_escaping_the_function_fails_the_run(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def broken(ctx: durable.Context) -> None:
        await ctx.step("ok", lambda: 1)
        raise ValueError("bad state")

    async with app, running_worker(app):
        run = await app.start(broken)
        with pytest.raises(durable.RunFailed) as failure:
            await run.result(timeout=20)
        assert await run.status() == "failed"
    assert failure.value.error.type == "ValueError"
    assert failure.value.error.message == "bad state"


async def test_journaled_helpers_return_the_recorded_values_on_replay(database_url: str) -> None:
    app = make_app(database_url, short_wait=timedelta(0))
    observed: list[tuple[datetime, uuid.UUID, float]] = []

    @app.function()
    async def helpers(ctx: durable.Context) -> None:
        values = (await ctx.now(), await ctx.uuid(), await ctx.random())
        observed.append(values)
        await ctx.sleep(0.2)

    async with app, running_worker(app):
        await (await app.start(helpers)).result(timeout=20)
    assert len(observed) == 2
    assert observed[0] == observed[1]
    assert isinstance(observed[0][1], uuid.UUID)


async def _redeploy_under_a_waiting_run(
    database_url: str,
    v1: Callable[[durable.Context], Awaitable[Any]],
    v2: Callable[[durable.Context], Awaitable[Any]],
) -> durable.RunInfo:
    """Run ``v1`` until it waits for the event "go", then serve ``v2`` under the same name, send
    "go", and return the run once it is paused."""
    first = make_app(database_url)
    first.function(name="drifting")(v1)
    async with first, running_worker(first):
        run = await first.start(v1)
        await until(lambda: status_is(run, "suspended"), what="suspended")
    second = make_app(database_url)
    second.function(name="drifting")(v2)
    async with second, running_worker(second):
        await second.send_event("go")
        handle = second.get_run(run.run_id)
        await until(lambda: status_is(handle, "paused"), what="paused")
        return await handle.info()


async def test_a_renamed_step_pauses_the_run_with_both_names_and_the_position(
    database_url: str,
) -> None:
    async def v1(ctx: durable.Context) -> None:
        await ctx.step("charge", lambda: 1)
        await ctx.wait_for_event("go")

    async def v2(ctx: durable.Context) -> None:
        await ctx.step("charge-card", lambda: 1)
        await ctx.wait_for_event("go")

    info = await _redeploy_under_a_waiting_run(database_url, v1, v2)
    assert info.error is not None
    assert info.error.type == "NonDeterminismError"
    assert "position 0" in info.error.message
    assert "'charge'" in info.error.message
    assert "'charge-card'" in info.error.message


async def test_except_exception_cannot_swallow_non_determinism(database_url: str) -> None:
    async def v1(ctx: durable.Context) -> str:
        await ctx.step("a", lambda: 1)
        await ctx.wait_for_event("go")
        return "v1"

    async def v2(ctx: durable.Context) -> str:
        with contextlib.suppress(Exception):
            await ctx.step("b", lambda: 1)
        return "carried on"

    info = await _redeploy_under_a_waiting_run(database_url, v1, v2)
    assert info.status == "paused"
    assert info.result is None


async def test_a_ctx_call_inside_a_step_body_is_refused(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def nested(ctx: durable.Context) -> None:
        async def inner() -> int:
            return await ctx.step("inner", lambda: 1)

        await ctx.step("outer", inner)

    async with app, running_worker(app):
        with pytest.raises(durable.RunFailed, match="outside its run"):
            await (await app.start(nested)).result(timeout=20)


async def test_a_step_result_that_cannot_be_stored_fails_with_run_step_and_type(
    database_url: str,
) -> None:
    app = make_app(database_url)

    class Opaque:
        pass

    @app.function()
    async def leaky(ctx: durable.Context) -> None:
        await ctx.step("make-opaque", Opaque)

    async with app, running_worker(app):
        run = await app.start(leaky)
        with pytest.raises(durable.RunFailed) as failure:
            await run.result(timeout=20)
    message = failure.value.error.message
    assert failure.value.error.type == "SerializationError"
    assert str(run.run_id) in message
    assert "'make-opaque'" in message
    assert "Opaque" in message


async def test_the_same_idempotency_key_returns_the_existing_run(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def once(ctx: durable.Context, n: int) -> int:
        return n

    async with app:
        first = await app.start(once, 1, idempotency_key="k1")
        second = await app.start(once, 2, idempotency_key="k1")
        assert first.run_id == second.run_id
        assert len(await app.list_runs()) == 1


async def test_invalid_input_raises_at_start_and_stores_nothing(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def onboarding(ctx: durable.Context, signup: Signup) -> None:
        return None

    async with app:
        with pytest.raises(durable.InvalidInput, match="email"):
            await app.start(onboarding, {"user_id": "u1"})  # type: ignore[arg-type]
        with pytest.raises(durable.InvalidInput):
            await app.send_event("x", payload=object())
        assert await app.list_runs() == []


async def test_a_run_of_a_function_no_worker_registers_waits(database_url: str) -> None:
    app = make_app(database_url)

    @app.function()
    async def known(ctx: durable.Context) -> str:
        return "ok"

    async with app, running_worker(app):
        orphan = await app.start("some.module.unknown", {"x": 1})
        done = await app.start(known)
        assert await done.result(timeout=20) == "ok"
        assert await orphan.status() == "pending"


async def test_unknown_run_ids_raise_run_not_found(database_url: str) -> None:
    async with make_app(database_url) as app:
        with pytest.raises(durable.RunNotFound):
            await app.get_run(uuid.uuid4()).status()


async def test_the_journal_rejects_update_and_delete(
    database_url: str, db: asyncpg.Connection
) -> None:
    app = make_app(database_url)

    @app.function()
    async def one(ctx: durable.Context) -> int:
        return await ctx.step("one", lambda: 1)

    async with app, running_worker(app):
        run = await app.start(one)
        await run.result(timeout=20)
    with pytest.raises(asyncpg.PostgresError, match="append-only") as update:
        await db.execute("UPDATE durable.journal SET name = 'two' WHERE run_id = $1", run.run_id)
    assert update.value.sqlstate == "DU001"
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("DELETE FROM durable.journal WHERE run_id = $1", run.run_id)
    assert await db.fetchval("SELECT count(*) FROM durable.journal") == 1
