"""Lease renewal says "lost" only when a claim was lost, and a shutdown never hands back a run
whose step still runs in a thread of this process."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

import durable
from engine import FunctionSpec, Listener, PostgresStore, Worker, WorkerOptions
from engine._clock import DatabaseTime, SystemClock
from engine._run_state import Execution
from engine._runner import Runner
from tests.helpers import until

pytestmark = pytest.mark.postgres


class RacingStore(PostgresStore):
    """Holds a run's finish, once committed, until a lease renewal has run after it: the race
    that made a fault-free load log "lease lost" for runs that had completed."""

    finished: asyncio.Event
    renewed_after: asyncio.Event

    async def finish(self, *args: Any, **kwargs: Any) -> bool:
        ended = await super().finish(*args, **kwargs)
        self.finished.set()
        await self.renewed_after.wait()
        return ended

    async def renew_leases(self, *args: Any, **kwargs: Any) -> dict[Any, bool]:
        kept = await super().renew_leases(*args, **kwargs)
        if self.finished.is_set():
            self.renewed_after.set()
        return kept


async def noop(ctx: durable.Context) -> str:
    return "done"


@pytest.fixture
async def racing(database_url: str) -> AsyncIterator[RacingStore]:
    store = await RacingStore.connect(database_url, max_size=4)
    store.finished, store.renewed_after = asyncio.Event(), asyncio.Event()
    yield store
    await store.close()


async def test_a_renewal_that_races_a_completion_is_not_reported_as_a_lost_lease(
    racing: RacingStore, caplog: pytest.LogCaptureFixture
) -> None:
    spec = FunctionSpec.describe(noop, "noop")
    listener = Listener(racing.listen)
    await listener.start()
    options = WorkerOptions(concurrency=1, lease=timedelta(milliseconds=300))
    worker = Worker(racing, {"noop": spec}, listener, options)
    [(run_id, _created)] = await racing.start_runs([spec.new_run(None, run_id=uuid.uuid4())])
    serving = asyncio.create_task(worker.run())
    try:
        with caplog.at_level(logging.WARNING, logger="engine"):
            await asyncio.wait_for(racing.renewed_after.wait(), 30)
            row = await until(lambda: _completed(racing, run_id), what="the run completed")
    finally:
        worker.stop()
        await asyncio.wait_for(serving, 30)
        await listener.close()
    assert row.status == "completed"
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == []


async def _completed(store: PostgresStore, run_id: Any) -> Any:
    row = await store.get_run(run_id)
    return row if row is not None and row.status == "completed" else None


def blocking_step(started: threading.Event, release: threading.Event) -> str:
    started.set()
    release.wait(30)
    return "slept"


async def test_a_run_handed_back_at_shutdown_waits_for_its_step_thread_and_keeps_its_lease(
    database_url: str,
) -> None:
    """The grace period ends while a sync step still runs in its thread: the run's attempt is
    stopped, but the run is released only after the thread returns, and its lease is renewed
    until then, so no other worker can start the same step beside it."""
    started, release = threading.Event(), threading.Event()

    async def sleeper(ctx: durable.Context) -> str:
        return await ctx.step("block", blocking_step, started, release)

    spec = FunctionSpec.describe(sleeper, "sleeper")
    store = await PostgresStore.connect(database_url, max_size=4)
    listener = Listener(store.listen)
    await listener.start()
    lease = timedelta(milliseconds=600)
    options = WorkerOptions(concurrency=1, lease=lease, shutdown_grace=timedelta(0))
    worker = Worker(store, {"sleeper": spec}, listener, options)
    [(run_id, _created)] = await store.start_runs([spec.new_run(None, run_id=uuid.uuid4())])
    serving = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(started.wait, 30)
        worker.stop()  # grace 0: the attempt is stopped at once, its thread runs on
        first = await store.get_run(run_id)
        assert first is not None
        expiry = first.available_at
        assert expiry is not None
        # The lease is renewed past two whole leases while the thread runs: the run stays
        # this worker's, so no claim can take it.
        await until(
            lambda: _lease_beyond(store, run_id, expiry + 2 * lease),
            what="the lease renewed twice over",
        )
        assert await store.claim(["sleeper"], 1, "another-worker", lease) == []
        assert not serving.done(), "the worker returned while the step's thread still ran"
        release.set()
        await asyncio.wait_for(serving, 30)
    finally:
        release.set()
        worker.stop()
        await listener.close()
    row = await store.get_run(run_id)
    await store.close()
    assert row is not None
    assert (row.status, row.lease_owner) == ("pending", None), "handed back once the step ended"


async def _lease_beyond(store: PostgresStore, run_id: Any, moment: Any) -> bool:
    row = await store.get_run(run_id)
    return row is not None and row.available_at is not None and row.available_at > moment


async def test_a_run_handed_back_while_its_journal_loads_runs_nothing_live(
    database_url: str,
) -> None:
    """The attempt is told to stop before its state exists (its journal still loading, behind
    other loads): it replays nothing and runs no step, and the run goes back to the queue."""
    app = durable.App(database_url, lease=timedelta(seconds=5))
    ran: list[str] = []

    @app.function(name="two_steps")
    async def two_steps(ctx: durable.Context) -> None:
        await ctx.step("a", str, "a")
        await ctx.step("b", ran.append, "b")

    async with app:
        store = app._connection.store  # an attempt driven by hand, to stop it mid-load
        handle = await app.start(two_steps, None)
        [first], _due, _now = await store.claim_due(["two_steps"], 1, "w", timedelta(seconds=5))
        assert await store.append(handle.run_id, first.attempt, "0", "step", "a", "a")
        await store.release(handle.run_id, first.attempt)
        [claim], _due, _now = await store.claim_due(["two_steps"], 1, "w", timedelta(seconds=5))
        loading, go_on = asyncio.Event(), asyncio.Event()
        load = store.load_journal

        async def held_load(run_id: uuid.UUID) -> Any:
            loading.set()
            await go_on.wait()
            return await load(run_id)

        store.load_journal = held_load  # type: ignore[method-assign]
        execution = Execution(store, app.functions, DatabaseTime(SystemClock()))
        runner = Runner(execution, claim)
        attempt = asyncio.create_task(runner.execute())
        await loading.wait()
        runner.hand_back("worker shutting down")
        go_on.set()
        await attempt
        assert await handle.status() == "pending"  # handed back, for any worker
    assert ran == []
