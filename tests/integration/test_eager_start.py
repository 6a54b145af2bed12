"""Eager starts: a run started in a process whose worker serves its function and has a slot
free is claimed by that worker in the start's own statement and runs at once, with no
notification and no claim; any other run waits in the queue as before."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import durable
from engine import FunctionSpec, PostgresStore
from tests.helpers import claims_seen, make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def app_with(database_url: str, **options: Any) -> tuple[durable.App, Callable[..., Any]]:
    app = make_app(database_url, **options)
    gates: dict[str, asyncio.Event] = {}

    async def wait_for_gate(name: str) -> str:
        await gates.setdefault(name, asyncio.Event()).wait()
        return name

    @app.function(name="gated")
    async def gated(ctx: durable.Context, name: str) -> str:
        return await ctx.step("gate", wait_for_gate, name)

    def open_gate(name: str) -> None:
        gates.setdefault(name, asyncio.Event()).set()

    return app, open_gate


async def serving(app: durable.App, open_gate: Callable[[str], None]) -> None:
    """Return once the app's worker claims: a first run has gone through it."""
    open_gate("first")
    handle = await app.start("gated", "first")
    assert await handle.result(timeout=20) == "first"


async def test_a_run_started_beside_a_free_worker_runs_there_without_a_claim(
    database_url: str,
) -> None:
    app, open_gate = app_with(database_url)
    async with app, running_worker(app, concurrency=4):
        await serving(app, open_gate)
        claimed = claims_seen(app)
        handle = await app.start("gated", "second")
        info = await handle.info()
        assert (info.status, info.attempt) == ("running", 1)  # claimed by the start itself
        open_gate("second")
        assert await handle.result(timeout=20) == "second"
        assert handle.run_id not in claimed


async def test_a_run_named_by_its_starter_is_one_run_however_often_it_is_started(
    database_url: str, db: asyncpg.Connection
) -> None:
    # Only a run whose id the start made itself is fresh (not locked nor looked for); a named
    # one started again beside a free worker is found, not inserted claimed a second time.
    app, open_gate = app_with(database_url)
    async with app, running_worker(app, concurrency=4):
        await serving(app, open_gate)
        named = uuid.uuid4()
        first = await app.start("gated", "named", run_id=named)
        again = await app.start("gated", "named", run_id=named)
        assert first.run_id == again.run_id == named
        unnamed = await app.start("gated", "unnamed")
        assert unnamed.run_id != named
        open_gate("named")
        open_gate("unnamed")
        assert await first.result(timeout=20) == "named"
        assert await unnamed.result(timeout=20) == "unnamed"
        info = await first.info()
        assert info.attempt == 1
    assert await db.fetchval("SELECT count(*) FROM durable.runs WHERE id = $1", named) == 1


async def test_a_full_worker_leaves_the_run_to_the_queue_and_claims_it_when_a_slot_frees(
    database_url: str,
) -> None:
    # No poll in sight: only the end of the first run can make the worker claim again.
    app, open_gate = app_with(database_url, poll_interval=timedelta(minutes=10))
    async with app, running_worker(app, concurrency=1):
        await serving(app, open_gate)
        claimed = claims_seen(app)
        busy = await app.start("gated", "busy")
        # Eagerly, or claimed once the first run has left its slot (its result can come first).
        await until(lambda: status_is(busy, "running"), what="the busy run running")
        queued = await app.start("gated", "queued")
        info = await queued.info()
        assert (info.status, info.attempt) == ("pending", 0)
        open_gate("queued")
        open_gate("busy")
        assert await busy.result(timeout=20) == "busy"
        assert await queued.result(timeout=20) == "queued"
        assert queued.run_id in claimed


async def test_a_delayed_run_is_not_claimed_by_its_start(database_url: str) -> None:
    app, open_gate = app_with(database_url)
    async with app, running_worker(app, concurrency=4):
        await serving(app, open_gate)
        later = await app.start("gated", "later", delay=timedelta(hours=1))
        info = await later.info()
        assert (info.status, info.attempt) == ("pending", 0)


async def test_with_eager_start_off_every_run_goes_through_the_queue(database_url: str) -> None:
    app, open_gate = app_with(database_url, eager_start=False)
    async with app, running_worker(app, concurrency=4):
        await serving(app, open_gate)
        claimed = claims_seen(app)
        open_gate("queued")
        handle = await app.start("gated", "queued")
        assert await handle.result(timeout=20) == "queued"
        assert handle.run_id in claimed


async def gate(ctx: durable.Context, name: str) -> str:
    return name


async def test_a_run_whose_eager_worker_died_is_claimed_again_when_its_lease_ends(
    database_url: str,
) -> None:
    store = await PostgresStore.connect(database_url, max_size=2)
    spec = FunctionSpec.describe(gate, "gated")
    try:
        run = spec.new_run("orphan", run_id=uuid.uuid4())
        found, created, claim = await store.start_claimed(
            run, "worker-that-died", timedelta(seconds=1), ["gated"], ["v1"]
        )
        assert created
        assert claim is not None
        assert claim.attempt == 1
        assert found == run.run_id
    finally:
        await store.close()
    app, open_gate = app_with(database_url)
    open_gate("orphan")
    async with app, running_worker(app, concurrency=4):
        handle = app.get_run(found)
        assert await handle.result(timeout=20) == "orphan"
        info = await until(handle.info, what="the run's info")
        assert info.attempt == 2  # the dead worker's claim was attempt 1


async def test_a_start_leaves_alone_the_slots_a_claim_in_flight_may_fill(
    database_url: str,
) -> None:
    app, open_gate = app_with(database_url)
    async with app, running_worker(app, concurrency=1):
        await serving(app, open_gate)
        store = app._connection.store  # the test looks inside on purpose: it holds a claim
        original = store.claim_due
        claiming, go_on = asyncio.Event(), asyncio.Event()

        async def held_claim_due(*args: Any, **kwargs: Any) -> Any:
            claiming.set()
            await go_on.wait()
            return await original(*args, **kwargs)

        store.claim_due = held_claim_due  # type: ignore[method-assign]
        try:
            await claiming.wait()  # the worker's next poll, held in flight
            later = await app.start("gated", "later")
            info = await later.info()
        finally:
            store.claim_due = original  # type: ignore[method-assign]
            go_on.set()
        assert (info.status, info.attempt) == ("pending", 0)  # the claim may take the slot
        open_gate("later")
        assert await later.result(timeout=20) == "later"
