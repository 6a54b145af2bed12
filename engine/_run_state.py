"""``RunState``: one attempt at a run, the machinery behind ``Context``.

It holds the journal as loaded, the positions replay has consumed, and the live work in flight;
it decides when the whole run is blocked (and suspends it, or waits in memory for a short
timer), fences writes by the claim, and lets a test's probe see every journal boundary.

Over 400 lines: one attempt's state is read by every part (the journal by replay, the work in
flight by the settle logic that suspends, the claim by the fence and by the wait for the due
time); split, each part would take the others' state as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from engine import _lineage
from engine._clock import DatabaseTime
from engine._records import JournalEntry, StepTiming, Store
from engine._signals import abandon, suspend
from engine.errors import (
    DatabaseError,
    DatabaseUnavailable,
    JournalConflict,
    NonDeterminismError,
)

if TYPE_CHECKING:
    from engine._registry import FunctionSpec

T = TypeVar("T")

# Loop iterations a run must stay idle before it is considered blocked as a whole: enough for
# a result to travel up through nested gathers and for the next call to be made.
_SETTLE_TICKS = 20
# Between a position and a patch's name in the position of its marker: no call's position has it.
PATCH_MARK = "~"


Moment = Literal["before", "ran", "journaled"]
Decision = Literal["continue", "crash", "halt"]


@dataclass(frozen=True)
class Checkpoint:
    """A journal boundary a run passes: ``before`` live work at ``position`` starts, after a
    step's body ``ran`` (its result not yet journaled), and once the entry is ``journaled``."""

    run_id: uuid.UUID
    attempt: int
    moment: Moment
    position: str
    kind: str
    name: str


class Probe(Protocol):
    """Watches checkpoints (``durable.testing``): ``"crash"`` kills the attempt there as a
    SIGKILL would, ``"halt"`` blocks that branch for good (replay stops at live work)."""

    async def __call__(self, point: Checkpoint) -> Decision: ...


@dataclass(frozen=True)
class Execution:
    """What every attempt of one worker (or one simulation, or one replay) shares: where runs
    are stored, the app's functions (a run's own, and those it may start as children), the
    database's time, how short a wait is kept in memory, and, for tests, the probe, step stubs
    and seed. ``Runner(execution, claim)`` is the one way to execute a claimed attempt. A
    ``replay_only`` execution (``replay_journal``) writes nothing: a pause is its result, which
    its caller reports, so it is not logged as an error."""

    store: Store
    functions: Mapping[str, FunctionSpec]
    db_time: DatabaseTime
    short_wait: float = 0.25
    rng: random.Random = field(default_factory=random.SystemRandom)
    max_payload_bytes: int | None = None
    probe: Probe | None = None
    stubs: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    seed: str | None = None
    replay_only: bool = False
    # How many attempts' ends, waiting together, go to the store at once rather than after
    # the delay that lets lone ends share a statement (``Store.finish``'s ``enough``): a
    # claim's worth when the worker is full (due runs wait for the slots they free). None: the
    # ends are spaced.
    ends_together: Callable[[], int | None] = lambda: None


@dataclass(frozen=True)
class _ChildSnapshot:
    status: dict[uuid.UUID, str]
    waiting_at: set[str]


@dataclass(eq=False)
class _Blocked:
    future: asyncio.Future[None]
    wake_at: datetime | None


