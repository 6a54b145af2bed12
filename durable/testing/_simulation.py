"""``Simulation``: runs durable functions on PostgreSQL on a virtual clock, with crashes and
events on cue."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from durable._app import App
from durable._connection import declare_rate_limits
from durable.testing import _databases
from durable.testing._outcome import Outcome
from durable.testing._probe import Probe
from engine import (
    Claim,
    CodeVersions,
    DatabaseTime,
    Execution,
    FunctionSpec,
    PostgresStore,
    Runner,
    VirtualClock,
    _lineage,
    dump,
    load,
    new_run,
    validate_input,
)
from engine.errors import ErrorInfo

_WORKER = "simulation"
_LEASE = timedelta(seconds=30)
# Claims in a row that find nothing although a run is due: the database would be looping.
_MAX_IDLE_ROUNDS = 1000


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


class _SimulationTime:
    """The simulation's clock as its database reads it (``durable.fake_now``, set on every
    connection checkout): whichever ``VirtualClock`` the simulation has now."""

    def __init__(self, simulation: Simulation) -> None:
        self._simulation = simulation

    def now(self) -> datetime:
        return self._simulation.clock.now()

    def monotonic(self) -> float:
        return self._simulation.clock.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._simulation.clock.sleep(seconds)

    async def sleep_until(self, moment: datetime) -> None:
        await self._simulation.clock.sleep_until(moment)


class Simulation:
    """Runs durable functions of ``app`` in this process, on PostgreSQL, on a virtual clock.

    Every rule of a deployment applies, because the database's own functions apply them:
    claims, events and timers, children, concurrency keys and their strategies, rate limits
    (the app's declarations are written to the simulation's database), priorities, execution
    and start timeouts, delays. Time moves only between attempts: to when the database says the
    next run falls due (a timer, a rate-limit reservation, a delayed start, a deadline) or to the
    next scheduled event, so a function that sleeps for a week finishes in milliseconds.
    ``stubs`` replace step bodies by step name; the function under test is not touched::

        sim = Simulation(app, stubs={"charge": failing(CardDeclined("no funds"))})
        outcome = await sim.run(order, Order(id="o1", amount=30),
                                events=[Send("shipped", key="o1", at=timedelta(days=2))])
        assert outcome.status == "completed"

    Each simulation has a database of its own while it is open (see
    ``durable.testing._databases``): created by this process on ``database_url``'s server when
    given, else on ``$DURABLE_TEST_DATABASE_URL``'s, else on the embedded PostgreSQL; the
    database the URL names is left untouched, and the role needs CREATEDB. ``await
    Simulation(app).run(...)`` opens it for that run; ``async with Simulation(app) as sim``
    keeps it open, so that several runs share it (``start`` several, then ``run`` drives them
    all: they compete for the same concurrency slots and rate limits).

    ``seed`` fixes everything random: run ids, and ``ctx.uuid()``/``ctx.random()`` (drawn per
    run and journal position, so a crash cannot shift them). Cron schedules are not fired:
    start the scheduled function yourself.
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
        self._start = start
        self._database_url = database_url
        self._database: _databases.Database | None = None
        self._store: PostgresStore | None = None
        self._upgrade: App | None = None
        self._forget()

    def _forget(self) -> None:
        self._ids = random.Random(self.seed)
        self._origins: dict[uuid.UUID, datetime] = {}
        self._claimed_at: dict[tuple[uuid.UUID, int], datetime] = {}
        self._probe = Probe((), None)

    async def __aenter__(self) -> Simulation:
        await self.store()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def store(self) -> PostgresStore:
        """The store of the simulation's database, opened on first use (``close`` closes it)."""
        if self._store is None:
            database = await _databases.lease(self._database_url)
            try:
                store = await PostgresStore.connect(
                    database.url, max_size=4, connect_timeout=10, clock=_SimulationTime(self)
                )
                try:
                    if not database.fresh:
                        await store.empty()  # what the simulation before this one left
                    await declare_rate_limits(store, self.app.rate_limits)
                except BaseException:
                    await store.close()
                    raise
            except BaseException:
                database.release()
                raise
            self._database, self._store = database, store
        return self._store

    async def close(self) -> None:
        """Close the store and hand the database back (its runs are gone for good)."""
        store, database = self._store, self._database
        self._store = self._database = None
        try:
            if store is not None:
                await store.close()
        finally:
            if database is not None:
                database.release()

    async def reset(self) -> None:
        """Start over in the same open simulation: an empty database (the app's rate limits
        declared again), the clock back at ``start``, run ids drawn from the seed again."""
        store = await self.store()
        await store.empty()
        await declare_rate_limits(store, self.app.rate_limits)
        self.clock = VirtualClock(self._start)
        self._forget()

    async def start(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        input: Any = None,
        *,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
    ) -> uuid.UUID:
        """Start a run of ``fn`` with ``input`` (as ``app.start`` would, with the function's
        options) without driving it: the next ``run`` drives it with the rest. Only in an
        open simulation (``async with``), whose database outlives this call."""
        if self._store is None:
            raise SimulationError(
                "Simulation.start needs an open simulation: `async with Simulation(app) as sim`"
            )
        spec = self._spec(fn)
        what = f"simulate {spec.name!r}"
        limit = self.app.settings.max_payload_bytes
        data = validate_input(spec.input_type, input, what, limit) if spec.takes_input else None
        run_id = uuid.UUID(int=self._ids.getrandbits(128), version=4)
        run = new_run(
            self.app.functions,
            spec.name,
            data,
            run_id=run_id,
            priority=priority,
            delay=delay,
            start_at=start_at,
        )
        await self._store.start_runs([run])
        self._origins[run_id] = self.clock.now()
        return run_id

    async def run(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        input: Any = None,
        *,
        events: Sequence[Send] = (),
        crashes: Iterable[int] = (),
        shuffle: int | None = None,
        lateness: Sequence[timedelta] = (),
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        upgrade: App | None = None,
    ) -> Outcome:
        """Start a run of ``fn`` and drive every run of the simulation until none is due and no
        event is left to send; return this run's ``Outcome``.

        ``events`` are sent at their times after this run's start. ``crashes`` are indexes
        into the checkpoints passed (``Outcome.checkpoints`` of an uninterrupted run names
        them): at each, the attempt dies as under SIGKILL and the next attempt resumes by
        replay. ``shuffle`` (a seed) varies the order in which parallel branches start and
        finish. ``lateness`` delays the next due times in turn (timers picked up late, as by a
        busy or restarted worker). ``priority``, ``delay`` and ``start_at`` are ``start``'s.
        ``upgrade`` deploys new code at the first crash: from the attempt after it on, every
        run executes on ``upgrade``'s functions (``upgrade_at_every_point`` does this at each
        journal boundary in turn); the simulation keeps ``upgrade`` as its app afterwards.
        """
        if self._store is None:
            async with self:
                return await self.run(
                    fn,
                    input,
                    events=events,
                    crashes=crashes,
                    shuffle=shuffle,
                    lateness=lateness,
                    priority=priority,
                    delay=delay,
                    start_at=start_at,
                    upgrade=upgrade,
                )
        run_id = await self.start(fn, input, priority=priority, delay=delay, start_at=start_at)
        self._probe = Probe(crashes, None if shuffle is None else random.Random(shuffle))
        self._upgrade = upgrade
        await self._drive(self._origins[run_id], events, lateness)
        return await self.outcome(run_id)

    def _spec(self, fn: Callable[..., Awaitable[Any]] | str) -> FunctionSpec:
        spec = self.app.spec_for(fn)
        if spec is None:
            raise SimulationError(f"no durable function named {fn!r} in this app")
        return spec

    async def _drive(
        self, origin: datetime, events: Sequence[Send], lateness: Sequence[timedelta]
    ) -> None:
        """Claim and execute one attempt at a time, with every function of the app, moving the
        clock when nothing is due: to the database's next due time or the next event."""
        store = await self.store()
        _lineage.install(asyncio.get_running_loop())
        schedule = sorted(enumerate(events), key=lambda item: (item[1].at, item[0]))
        late = list(lateness)
        idle = 0
        while True:
            while schedule and origin + schedule[0][1].at <= self.clock.now():
                event = schedule.pop(0)[1]
                await store.send_event(event.name, event.key or "", dump(Any, event.payload, ""))
            code = CodeVersions.of(self.app.functions)  # each time: an upgrade swaps the app
            claims, due, _now = await store.claim_due(
                code.names, 1, _WORKER, _LEASE, code.versions, code.pinned
            )
            if claims:
                idle = 0
                await self._attempt(store, claims[0])
                continue
            next_event = origin + schedule[0][1].at if schedule else None
            if due is None and next_event is None:
                return
            if due is not None and (next_event is None or due <= next_event):
                due += late.pop(0) if late else timedelta(0)
            moment = min(t for t in (due, next_event) if t is not None)
            idle = idle + 1 if moment <= self.clock.now() else 0
            if idle > _MAX_IDLE_ROUNDS:
                raise SimulationError(f"a run is due at {moment} but no claim takes it")
            self.clock.advance_to(moment)

    async def _attempt(self, store: PostgresStore, claim: Claim) -> None:
        probe = self._probe
        probe.attempts += 1
        if probe.attempts > self.max_attempts:
            raise SimulationError(
                f"the runs did not settle in {self.max_attempts} attempts (last: run "
                f"{claim.run_id} of {claim.function!r}, attempt {claim.attempt})"
            )
        probe.crashed_attempt = False
        self._claimed_at[(claim.run_id, claim.attempt)] = claim.db_now
        execution = Execution(
            store,
            self.app.functions,
            DatabaseTime(self.clock),
            short_wait=0.0,
            rng=random.Random(self.seed),
            max_payload_bytes=self.app.settings.max_payload_bytes,
            probe=probe,
            stubs=self.stubs,
            seed=f"{self.seed}/{claim.run_id}",
        )
        await Runner(execution, claim).execute()
        if probe.crashed_attempt:  # the next attempt starts at once, as if the lease had run out
            await store.release(claim.run_id, claim.attempt)
            if self._upgrade is not None:  # a deploy: the old workers are gone, new ones start
                self.app, self._upgrade = self._upgrade, None

    async def outcome(self, run_id: uuid.UUID) -> Outcome:
        """The ``Outcome`` of any run of this open simulation as it stands (one started with
        ``start``, or a child), with what the last ``run`` saw while driving it."""
        store = await self.store()
        row = await store.get_run(run_id)
        if row is None:
            raise SimulationError(f"no run {run_id} in this simulation")
        spec = self.app.functions.get(row.function)
        result = row.result
        if row.status == "completed" and spec is not None:
            result = load(spec.return_type, row.result)
        journal = [
            replace(e, created_at=self._claimed_at.get((run_id, e.attempt), e.created_at))
            for e in await store.load_journal(run_id)
        ]
        origin = self._origins.get(run_id) or row.started_at or self.clock.now()
        probe = self._probe
        return Outcome(
            run_id=run_id,
            status=row.status,
            result=result,
            error=ErrorInfo.from_json(row.error) if row.error else None,
            journal=journal,
            waits=await store.list_waits(run_id),
            checkpoints=list(probe.passed),
            crashes=list(probe.crashed),
            executions=probe.executions_seen_from(run_id),
            reruns=probe.reruns_seen_from(run_id),
            attempts=probe.attempts,
            elapsed=(row.finished_at or self.clock.now()) - origin,
        )
