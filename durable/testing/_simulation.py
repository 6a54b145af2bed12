"""``Simulation``: runs a durable function on a virtual clock, with crashes and events on cue."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from durable._app import App
from engine import (
    Checkpoint,
    Claim,
    DatabaseTime,
    Decision,
    Execution,
    FunctionSpec,
    JournalEntry,
    MemoryStore,
    PostgresStore,
    Runner,
    RunStatus,
    Store,
    VirtualClock,
    WaitRow,
    _lineage,
    dump,
    load,
    validate_input,
)
from engine.errors import ErrorInfo

_WORKER = "simulation"
_LEASE = timedelta(seconds=30)


class SimulationError(AssertionError):
    """The simulation could not finish: the run never settled, or a check failed."""


@dataclass(frozen=True)
class Send:
    """An event the simulation sends ``at`` this long (virtual time) after the run started.

    Events due at the same moment are sent in the order given, before the run next executes.
    """

    name: str
    payload: Any = None
    key: str | None = None
    at: timedelta = timedelta(0)


def describe(point: Checkpoint) -> str:
    """A crash at ``point`` in words: ``crash after position 4 (step 'charge') was journaled``."""
    what = f"{point.kind} {point.name!r}"
    if point.moment == "before":
        return f"crash before position {point.position} ({what}) ran"
    if point.moment == "ran":
        return f"crash after {what} at position {point.position} ran, before it was journaled"
    return f"crash after position {point.position} ({what}) was journaled"


@dataclass
class Outcome:
    """What a simulated run did, for assertions.

    ``checkpoints`` lists every journal boundary the run passed, in order, replays included:
    crash schedules count in it. ``executions`` counts the live runs of each step position;
    ``reruns`` lists step positions that ran again after their result was journaled (never,
    unless the engine is broken).
    """

    run_id: uuid.UUID
    status: RunStatus
    result: Any
    error: ErrorInfo | None
    journal: list[JournalEntry]
    waits: list[WaitRow]
    checkpoints: list[Checkpoint]
    crashes: list[Checkpoint]
    executions: Counter[str]
    reruns: list[str]
    attempts: int
    elapsed: timedelta

    def explain(self) -> str:
        """The crashes injected, in words (for assertion messages)."""
        return "; ".join(describe(p) for p in self.crashes) or "no crash"

    def differences(self, baseline: Outcome) -> list[str]:
        """How this outcome departs from ``baseline`` (an uninterrupted run of the same
        function and input), in words; empty when it is the same run."""
        found: list[str] = []
        if (self.status, self.result) != (baseline.status, baseline.result):
            found.append(
                f"the run ended {self.status} with {self._ending()} where the uninterrupted "
                f"run ended {baseline.status} with {baseline._ending()}"
            )
        journal_difference = _journal_difference(baseline.journal, self.journal)
        if journal_difference:
            found.append(journal_difference)
        names = {e.position: e.name for e in self.journal if e.kind == "step"}
        for position in self.reruns:
            found.append(
                f"step {names.get(position, '?')!r} at position {position} ran again after "
                f"its result was journaled"
            )
        for position, name in names.items():
            if self.executions[position] == 0:
                found.append(f"step {name!r} at position {position} is journaled but never ran")
        return found

    def _ending(self) -> str:
        if self.error is not None:
            return f"{self.error.type}: {self.error.message}"
        return repr(self.result)


def _journal_difference(expected: list[JournalEntry], actual: list[JournalEntry]) -> str | None:
    want = {e.position: _comparable(e) for e in expected}
    got = {e.position: _comparable(e) for e in actual}
    for position in sorted(want.keys() | got.keys(), key=_position_key):
        if want.get(position) != got.get(position):
            return (
                f"the journal differs at position {position}: the uninterrupted run has "
                f"{_show(want.get(position))}, this one {_show(got.get(position))}"
            )
    return None


def _comparable(entry: JournalEntry) -> tuple[Any, ...]:
    error = entry.error or {}
    return (entry.kind, entry.name, entry.value, error.get("type"), error.get("message"))


def _show(entry: tuple[Any, ...] | None) -> str:
    if entry is None:
        return "nothing"
    kind, name, value, error_type, message = entry
    shown = f"{kind} {name!r} = {value!r}"
    return f"{shown} ({error_type}: {message})" if error_type else shown


def _position_key(position: str) -> list[tuple[int, ...]]:
    return [tuple(int(p) for p in part.split(".")) for part in position.split(":")]


class _Probe:
    """Counts checkpoints, crashes on cue, halts at live work, shuffles completion order."""

    def __init__(self, crashes: Iterable[int], shuffle: random.Random | None, halt: bool) -> None:
        self.crash_at = set(crashes)
        self.shuffle = shuffle
        self.halt = halt
        self.passed: list[Checkpoint] = []
        self.crashed: list[Checkpoint] = []
        self.executions: Counter[str] = Counter()
        self.journaled: set[str] = set()
        self.reruns: list[str] = []
        self.crashed_attempt = False
        self.root: uuid.UUID | None = None

    def _key(self, point: Checkpoint) -> str:
        """The position, for the run under test; ``run@position`` for its child runs."""
        if self.root is None or point.run_id == self.root:
            return point.position
        return f"{point.run_id}@{point.position}"

    async def __call__(self, point: Checkpoint) -> Decision:
        index = len(self.passed)
        self.passed.append(point)
        if self.shuffle is not None:  # let other branches overtake this one
            for _ in range(self.shuffle.randrange(4)):
                await asyncio.sleep(0)
        key = self._key(point)
        if point.moment == "journaled":
            self.journaled.add(key)
        if index in self.crash_at:
            self.crashed.append(point)
            self.crashed_attempt = True
            return "crash"
        if point.moment == "before":
            if self.halt:
                return "halt"
            if point.kind == "step":
                if key in self.journaled:
                    self.reruns.append(key)
                self.executions[key] += 1
        return "continue"


class Simulation:
    """Runs durable functions of ``app`` in one process on a virtual clock.

    Time moves only between attempts: to the next timer, the next scheduled event, or the
    next deadline, so a function that sleeps for a week finishes in milliseconds. Runs execute
    on a ``MemoryStore`` unless a ``database_url`` is given (then on that Postgres database,
    whose clock follows the virtual one). ``stubs`` replace step bodies by step name; the
    function under test is not touched::

        sim = Simulation(app, stubs={"charge": failing(CardDeclined("no funds"))})
        outcome = await sim.run(order, Order(id="o1", amount=30),
                                events=[Send("shipped", key="o1", at=timedelta(days=2))])
        assert outcome.status == "completed"

    ``seed`` fixes everything random: ``ctx.uuid()``/``ctx.random()`` (drawn per run and
    journal position, so a crash cannot shift them) and, in memory, run ids. On Postgres run
    ids are fresh, so that simulations can share a database; use ``async with`` there, so the
    connections are closed, and a database no worker serves, so that none takes the runs.
    """

    def __init__(
        self,
        app: App,
        *,
        stubs: Mapping[str, Callable[..., Any]] | None = None,
        start: datetime | None = None,
        seed: int = 0,
        database_url: str | None = None,
        max_attempts: int = 1000,
    ) -> None:
        self.app = app
        self.clock = VirtualClock(start)
        self.stubs = dict(stubs or {})
        self.seed = seed
        self.max_attempts = max_attempts
        self._database_url = database_url
        self._store: Store | None = None
        self._ids = random.Random(seed)
        self._started = 0

    async def __aenter__(self) -> Simulation:
        await self.store()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def store(self) -> Store:
        """The store runs execute on (created on first use)."""
        if self._store is None:
            if self._database_url is None:
                self._store = MemoryStore(self.clock)
            else:
                postgres = await PostgresStore.connect(
                    self._database_url, max_size=2, connect_timeout=10, clock=self.clock
                )
                await postgres.migrate()
                self._store = postgres
        return self._store

    async def run(
        self,
        fn: Callable[..., Awaitable[Any]],
        input: Any = None,
        *,
        events: Sequence[Send] = (),
        crashes: Iterable[int] = (),
        shuffle: int | None = None,
        lateness: Sequence[timedelta] = (),
    ) -> Outcome:
        """Start a run of ``fn`` and drive it until it ends or waits for good.

        ``crashes`` are indexes into the checkpoints the run passes (``Outcome.checkpoints``
        of an uninterrupted run names them): at each, the attempt dies as under SIGKILL and
        the next attempt resumes by replay. ``shuffle`` (a seed) varies the order in which
        parallel branches start and finish. ``lateness`` delays the wake-ups of timers in
        turn, as a busy or restarted worker would.
        """
        spec = self._spec(fn)
        store = await self.store()
        data = (
            validate_input(spec.input_type, input, f"simulate {spec.name!r}")
            if spec.takes_input
            else None
        )
        self._started += 1
        drawn = uuid.UUID(int=self._ids.getrandbits(128), version=4)
        run_id = drawn if self._database_url is None else uuid.uuid4()
        await store.start_run(run_id, spec.name, data, None, None)
        probe = _Probe(crashes, None if shuffle is None else random.Random(shuffle), halt=False)
        probe.root = run_id
        started = self.clock.now()
        attempts = await self._drive(store, spec, run_id, probe, events, lateness)
        outcome = await self._outcome(store, spec, run_id, probe, attempts)
        outcome.elapsed = self.clock.now() - started
        return outcome

    def _spec(self, fn: Callable[..., Awaitable[Any]] | str) -> FunctionSpec:
        spec = self.app.spec_for(fn)
        if spec is None:
            raise SimulationError(f"no durable function named {fn!r} in this app")
        return spec

    async def _drive(
        self,
        store: Store,
        spec: FunctionSpec,
        run_id: uuid.UUID,
        probe: _Probe,
        events: Sequence[Send],
        lateness: Sequence[timedelta],
    ) -> int:
        _lineage.install(asyncio.get_running_loop())
        started = self.clock.now()
        schedule = sorted(enumerate(events), key=lambda item: (item[1].at, item[0]))
        late = list(lateness)
        attempts = 0
        while True:
            while schedule and started + schedule[0][1].at <= self.clock.now():
                event = schedule.pop(0)[1]
                await store.send_event(event.name, event.key or "", dump(Any, event.payload, ""))
            # Child runs (ctx.start, ctx.run) are driven too, one attempt at a time.
            names = list(self.app.functions)
            claims = await store.claim(names, 1, _WORKER, _LEASE)
            if claims:
                attempts += 1
                if attempts > self.max_attempts:
                    raise SimulationError(
                        f"run {run_id} of {spec.name!r} did not end in {self.max_attempts} attempts"
                    )
                await self._attempt(store, claims[0], probe)
                continue
            due, _now = await store.next_due(names)
            next_event = started + schedule[0][1].at if schedule else None
            if due is None and next_event is None:
                return attempts
            if due is not None and (next_event is None or due <= next_event):
                due += late.pop(0) if late else timedelta(0)
            self.clock.advance_to(min(t for t in (due, next_event) if t is not None))

    async def _attempt(self, store: Store, claim: Claim, probe: _Probe) -> None:
        probe.crashed_attempt = False
        execution = Execution(
            store,
            self.app.functions,
            DatabaseTime(self.clock),
            short_wait=0.0,
            rng=random.Random(self.seed),
            max_payload_bytes=self.app.settings.max_payload_bytes,
            probe=probe,
            stubs=self.stubs,
            seed=f"{self.seed}/{self._started}",
        )
        runner = Runner(execution, claim)
        await runner.execute()
        if probe.crashed_attempt:  # the next attempt starts at once, as if the lease had run out
            await store.release(claim.run_id, claim.attempt)

    async def _outcome(
        self, store: Store, spec: FunctionSpec, run_id: uuid.UUID, probe: _Probe, attempts: int
    ) -> Outcome:
        row = await store.get_run(run_id)
        assert row is not None
        result = None
        if row.status == "completed":
            result = load(spec.return_type, row.result)
        return Outcome(
            run_id=run_id,
            status=row.status,
            result=result,
            error=ErrorInfo.from_json(row.error) if row.error else None,
            journal=await store.load_journal(run_id),
            waits=await store.list_waits(run_id),
            checkpoints=list(probe.passed),
            crashes=list(probe.crashed),
            executions=probe.executions,
            reruns=list(probe.reruns),
            attempts=attempts,
            elapsed=timedelta(0),
        )
