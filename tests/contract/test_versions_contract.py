"""The versioning rules of the store contract, on PostgreSQL: each claim records the version it
runs on, a pinned run is claimed only at the version it started on, a paused run is tried again
once per new version (durable.retry_paused), and a fork copies part of a journal into a new run
(durable.fork_run)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from engine import NewRun, PostgresStore
from tests.contract.conftest import Subject

pytestmark = pytest.mark.postgres

LEASE = timedelta(seconds=30)
PAUSED = {"type": "NonDeterminismError", "message": "the code changed"}


async def _start(store: PostgresStore) -> uuid.UUID:
    [(run_id, created)] = await store.start_runs([NewRun(uuid.uuid4(), "f", "in")])
    assert created
    return run_id


async def _claimed(store: PostgresStore, version: str, *, pins: bool = True) -> list[uuid.UUID]:
    """The runs a worker of ``version`` claims; its code declares "f" pinned (``pins``)."""
    pinned = ["f"] if pins else []
    return [c.run_id for c in await store.claim(["f"], 10, "w", LEASE, [version], pinned)]


async def _versions(store: PostgresStore, run_id: uuid.UUID) -> list[str]:
    row = await store.get_run(run_id)
    assert row is not None
    return row.versions


async def test_every_claim_appends_the_version_it_runs_on(subject: Subject) -> None:
    store, clock = subject.store, subject.clock
    run_id = await _start(store)
    assert await _versions(store, run_id) == []
    assert await _claimed(store, "v1", pins=False) == [run_id]
    clock.advance(LEASE + timedelta(seconds=1))  # the first worker is gone
    assert await _claimed(store, "v2", pins=False) == [run_id]
    assert await _versions(store, run_id) == ["v1", "v2"]


async def test_a_pinned_run_is_claimed_only_at_the_version_it_started_on(
    subject: Subject,
) -> None:
    store, clock = subject.store, subject.clock
    loose = await _start(store)
    assert await _claimed(store, "v0", pins=False) == [loose]  # v0's code does not pin "f"
    pinned = await _start(store)
    assert await _claimed(store, "v1") == [pinned]  # not started: any version; v1 pins it
    clock.advance(LEASE + timedelta(seconds=1))
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v2"], ["f"])
    assert claim.run_id == loose
    assert await store.finish(loose, claim.attempt, "completed")
    due, _now = await store.next_due(["f"], ["v2"])
    assert due is None, "a v2 worker must not be woken for a run it may not claim"
    due, now = await store.next_due(["f"], ["v1"])
    assert due is not None
    assert due <= now
    assert await _claimed(store, "v1") == [pinned]
    assert await _versions(store, pinned) == ["v1", "v1"]


async def test_a_worker_of_a_release_before_versions_claims_no_started_pinned_run(
    subject: Subject,
) -> None:
    # Such a worker calls durable.claim_runs with the four arguments it knew (p_versions NULL).
    store, clock = subject.store, subject.clock
    pinned = await _start(store)
    assert await _claimed(store, "v1") == [pinned]
    clock.advance(LEASE + timedelta(seconds=1))
    loose = await _start(store)
    old_call = "SELECT id FROM durable.claim_runs($1, $2, $3, $4)"
    rows = await store._pool.fetch(old_call, ["f"], 10, "old-worker", LEASE)
    assert [r["id"] for r in rows] == [loose]
    assert await _versions(store, loose) == [""]


async def test_a_paused_run_is_tried_again_once_by_each_other_version(subject: Subject) -> None:
    store = subject.store
    run_id = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v1"])
    assert await store.finish(run_id, claim.attempt, "paused", error=PAUSED)
    assert await store.retry_paused(["f"], ["v1"]) == 0  # the version that paused it
    assert await store.retry_paused(["g"], ["v2"]) == 0  # another function's workers
    assert await store.retry_paused(["f"], ["v2"]) == 1
    row = await store.get_run(run_id)
    assert row is not None
    assert (row.status, row.error) == ("pending", None)
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v2"])
    assert await store.finish(run_id, claim.attempt, "paused", error=PAUSED)
    assert await store.retry_paused(["f"], ["v2"]) == 0  # v2 has tried it: once per version
    assert await store.retry_paused(["f"], ["v1"]) == 0
    assert await store.retry_paused(["f"], ["v3"]) == 1


async def test_a_paused_pinned_run_is_left_to_the_version_it_started_on(subject: Subject) -> None:
    store = subject.store
    run_id = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v1"], ["f"])
    assert await store.finish(run_id, claim.attempt, "paused", error=PAUSED)
    # A v2 worker may not claim it, so making it pending would only hide that it is paused.
    assert await store.retry_paused(["f"], ["v2"]) == 0
    row = await store.get_run(run_id)
    assert row is not None
    assert row.status == "paused"


async def test_a_fork_copies_the_kept_entries_into_a_new_run_and_leaves_the_source_alone(
    subject: Subject,
) -> None:
    store = subject.store
    source = await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v1"])
    for position, name in (("0", "a"), ("1", "b"), ("2", "c")):
        assert await store.append(source, claim.attempt, position, "step", name, name.upper())
    assert await store.finish(source, claim.attempt, "completed", result="done")
    before = await store.load_journal(source)

    fork = uuid.uuid4()
    assert await store.fork(source, fork, ["0", "1"], "2")
    row = await store.get_run(fork)
    assert row is not None
    assert (row.status, row.input, row.forked_from, row.fork_position) == (
        "pending",
        "in",
        source,
        "2",
    )
    assert [(e.position, e.value, e.attempt) for e in await store.load_journal(fork)] == [
        ("0", "A", 0),
        ("1", "B", 0),
    ]
    assert await store.load_journal(source) == before
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v2"])
    assert (claim.run_id, claim.attempt, claim.forked) == (fork, 1, True)

    other = uuid.uuid4()
    assert await store.fork(source, other, [], None, input="new", replace_input=True)
    row = await store.get_run(other)
    assert row is not None
    assert row.input == "new"
    assert not await store.fork(uuid.uuid4(), uuid.uuid4(), [], None)


async def test_a_claim_of_a_run_that_is_not_a_fork_says_so(subject: Subject) -> None:
    store = subject.store
    await _start(store)
    [claim] = await store.claim(["f"], 10, "w", LEASE, ["v1"])
    assert not claim.forked