class RunState:
    """One attempt at a run: its journal, its live work, and whether it must stop."""

    def __init__(
        self,
        execution: Execution,
        *,
        run_id: uuid.UUID,
        function: str,
        attempt: int,
        journal: list[JournalEntry],
    ) -> None:
        self.store = execution.store
        self.functions = execution.functions
        self.probe = execution.probe
        self.max_payload_bytes = execution.max_payload_bytes
        self.stubs = execution.stubs
        self.seed = execution.seed
        self.run_id = run_id
        self.function = function
        self.attempt = attempt
        self.journal = {entry.position: entry for entry in journal}
        self.consumed: set[str] = set()
        self.db_time = execution.db_time
        self.short_wait = execution.short_wait
        self.rng = execution.rng
        self.tasks: set[asyncio.Task[Any]] = set()
        # One future per step body running in a thread, resolved when the body returns: a
        # thread cannot be interrupted, so it may outlive the step that was cancelled.
        self.threads: set[asyncio.Future[None]] = set()
        self.in_flight = 0
        self.generation = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.blocked: list[_Blocked] = []
        self.suspending = False
        self.suspend_until: datetime | None = None
        # A run claimed ahead of its due time replays at once; its first live call waits
        # until then (``reach_due``).
        self.not_before: datetime | None = None
        self.lost = False
        # Whether this attempt's span records (a tracer provider was set when it began, and
        # its sampler kept the span): its steps record theirs then, and only then. Decided
        # once per attempt, not per step.
        self.traced = False
        self.nondeterminism: NonDeterminismError | None = None
        self.interrupted: BaseException | None = None
        self.cancelled = False
        self.children: _ChildSnapshot | None = None
        self._registered_waits: set[str] | None = None  # read by passed(), when a patch asks
        self._settler: asyncio.Task[None] | None = None

    # -- task bookkeeping ----------------------------------------------------------------------

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._settler is not None:
            self._settler.cancel()

    async def in_thread(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run a sync step body in a thread and return its result. Cancelling the caller does
        not stop the thread: until the body really returns, ``threads`` holds a future for it,
        so that the worker keeps the run (its lease and fencing) and no other worker starts
        the same step beside it."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        self.threads.add(ended)
        ended.add_done_callback(self.threads.discard)

        def body() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed before the thread
                    loop.call_soon_threadsafe(_resolve, ended)

        return await asyncio.to_thread(body)

    async def threads_ended(self) -> None:
        """Return once no step body of this attempt runs in a thread any more."""
        while self.threads:
            await asyncio.wait(list(self.threads))

    # -- positions and replay -----------------------------------------------------------------

    def next_position(self) -> str:
        node = self._node()
        self.generation += 1
        return node.next_position()

    def patch_position(self, name: str) -> tuple[str, str]:
        """Where patch ``name`` is marked (``<next position>~<name>``) and the next position
        itself, which the marker does not take: a patch shifts no position after it."""
        following = self._node().peek_position()
        return f"{following}{PATCH_MARK}{name}", following

    def _node(self) -> _lineage.Node:
        node = _lineage.current()
        if node is None or node.owner is not self:
            raise RuntimeError(
                "a Context method was called outside its run (from another run, a thread, or "
                "a task created with an explicit context)"
            )
        return node

    def recorded(self, position: str, kind: str, name: str) -> JournalEntry | None:
        """The journaled entry at ``position``, checked against the call; None when live."""
        self.check_alive()
        entry = self.journal.get(position)
        if entry is None:
            return None
        if entry.kind != kind or entry.name != name:
            error = NonDeterminismError(
                str(self.run_id),
                position,
                recorded=f"{entry.kind} {entry.name!r}",
                requested=f"{kind} {name!r}",
            )
            self.nondeterminism = self.nondeterminism or error
            raise error
        self.consumed.add(position)
        return entry

    def check_alive(self) -> None:
        if self.lost:
            raise abandon(f"run {self.run_id}: claim {self.attempt} lost")
        if self.nondeterminism is not None:
            raise self.nondeterminism
        if self.cancelled:
            raise asyncio.CancelledError(f"run {self.run_id} was cancelled")
        if self.suspending:
            raise suspend()

    async def child_snapshot(self) -> _ChildSnapshot:
        """The children's statuses and the registered waits, read once per attempt: a join
        whose child had not ended and whose wait is registered blocks without a round trip
        (a child ending after this read wakes the run before it can suspend)."""
        if self.children is None:
            children = await self.db(self.store.list_children(self.run_id))
            waits = await self.db(self.store.list_waits(self.run_id))
            self.children = _ChildSnapshot(
                {c.id: c.status for c in children}, {w.position for w in waits}
            )
        return self.children

    def unconsumed(self) -> list[JournalEntry]:
        """Journal entries the code did not ask for again. Patch markers do not count: once a
        patch's old branch is gone, its ``patched`` call may go too."""
        return [e for p, e in self.journal.items() if p not in self.consumed and e.kind != "patch"]

    async def passed(self, position: str) -> bool:
        """Whether the run got to ``position`` on an earlier attempt: the journal holds an entry
        there, or a wait is registered there (a run suspended on an event or a child run has
        no journal entry at its wait yet). The waits are read once per attempt, and not on a
        first attempt, which can have none."""
        if position in self.journal:
            return True
        if self.attempt <= 1:
            return False
        if self._registered_waits is None:
            waits = await self.db(self.store.list_waits(self.run_id))
            self._registered_waits = {w.position for w in waits}
        return position in self._registered_waits

    async def db(self, call: Coroutine[Any, Any, T]) -> T:
        """Await a store call as live work. A database failure cannot be caught by the user's
        ``except Exception``: it abandons this attempt, which is resumed by replay. A value the
        database refused (``SerializationError``) is the value's fault, not the database's: it
        is raised into the function, since retrying would not help."""
        if self.lost:  # a crashed or fenced attempt writes nothing more
            call.close()
            self.check_alive()
        with self.live():
            try:
                return await call
            except (DatabaseUnavailable, DatabaseError, JournalConflict) as exc:
                self.interrupted = exc
                raise abandon(f"run {self.run_id}: database call failed ({exc!r})") from exc

    async def append(
        self,
        position: str,
        kind: str,
        name: str,
        value: Any,
        error: Any = None,
        timing: StepTiming | None = None,
    ) -> None:
        ok = await self.db(
            self.store.append(self.run_id, self.attempt, position, kind, name, value, error, timing)
        )
        self.fence(ok)
        self.remember(position, kind, name, value, error)

    async def checkpoint(self, moment: Moment, position: str, kind: str, name: str) -> None:
        """Let the probe (tests only) see this boundary, and crash or halt here. Before a live
        call, first wait until the run is due."""
        if moment == "before":
            await self.reach_due()
        if self.probe is None:
            return
        with self.live():  # a probe that waits is live work: the run must not settle meanwhile
            decision = await self.probe(
                Checkpoint(self.run_id, self.attempt, moment, position, kind, name)
            )
        if decision == "crash":
            self.lost = True
            self.cancel_tasks()
            raise abandon(f"run {self.run_id}: crash injected {moment} position {position}")
        if decision == "halt":
            while True:
                await self.block(None)

    def rng_for(self, position: str) -> random.Random:
        """Where a journaled helper draws at ``position``: per position when seeded (a test's
        simulation, so that a crash cannot shift later draws), else the run's generator."""
        if self.seed is None:
            return self.rng
        return random.Random(f"{self.seed}/{position}")

    def fence(self, ok: bool) -> None:
        if not ok:
            self.lost = True
            raise abandon(f"run {self.run_id}: claim {self.attempt} lost; write fenced")

    def remember(self, position: str, kind: str, name: str, value: Any, error: Any) -> None:
        self.journal[position] = JournalEntry(
            position, kind, name, value, error, self.attempt, self.db_time.now()
        )
        self.consumed.add(position)

    # -- live work and blocking ---------------------------------------------------------------

    def live(self) -> _Live:
        """Marks live work in flight: the run is not idle (and cannot suspend) meanwhile."""
        return _Live(self)

    async def reach_due(self) -> None:
        """Wait, as a blocked point of the run, until ``not_before``; then nothing more waits."""
        due = self.not_before
        while due is not None and self.db_time.seconds_until(due) > 0:
            await self.block(due)
        self.not_before = None

    async def block(self, wake_at: datetime | None) -> None:
        """Wait for ``wake_at`` (None: for an event). Returns when woken in memory; raises the
        Suspend signal when the whole run is blocked and the wait is not short."""
        blocked = _Blocked(asyncio.get_running_loop().create_future(), wake_at)
        self.blocked.append(blocked)
        if self._settler is None:
            self._settler = asyncio.get_running_loop().create_task(
                self._settle(), context=_lineage.detached_context()
            )
        try:
            await blocked.future
        finally:  # a branch cancelled while blocked (asyncio.wait_for) no longer blocks the run
            if blocked in self.blocked:
                self.blocked.remove(blocked)

    async def _settle(self) -> None:
        try:
            while self.blocked:
                if self.in_flight:
                    await self.idle.wait()
                    continue
                seen = self.generation
                for _ in range(_SETTLE_TICKS):
                    await asyncio.sleep(0)
                if self.in_flight or seen != self.generation or not self.blocked:
                    continue
                deadlines = [b.wake_at for b in self.blocked if b.wake_at is not None]
                earliest = min(deadlines, default=None)
                if earliest is not None and self.db_time.seconds_until(earliest) <= self.short_wait:
                    await self.db_time.sleep(self.db_time.seconds_until(earliest))
                    self._wake(earliest)
                    continue
                self.suspending = True
                self.suspend_until = earliest
                for b in self.blocked:
                    if not b.future.done():
                        b.future.set_exception(suspend())
                self.blocked.clear()
        finally:
            self._settler = None

    def _wake(self, due: datetime) -> None:
        self.generation += 1
        still = []
        for b in self.blocked:
            if b.wake_at is not None and b.wake_at <= due:
                if not b.future.done():
                    b.future.set_result(None)
            else:
                still.append(b)
        self.blocked = still


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Live:
    """``RunState.live``'s block; a class, not a generator, since every step enters it twice
    (its body, its journal write) and a generator's block costs 2.5 µs more."""

    __slots__ = ("_state", "_token")

    def __init__(self, state: RunState) -> None:
        self._state = state

    def __enter__(self) -> None:
        state = self._state
        state.in_flight += 1
        state.generation += 1
        state.idle.clear()
        self._token = _lineage.detach()

    def __exit__(self, *_exc: object) -> None:
        try:
            _lineage.reattach(self._token)
        finally:
            state = self._state
            state.in_flight -= 1
            state.generation += 1
            if state.in_flight == 0:
                state.idle.set()
