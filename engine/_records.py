"""What the engine stores, and the contract its store keeps.

``PostgresStore`` keeps it, each transition one call of one plpgsql function
(``engine/sql/functions.sql``): the rules are defined there and nowhere else, with no Python copy
kept equal by tests. The contract suite (tests/contract) runs every case on PostgreSQL with the
database's clock moved (``durable.fake_now``), and ``durable.testing`` simulates on PostgreSQL
too. (``engine._replay.JournalStore`` answers a replay from a journal in memory and refuses
everything else.) The contract, in short:

- Every write that changes a run takes the claim (``attempt``) its caller holds and writes
  nothing when that claim is gone (another worker claimed the run since): it returns False, None
  or the outcome ``"fenced"``.
- A journal position is written at most once: a second write raises ``JournalConflict``.
- Time is the store's clock (``db_now`` of a claim, wake times of sleeps, deadlines of waits).
- An event counts for a run when it was sent after the run started and after every event the
  run already received on the same (name, key); each wait receives the oldest such event.
- A claim takes the highest priority first, then the earliest due. A run of a concurrency key at
  its limit awaits a slot (it is not due) until a transition that frees one hands it over.
- Rate limits are a sliding-window log: units are granted at the earliest t, no earlier than
  now nor than the latest grant, at which the units granted in (t - period, t] plus the new ones
  stay within the budget; a t in the future is a reservation its holder collects then.

Over 400 lines: the records and the ``Store`` protocol, with the contract each method keeps,
are read together, so they stay in one module.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

RunStatus = Literal["pending", "running", "suspended", "paused", "completed", "failed", "cancelled"]
EndStatus = Literal["completed", "failed", "paused", "cancelled"]
Strategy = Literal["queue", "cancel_in_progress", "cancel_newest"]
Versioning = Literal["replay", "pinned"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class NewRun:
    """A run to start: what ``start_runs`` takes.

    It starts at ``available_at``, else after ``delay``, else now (the store's clock);
    ``start_timeout`` after that it fails as expired if no worker has started it;
    ``run_timeout`` fixes its deadline at its first claim. With a ``concurrency_key``,
    at most ``concurrency_limit`` runs of that key hold a slot at once (``strategy`` says what a
    new run does when the key is full). ``rate_limit``/``rate_key`` name the budget its start
    consumes. A ``fresh`` run's id was just made at random by its starter: no other start can
    name it, so the store neither locks it nor looks for it before inserting the run."""

    run_id: uuid.UUID
    function: str
    input: Any
    idempotency_key: str | None = None
    trace_context: dict[str, str] | None = None
    priority: int = 0
    available_at: datetime | None = None
    delay: timedelta | None = None
    start_timeout: timedelta | None = None
    run_timeout: timedelta | None = None
    parent_id: uuid.UUID | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    strategy: Strategy = "queue"
    slot_while_suspended: bool = False
    rate_limit: str | None = None
    rate_key: str = ""
    tags: Mapping[str, str] | None = None
    queue: str | None = None
    retention: timedelta | None = None
    fresh: bool = False

    def named(self) -> NewRun:
        """This run as not fresh: started again after a try whose reply was lost, which may
        have inserted it (so it must be locked and looked for)."""
        return replace(self, fresh=False) if self.fresh else self


@dataclass(frozen=True)
class Claim:
    """A run this worker now holds: ``attempt`` is the fencing token of the claim."""

    run_id: uuid.UUID
    function: str
    input: Any
    attempt: int
    trace_context: dict[str, str] | None
    db_now: datetime
    deadline_at: datetime | None = None
    # A fork (durable runs fork/retry) has journal entries before its first claim.
    forked: bool = False
    created_at: datetime | None = None
    due_at: datetime | None = None  # a claim made ahead of it (claim_due's ahead) waits


@dataclass(frozen=True)
class JournalEntry:
    position: str
    kind: str
    name: str
    value: Any
    error: Any
    attempt: int
    created_at: datetime
    # Read for people (read_journal), not for replay: when a step's last try began and how long
    # it ran, or when the wait for an event began; ``timing`` holds a step's failed tries
    # before it ({"tries": [{"at": ..., "ms": ..., "error": ...}]}) or an event's deadline.
    started_at: datetime | None = None
    duration_ms: float | None = None
    timing: Any = None


@dataclass(frozen=True)
class StepTiming:
    """When a step's body ran, journaled with its entry: its last try's start (the database's
    time as the worker estimates it) and duration, and the tries before it, which failed."""

    started_at: datetime
    duration_ms: float
    failed_tries: tuple[dict[str, Any], ...] = ()  # {"at": ISO time, "ms": ..., "error": ...}


@dataclass(frozen=True)
class AwaitOutcome:
    outcome: Literal["event", "timeout", "waiting", "fenced"]
    payload: Any
    timeout_at: datetime | None


@dataclass(frozen=True)
class RunRow:
    id: uuid.UUID
    function: str
    input: Any
    status: RunStatus
    idempotency_key: str | None
    attempt: int
    available_at: datetime | None
    lease_owner: str | None
    result: Any
    error: Any
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None
    priority: int = 0
    parent_id: uuid.UUID | None = None
    concurrency_key: str | None = None
    cancel_requested: bool = False
    deadline_at: datetime | None = None
    expires_at: datetime | None = None
    # The version of the code of each attempt (versions[0] is the one it started on).
    versions: list[str] = field(default_factory=list)
    pinned: bool = False
    forked_from: uuid.UUID | None = None
    fork_position: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    queue: str | None = None


@dataclass(frozen=True)
class RunFilter:
    """Which runs to list (``find_runs``, the dashboard, ``durable runs list``): each field
    left None matches every run. ``tags`` matches runs carrying all of them; ``search`` is a
    run id, an idempotency key or the value of any tag."""

    status: RunStatus | None = None
    function: str | None = None
    queue: str | None = None
    version: str | None = None
    tags: Mapping[str, str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None


@dataclass(frozen=True)
class ChildOutcome:
    """What ``await_child`` found: ``done`` (the child ended: its status, result and error, now
    journaled), ``waiting`` (the wait is registered) or ``fenced``."""

    outcome: Literal["done", "waiting", "fenced"]
    status: str | None
    result: Any
    error: Any


@dataclass(frozen=True)
class ScheduleRow:
    """A cron schedule as stored (engine._schedules)."""

    name: str
    function: str
    cron: str
    timezone: str
    input: Any
    catch_up: str
    next_tick: datetime
    last_tick: datetime | None
    last_run_id: uuid.UUID | None


@dataclass(frozen=True)
class WaitRow:
    position: str
    name: str
    key: str
    timeout_at: datetime | None
    created_at: datetime | None = None  # when the wait was registered


class Store(Protocol):
    """The transitions the engine makes, one round trip each on Postgres."""

    async def close(self) -> None: ...

    async def start_runs(self, runs: Sequence[NewRun]) -> list[tuple[uuid.UUID, bool]]:
        """Insert pending runs, with their options (build each with ``engine.new_run``), in one
        round trip; returns (id, created) for each, in order: an existing id or idempotency key
        wins. Idempotency keys must be distinct within one call."""
        ...

    async def start_claimed(
        self,
        run: NewRun,
        worker: str,
        lease: timedelta,
        functions: Sequence[str],
        versions: Sequence[str],
        pinned: Sequence[str] = (),
    ) -> tuple[uuid.UUID, bool, Claim | None]:
        """``start_runs`` for one run that, if created, due and free of concurrency keys and
        rate limits, ``worker`` claims in the same round trip: (id, created, claim or None)."""
        ...

    async def claim(
        self,
        functions: Sequence[str],
        limit: int,
        worker: str,
        lease: timedelta,
        versions: Sequence[str] | None = None,
        pinned: Sequence[str] = (),
    ) -> list[Claim]:
        """Claim up to ``limit`` due runs of ``functions`` (pending, timers due, woken by an
        event, leases expired), oldest due first; each claim bumps the run's attempt and
        records the version of the code it runs on (``versions``, aligned with
        ``functions``). A first claim pins a run of a function in ``pinned``: later claims
        are only those of workers of the same version."""
        ...

    async def claim_due(
        self,
        functions: Sequence[str],
        limit: int,
        worker: str,
        lease: timedelta,
        versions: Sequence[str] | None = None,
        pinned: Sequence[str] = (),
        ahead: timedelta = timedelta(0),
    ) -> tuple[list[Claim], datetime | None, datetime]:
        """``claim``, then ``next_due``, in one round trip: the claims, when the next run
        falls due (counting these claims' leases), and the store's now. With ``ahead``, runs
        due within it are claimed too, each with its ``due_at``."""
        ...

    async def next_due(
        self, functions: Sequence[str], versions: Sequence[str] | None = None
    ) -> tuple[datetime | None, datetime]:
        """The earliest time a run of ``functions`` becomes claimable, and the store's now."""
        ...

    async def retry_paused(self, functions: Sequence[str], versions: Sequence[str]) -> int:
        """Make pending the runs of ``functions`` paused by a non-determinism on versions other
        than ``versions`` (once per version); returns how many."""
        ...

    async def renew_leases(
        self, held: Sequence[tuple[uuid.UUID, int]], worker: str, lease: timedelta
    ) -> dict[uuid.UUID, bool]:
        """Extend the leases of ``held`` (run, attempt) pairs; returns the runs still held, each
        with whether it has been asked to cancel."""
        ...

    async def load_journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        """The whole journal of a run, in the order it was written."""
        ...

    async def append(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        kind: str,
        name: str,
        value: Any,
        error: Any = None,
        timing: StepTiming | None = None,
    ) -> bool:
        """Append one journal entry (``timing``: when a step's body ran); False when the claim
        ``attempt`` is no longer held."""
        ...

    async def append_sleep(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        name: str,
        *,
        wake_at: datetime | None = None,
        duration: timedelta | None = None,
    ) -> datetime | None:
        """Journal a sleep; returns its wake time (fixed by the store's clock), None when
        fenced."""
        ...

    async def await_event(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        name: str,
        key: str,
        timeout: timedelta | None,
    ) -> AwaitOutcome:
        """Receive the next event on (name, key) and journal it, journal the timeout when the
        wait's deadline (fixed at its first registration) has passed, or register the wait."""
        ...

    async def send_event(self, name: str, key: str, payload: Any) -> int:
        """Store an event and wake the runs waiting on (name, key); returns the event id."""
        ...

    async def suspend(self, run_id: uuid.UUID, attempt: int, until: datetime | None) -> bool:
        """Drop the claim until ``until`` (None: until an event); an event that arrived while
        the run was running makes it due at once. False when fenced."""
        ...

    async def finish(
        self,
        run_id: uuid.UUID,
        attempt: int,
        status: EndStatus,
        result: Any = None,
        error: Any = None,
        *,
        enough: int | None = None,
    ) -> bool:
        """End the attempt as completed, failed or paused. False when fenced. ``enough``: work
        waits on this end (due runs, for the slot it frees), so once that many ends wait
        together they are written without delay."""
        ...

    async def release(self, run_id: uuid.UUID, attempt: int) -> bool:
        """Give a running run back to the queue at once. False when fenced."""
        ...

    async def resume(self, run_id: uuid.UUID) -> bool:
        """Make a paused run runnable again. False when it is not paused."""
        ...

    async def start_child(
        self, run_id: uuid.UUID, attempt: int, position: str, child: NewRun
    ) -> bool:
        """Start ``child`` (an existing id is kept) and journal it at ``position`` as
        ``start``, at once. False when fenced."""
        ...

    async def await_child(
        self, run_id: uuid.UUID, attempt: int, position: str, name: str, child: uuid.UUID
    ) -> ChildOutcome:
        """Journal the child's end at ``position`` (``join``) if it has ended, else register
        the wait; the child's end wakes the run."""
        ...

    async def cancel(self, run_id: uuid.UUID, reason: str) -> str:
        """Cancel a run and its unfinished descendants: 'cancelled' (ended now), 'requested'
        (running: its worker ends it), 'finished' (it had ended) or 'not_found'."""
        ...

    async def define_rate_limit(self, name: str, limit: int, period: timedelta) -> None:
        """Declare (or redeclare) rate limit ``name``: ``limit`` units per ``period``."""
        ...

    async def take_rate(self, name: str, key: str, weight: int, holder: str) -> datetime | None:
        """Take ``weight`` units of rate limit ``name`` for ``key``: None when granted now,
        else the time they are reserved for ``holder``, which then asks again to receive
        them."""
        ...

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None: ...

    async def list_children(self, run_id: uuid.UUID) -> list[RunRow]:
        """The runs ``run_id`` started, oldest first."""
        ...

    async def find_runs(
        self,
        where: RunFilter,
        *,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[RunRow]:
        """Runs matching ``where``, newest first, a page after the run ``after`` (its
        created_at and id)."""
        ...

    async def list_waits(self, run_id: uuid.UUID) -> list[WaitRow]:
        """The event waits a run has registered and not yet received, by position."""
        ...
