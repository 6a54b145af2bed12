"""The flow-control rules of the store contract, on PostgreSQL: claim order by priority,
concurrency slots and their strategies, rate limits, child runs, cancellation, delayed starts,
start expiry and execution deadlines."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from engine import NewRun, Store
from engine.errors import ConfigurationError
from tests.contract.conftest import Subject

pytestmark = pytest.mark.postgres

LEASE = timedelta(seconds=30)


async def _start(store: Store, **options: object) -> uuid.UUID:
    run = NewRun(uuid.uuid4(), str(options.pop("function", "f")), None, **options)  # type: ignore[arg-type]
    [(run_id, created)] = await store.start_runs([run])
    assert created
    return run_id


async def _claim_ids(store: Store, limit: int = 10) -> list[uuid.UUID]:
    return [c.run_id for c in await store.claim(["f"], limit, "w", LEASE)]


async def _status(store: Store, run_id: uuid.UUID) -> str:
    row = await store.get_run(run_id)
    assert row is not None
    return row.status


async def test_the_highest_priority_is_claimed_first_and_equal_ones_keep_arrival_order(
    subject: Subject,
) -> None:
    store, clock = subject.store, subject.clock
    low = []
    for _ in range(3):
        low.append(await _start(store))
        clock.advance(timedelta(milliseconds=1))
    high = await _start(store, priority=5)
    clock.advance(timedelta(milliseconds=1))
    middle = await _start(store, priority=1)
    assert await _claim_ids(store, 2) == [high, middle]
    assert await _claim_ids(store) == low


async def test_a_full_key_parks_its_runs_and_a_freed_slot_goes_to_the_oldest(
    subject: Subject,
) -> None:
    store, clock = subject.store, subject.clock
    keyed = []
    for _ in range(3):
        keyed.append(await _start(store, concurrency_key="a", concurrency_limit=1))
        clock.advance(timedelta(milliseconds=1))
    a1, a2, a3 = keyed
    b1 = await _start(store, concurrency_key="b", concurrency_limit=1)
    claims = {c.run_id: c for c in await store.claim(["f"], 10, "w", LEASE)}
    assert set(claims) == {a1, b1}  # a2 and a3 wait for a's only slot
    assert await _claim_ids(store) == []
    assert await store.finish(a1, claims[a1].attempt, "completed")
    [second] = await store.claim(["f"], 10, "w", LEASE)
    assert second.run_id == a2
    assert await store.suspend(a2, second.attempt, clock.now() + timedelta(seconds=10))
    assert await _claim_ids(store) == [a3]  # a suspended run gives its slot back
    clock.advance(timedelta(seconds=10))
    assert await _claim_ids(store) == []  # a2 is due again, but a3 holds the slot now


async def test_a_run_may_keep_its_slot_while_suspended(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    options = {"concurrency_key": "k", "concurrency_limit": 1, "slot_while_suspended": True}
    first = await _start(store, **options)
    second = await _start(store, **options)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.run_id == first
    assert await store.suspend(first, claim.attempt, clock.now() + timedelta(minutes=1))
    assert await _claim_ids(store) == []
    clock.advance(timedelta(minutes=1))
    assert await _claim_ids(store) == [first]
    assert await _status(store, second) == "pending"


async def test_cancel_newest_cancels_a_new_run_of_a_full_key(subject: Subject) -> None:
    store = subject.store
    options = {"concurrency_key": "k", "concurrency_limit": 1, "strategy": "cancel_newest"}
    first = await _start(store, **options)
    newest = await _start(store, **options)
    assert await _status(store, newest) == "cancelled"
    assert await _claim_ids(store) == [first]


async def test_cancel_in_progress_cancels_the_oldest_runs_of_the_key(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    options = {"concurrency_key": "k", "concurrency_limit": 1, "strategy": "cancel_in_progress"}
    waiting = await _start(store, **options)
    clock.advance(timedelta(seconds=1))
    running = await _start(store, **options)
    assert await _status(store, waiting) == "cancelled"
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.run_id == running
    clock.advance(timedelta(seconds=1))
    newest = await _start(store, **options)
    row = await store.get_run(running)
    assert row is not None
    assert row.cancel_requested  # running: its worker is told and ends it
    assert await store.renew_leases([(running, claim.attempt)], "w", LEASE) == {running: True}
    assert await _claim_ids(store) == []  # the newest awaits the slot the running one holds
    assert await store.finish(running, claim.attempt, "cancelled")
    assert await _claim_ids(store) == [newest]


async def test_cancelling_ends_idle_runs_at_once_and_asks_running_ones_with_their_children(
    subject: Subject,
) -> None:
    store, clock = subject.store, subject.clock
    parent = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    child = NewRun(uuid.uuid4(), "f", None, parent_id=parent)
    assert await store.start_child(parent, claim.attempt, "0", child)
    assert await store.cancel(parent, "operator") == "requested"
    assert await _status(store, child.run_id) == "cancelled"
    assert await store.suspend(parent, claim.attempt, clock.now() + timedelta(hours=1))
    row = await store.get_run(parent)
    assert row is not None
    assert (row.status, row.error["type"]) == ("cancelled", "RunCancelled")
    assert await store.cancel(parent, "again") == "finished"
    assert await store.cancel(uuid.uuid4(), "unknown") == "not_found"
    idle = await _start(store)
    assert await store.cancel(idle, "operator") == "cancelled"
    assert await _claim_ids(store) == []


async def test_a_child_is_started_once_and_its_end_wakes_its_waiting_parent(
    subject: Subject,
) -> None:
    store = subject.store
    parent = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    child = NewRun(uuid.uuid5(parent, "0"), "g", {"x": 1}, parent_id=parent)
    assert await store.start_child(parent, claim.attempt, "0", child)
    assert await store.start_child(parent, claim.attempt, "1", child)  # same id: found, kept
    assert [c.id for c in await store.list_children(parent)] == [child.run_id]
    waiting = await store.await_child(parent, claim.attempt, "2", "g", child.run_id)
    assert waiting.outcome == "waiting"
    assert await store.suspend(parent, claim.attempt, None)
    assert await _claim_ids(store) == []
    [child_claim] = await store.claim(["g"], 10, "w", LEASE)
    assert await store.finish(child.run_id, child_claim.attempt, "completed", result=[7])
    [again] = await store.claim(["f"], 10, "w", LEASE)
    assert again.run_id == parent
    done = await store.await_child(parent, again.attempt, "2", "g", child.run_id)
    assert (done.outcome, done.status, done.result) == ("done", "completed", [7])
    journal = await store.load_journal(parent)
    assert [(e.position, e.kind) for e in journal] == [
        ("0", "start"),
        ("1", "start"),
        ("2", "join"),
    ]


async def test_a_child_ending_while_its_parent_runs_makes_the_parent_due_when_it_suspends(
    subject: Subject,
) -> None:
    store = subject.store
    parent = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    child = NewRun(uuid.uuid4(), "g", None, parent_id=parent)
    assert await store.start_child(parent, claim.attempt, "0", child)
    [child_claim] = await store.claim(["g"], 10, "w", LEASE)
    assert (await store.await_child(parent, claim.attempt, "1", "g", child.run_id)).outcome == (
        "waiting"
    )
    assert await store.finish(child.run_id, child_claim.attempt, "failed", error={"type": "E"})
    assert await store.suspend(parent, claim.attempt, None)
    assert await _claim_ids(store) == [parent]


async def test_rate_limits_are_a_sliding_window_log_with_reservations_in_turn(
    subject: Subject,
) -> None:
    store, clock = subject.store, subject.clock
    await store.define_rate_limit("api", 2, timedelta(seconds=10))
    start = clock.now()
    assert await store.take_rate("api", "t1", 1, "a") is None
    clock.advance(timedelta(seconds=1))
    assert await store.take_rate("api", "t1", 1, "b") is None
    assert await store.take_rate("api", "t2", 2, "c") is None  # each key has its own budget
    clock.advance(timedelta(seconds=1))
    # The window is full: the units are reserved when enough leave it, for waiters in turn.
    assert await store.take_rate("api", "t1", 1, "d") == start + timedelta(seconds=10)
    assert await store.take_rate("api", "t1", 1, "e") == start + timedelta(seconds=11)
    assert await store.take_rate("api", "t1", 2, "f") == start + timedelta(seconds=21)
    assert await store.take_rate("api", "t1", 1, "d") == start + timedelta(seconds=10)  # kept
    clock.advance(timedelta(seconds=8) - timedelta(microseconds=1))
    assert await store.take_rate("api", "t1", 1, "d") == start + timedelta(seconds=10)
    clock.advance(timedelta(microseconds=1))  # the first grant leaves the window exactly now
    assert await store.take_rate("api", "t1", 1, "d") is None  # collected, not granted twice
    # Its holder's next take is new: f's two units at 21 s fill every window until 31 s.
    assert await store.take_rate("api", "t1", 1, "d") == start + timedelta(seconds=31)
    with pytest.raises(ConfigurationError):
        await store.take_rate("undeclared", "", 1, "x")
    with pytest.raises(ConfigurationError):
        await store.take_rate("api", "t3", 3, "x")


async def test_a_start_rate_limit_delays_runs_beyond_the_budget(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    await store.define_rate_limit("starts", 2, timedelta(seconds=10))
    runs = [await _start(store, rate_limit="starts") for _ in range(3)]
    assert await _claim_ids(store) == runs[:2]
    clock.advance(timedelta(seconds=10))
    assert await _claim_ids(store) == runs[2:]


async def test_delays_start_timeouts_and_deadlines_are_kept(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    delayed = await _start(store, delay=timedelta(minutes=5))
    expiring = await _start(store, start_timeout=timedelta(minutes=1))
    bounded = await _start(store, run_timeout=timedelta(minutes=10))
    claims = {c.run_id: c for c in await store.claim(["f"], 10, "w", LEASE)}
    assert set(claims) == {expiring, bounded}
    assert claims[bounded].deadline_at == clock.now() + timedelta(minutes=10)
    assert await store.release(expiring, claims[expiring].attempt)  # started: it cannot expire
    assert await store.suspend(bounded, claims[bounded].attempt, clock.now() + timedelta(days=1))
    late = await _start(store, start_timeout=timedelta(minutes=1))
    clock.advance(timedelta(minutes=5))
    claimed = await store.claim(["f"], 10, "w", LEASE)
    assert {c.run_id for c in claimed} == {delayed, expiring}
    for claim in claimed:
        assert await store.finish(claim.run_id, claim.attempt, "completed")
    assert await _status(store, late) == "failed"
    clock.advance(timedelta(minutes=5))  # the deadline comes before the day-long sleep ends
    assert await _claim_ids(store) == []
    row = await store.get_run(bounded)
    assert row is not None
    assert (row.status, row.error["type"]) == ("failed", "RunTimedOut")
    late_row = await store.get_run(late)
    assert late_row is not None
    assert late_row.error["type"] == "RunExpired"
