"""The store contract (engine._records.Store), on PostgreSQL: the SQL functions themselves.

Every test reads time from one ``VirtualClock`` (through ``durable.clock()`` and the
``durable.fake_now`` setting), so leases lapse and timers fall due by moving the clock, never
by sleeping.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from engine import NewRun, RunFilter, Store
from engine.errors import JournalConflict
from tests.contract.conftest import Subject

pytestmark = pytest.mark.postgres

LEASE = timedelta(seconds=30)


async def _start(
    store: Store, run_id: uuid.UUID, function: str, input: object, key: str | None = None
) -> tuple[uuid.UUID, bool]:
    [started] = await store.start_runs([NewRun(run_id, function, input, idempotency_key=key)])
    return started


async def _started(store: Store, function: str = "f") -> uuid.UUID:
    run_id, created = await _start(store, uuid.uuid4(), function, {"n": 1})
    assert created
    return run_id


async def _claimed(subject: Subject, function: str = "f") -> tuple[uuid.UUID, int]:
    run_id = await _started(subject.store, function)
    claims = await subject.store.claim([function], 10, "w", LEASE)
    [claim] = [c for c in claims if c.run_id == run_id]
    return run_id, claim.attempt


async def test_a_claim_lost_to_another_worker_cannot_write(subject: Subject) -> None:
    store = subject.store
    run_id = await _started(store)
    [first] = await store.claim(["f"], 10, "worker-a", LEASE)
    assert first.input == {"n": 1}
    assert await store.append(run_id, first.attempt, "0", "step", "a", 1)
    subject.clock.advance(LEASE + timedelta(seconds=1))
    [second] = await store.claim(["f"], 10, "worker-b", LEASE)
    assert second.attempt == first.attempt + 1
    assert not await store.append(run_id, first.attempt, "1", "step", "zombie", 1)
    sleep = await store.append_sleep(
        run_id, first.attempt, "1", "sleep", duration=timedelta(seconds=1)
    )
    assert sleep is None
    assert (await store.await_event(run_id, first.attempt, "1", "e", "", None)).outcome == "fenced"
    assert not await store.suspend(run_id, first.attempt, None)
    assert not await store.finish(run_id, first.attempt, "completed", result=1)
    assert not await store.release(run_id, first.attempt)
    assert await store.append(run_id, second.attempt, "1", "step", "b", 2)
    entries = await store.load_journal(run_id)
    assert [(e.position, e.name, e.value, e.attempt) for e in entries] == [
        ("0", "a", 1, first.attempt),
        ("1", "b", 2, second.attempt),
    ]


async def test_a_position_is_never_written_twice(subject: Subject) -> None:
    run_id, attempt = await _claimed(subject)
    assert await subject.store.append(run_id, attempt, "0", "step", "a", 1)
    with pytest.raises(JournalConflict):
        await subject.store.append(run_id, attempt, "0", "step", "a", 2)
    with pytest.raises(JournalConflict):
        await subject.store.append_sleep(run_id, attempt, "0", "sleep", duration=LEASE)
    assert [e.value for e in await subject.store.load_journal(run_id)] == [1]


async def test_a_held_lease_is_renewed_and_a_lapsed_one_is_lost(subject: Subject) -> None:
    store = subject.store
    kept_id = await _started(store)
    lost_id = await _started(store)
    claims = {c.run_id: c for c in await store.claim(["f"], 10, "w", LEASE)}
    subject.clock.advance(LEASE / 2)
    kept = await store.renew_leases([(kept_id, claims[kept_id].attempt)], "w", LEASE)
    assert kept == {kept_id: False}
    subject.clock.advance(LEASE * 3 / 4)  # past the first lease, inside the renewed one
    [retaken] = await store.claim(["f"], 10, "other", LEASE)
    assert retaken.run_id == lost_id
    held = [(kept_id, claims[kept_id].attempt), (lost_id, claims[lost_id].attempt)]
    assert await store.renew_leases(held, "w", LEASE) == {kept_id: False}
    assert await store.renew_leases([(kept_id, claims[kept_id].attempt)], "x", LEASE) == {}


async def test_a_paused_run_is_not_claimed_until_resumed(subject: Subject) -> None:
    store = subject.store
    run_id, attempt = await _claimed(subject)
    assert await store.finish(run_id, attempt, "paused", error={"type": "X"})
    assert await store.claim(["f"], 10, "w", LEASE) == []
    assert await store.resume(run_id)
    assert not await store.resume(run_id)
    [again] = await store.claim(["f"], 10, "w", LEASE)
    assert again.attempt == attempt + 1


async def test_claims_take_only_the_functions_asked_for_oldest_due_first(
    subject: Subject,
) -> None:
    store = subject.store
    older = await _started(store, "mine")
    subject.clock.advance(timedelta(seconds=1))
    await _started(store, "theirs")
    newer = await _started(store, "mine")
    claims = await store.claim(["mine"], 1, "w", LEASE)
    assert [c.run_id for c in claims] == [older]
    assert [c.run_id for c in await store.claim(["mine"], 5, "w", LEASE)] == [newer]
    assert [c.function for c in await store.claim(["theirs"], 5, "w", LEASE)] == ["theirs"]


async def test_an_existing_id_or_idempotency_key_returns_the_existing_run(
    subject: Subject,
) -> None:
    store = subject.store
    first, created = await _start(store, uuid.uuid4(), "f", None, "order-1")
    assert created
    assert await _start(store, uuid.uuid4(), "f", None, "order-1") == (first, False)
    assert await _start(store, first, "f", None) == (first, False)
    assert len(await store.find_runs(RunFilter(), limit=10)) == 1


async def test_a_sleep_wakes_at_the_time_the_store_fixed(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    run_id, attempt = await _claimed(subject)
    wake = await store.append_sleep(run_id, attempt, "0", "sleep", duration=timedelta(days=7))
    assert wake == clock.now() + timedelta(days=7)
    assert await store.suspend(run_id, attempt, wake)
    assert await store.next_due(["f"]) == (wake, clock.now())
    assert await store.claim(["f"], 10, "w", LEASE) == []
    clock.advance(timedelta(days=7))
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.db_now == wake
    [entry] = await store.load_journal(run_id)
    assert entry.kind == "sleep"
    assert entry.value["wake_at"].startswith(wake.isoformat()[:19])


async def test_an_event_counts_only_when_sent_after_the_run_started(subject: Subject) -> None:
    store = subject.store
    await store.send_event("paid", "o1", {"early": True})
    run_id, attempt = await _claimed(subject)
    waiting = await store.await_event(run_id, attempt, "0", "paid", "o1", None)
    assert waiting.outcome == "waiting"
    assert waiting.timeout_at is None
    await store.send_event("paid", "other-key", 0)
    await store.send_event("paid", "o1", {"n": 1})
    await store.send_event("paid", "o1", {"n": 2})
    first = await store.await_event(run_id, attempt, "0", "paid", "o1", None)
    second = await store.await_event(run_id, attempt, "1", "paid", "o1", None)
    third = await store.await_event(run_id, attempt, "2", "paid", "o1", None)
    assert (first.outcome, first.payload) == ("event", {"n": 1})
    assert (second.outcome, second.payload) == ("event", {"n": 2})
    assert third.outcome == "waiting"
    assert [w.position for w in await store.list_waits(run_id)] == ["2"]


async def test_a_wait_keeps_the_deadline_of_its_first_registration(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    run_id, attempt = await _claimed(subject)
    first = await store.await_event(run_id, attempt, "0", "e", "", timedelta(hours=1))
    assert first.timeout_at == clock.now() + timedelta(hours=1)
    clock.advance(timedelta(minutes=59))
    again = await store.await_event(run_id, attempt, "0", "e", "", timedelta(hours=1))
    assert (again.outcome, again.timeout_at) == ("waiting", first.timeout_at)
    clock.advance(timedelta(minutes=1))
    late = await store.await_event(run_id, attempt, "0", "e", "", timedelta(hours=1))
    assert late.outcome == "timeout"
    [entry] = await store.load_journal(run_id)
    assert (entry.kind, entry.value) == ("event", {"timeout": True, "key": ""})
    assert await store.list_waits(run_id) == []


async def test_an_event_wakes_a_suspended_waiter_at_once(subject: Subject) -> None:
    store = subject.store
    run_id, attempt = await _claimed(subject)
    await store.await_event(run_id, attempt, "0", "e", "k", timedelta(days=1))
    assert await store.suspend(run_id, attempt, subject.clock.now() + timedelta(days=1))
    assert await store.claim(["f"], 10, "w", LEASE) == []
    await store.send_event("e", "k", "hi")
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    outcome = await store.await_event(run_id, claim.attempt, "0", "e", "k", timedelta(days=1))
    assert (outcome.outcome, outcome.payload) == ("event", "hi")


async def test_an_event_sent_while_the_waiter_runs_is_not_missed(subject: Subject) -> None:
    store = subject.store
    run_id, attempt = await _claimed(subject)
    await store.await_event(run_id, attempt, "0", "e", "", None)
    await store.send_event("e", "", 1)  # arrives before the attempt suspends
    assert await store.suspend(run_id, attempt, None)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.attempt == attempt + 1


async def test_finishing_ends_the_run_and_drops_its_waits(subject: Subject) -> None:
    store = subject.store
    run_id, attempt = await _claimed(subject)
    await store.await_event(run_id, attempt, "0", "e", "", None)
    assert await store.finish(run_id, attempt, "completed", result={"ok": True})
    row = await store.get_run(run_id)
    assert row is not None
    assert (row.status, row.result, row.lease_owner) == ("completed", {"ok": True}, None)
    assert row.finished_at == subject.clock.now()
    assert await store.list_waits(run_id) == []
    assert not await store.finish(run_id, attempt, "failed", error={"type": "X"})
    assert await store.claim(["f"], 10, "w", LEASE) == []
    completed = await store.find_runs(RunFilter(status="completed"), limit=10)
    assert [r.id for r in completed] == [run_id]
    assert await store.find_runs(RunFilter(status="failed"), limit=10) == []


async def test_a_released_run_is_claimable_at_once_and_its_claim_fenced(subject: Subject) -> None:
    store = subject.store
    run_id, attempt = await _claimed(subject)
    assert await store.release(run_id, attempt)
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.attempt == attempt + 1
    assert not await store.append(run_id, attempt, "0", "step", "late", 1)


async def test_unknown_runs_read_as_absent(subject: Subject) -> None:
    missing = uuid.uuid4()
    assert await subject.store.get_run(missing) is None
    assert await subject.store.load_journal(missing) == []
    assert not await subject.store.resume(missing)
    assert not await subject.store.append(missing, 1, "0", "step", "a", 1)


async def test_many_runs_start_in_one_call_and_existing_ones_are_returned(
    subject: Subject,
) -> None:
    store = subject.store
    existing, _ = await _start(store, uuid.uuid4(), "f", None, "key-1")
    fresh = [uuid.uuid4() for _ in range(3)]
    started = await store.start_runs(
        [
            NewRun(fresh[0], "f", {"n": 0}),
            NewRun(fresh[1], "f", {"n": 1}, idempotency_key="key-1"),
            NewRun(fresh[2], "f", {"n": 2}, idempotency_key="key-2"),
            NewRun(existing, "f", {"n": 3}),
        ]
    )
    assert started == [(fresh[0], True), (existing, False), (fresh[2], True), (existing, False)]
    claims = await store.claim(["f"], 10, "w", LEASE)
    assert sorted(c.input["n"] for c in claims if c.input) == [0, 2]
    assert await store.start_runs([]) == []


async def test_json_lists_and_nesting_survive_every_write(subject: Subject) -> None:
    store = subject.store
    nested = [[1, [2, 3]], {"a": [None, "x"]}]
    [(run_id, _)] = await store.start_runs([NewRun(uuid.uuid4(), "f", nested)])
    [claim] = await store.claim(["f"], 10, "w", LEASE)
    assert claim.input == nested
    assert await store.append(run_id, claim.attempt, "0", "step", "a", [1, 2, 3])
    assert await store.append(run_id, claim.attempt, "1", "step", "b", None, {"type": "E"})
    assert await store.finish(run_id, claim.attempt, "completed", result=[[1], [2]])
    journal = await store.load_journal(run_id)
    assert [(e.value, e.error) for e in journal] == [([1, 2, 3], None), (None, {"type": "E"})]
    row = await store.get_run(run_id)
    assert row is not None
    assert row.result == [[1], [2]]


async def test_a_claim_reports_when_the_next_run_falls_due(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    run_id, attempt = await _claimed(subject)
    wake = clock.now() + LEASE / 3
    assert await store.suspend(run_id, attempt, wake)
    await _started(store)
    claims, due, now = await store.claim_due(["f"], 10, "w", LEASE)
    assert [c.input for c in claims] == [{"n": 1}]
    assert (due, now) == (wake, clock.now())  # the timer comes before the new claim's lease
    clock.advance(LEASE / 2)
    [woken], due_again, _now = await store.claim_due(["f"], 10, "w", LEASE)
    assert woken.run_id == run_id
    assert due_again == claims[0].db_now + LEASE  # now the first claim's lease is next
