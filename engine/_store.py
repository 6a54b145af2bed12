"""``PostgresStore``: the only module that executes SQL, typed methods over the named queries.

It keeps the contract of ``engine._records.Store``: every method that changes a run takes the
claim (``attempt``) its caller holds and writes nothing when that claim is gone, so a worker that
lost its lease cannot append, suspend or finish. Every public method surfaces the driver's
errors as the engine's (``engine._driver``): ``DatabaseUnavailable``, ``SerializationError``,
``DatabaseError``.

Over 400 lines: every statement the engine runs is a method here, by design (one module holds
the SQL calls, STYLE 5), each a few lines of typed wrapper around one named query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar

import asyncpg

from engine import _metrics, _schema
from engine._clock import Clock
from engine._codec import compact_json
from engine._driver import TRANSIENT, Pool, open_pool, surfaced, surfacing_methods
from engine._group_commit import GroupCommit, Outcome, PendingEntry, PendingFinish
from engine._queries import queries
from engine._records import (
    AwaitOutcome,
    ChildOutcome,
    Claim,
    EndStatus,
    JournalEntry,
    NewRun,
    RunFilter,
    RunRow,
    ScheduleRow,
    StepTiming,
    WaitRow,
)
from engine._retention import Cleanup, SegmentRow
from engine._urls import redact
from engine.errors import ConfigurationError, DatabaseUnavailable, JournalConflict

log = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W")
R = TypeVar("R")

_RETRY_DELAYS = (0.05, 0.2, 0.5)
# At most one statement of runs' ends per 5 ms (GroupCommit's spacing): an end that comes
# within 5 ms of the last such statement's start waits out the rest with the ends made
# meanwhile, and one after a quieter spell goes at once. (Measured on W1 and W2 started
# singly: 5 ms took more off each run's CPU, the process's and the database's, than 2 ms.)
# Ends made with ``enough`` (their worker is full: due runs wait for the slots they free) go at
# once when that many wait together (a claim's worth): spaced, a drained queue's every claim
# waited on the last claim's ends waiting out the spacing.
_FINISH_SPACING = 0.005


def _by_run(rows: Sequence[asyncpg.Record], make: Callable[..., R]) -> dict[uuid.UUID, list[R]]:
    """Rows of many runs (each with a run_id column first), as ``make(**rest)`` grouped by run."""
    grouped: dict[uuid.UUID, list[R]] = {}
    for row in rows:
        fields = dict(row.items())
        grouped.setdefault(fields.pop("run_id"), []).append(make(**fields))
    return grouped


def _run_row(record: asyncpg.Record) -> RunRow:
    return RunRow(**dict(record.items()))


@surfacing_methods
class PostgresStore:
    """A connection pool and the engine's transitions (``engine._records.Store``), one round
    trip each."""

    def __init__(
        self,
        pool: Pool,
        dsn: str,
        *,
        pooled: bool = False,
        listen_dsn: str | None = None,
    ) -> None:
        self._pool = pool
        self.dsn = dsn
        self.pooled = pooled
        # Where LISTEN goes: never through a transaction pooler, which would hand the session
        # that listens to other clients. None: nowhere, notifications are to be polled for.
        self.listen_dsn = listen_dsn or (None if pooled else dsn)
        self._q = queries()
        self.appends: GroupCommit[PendingEntry, Outcome] = GroupCommit(self._append_entries)
        self.finishes: GroupCommit[PendingFinish, bool] = GroupCommit(
            self._finish_runs, spacing=_FINISH_SPACING
        )
        # Reads go together the same way: the journals asked for in one turn of the event
        # loop (the runs of one claim, resumed together) come in one query; a few queries at
        # once, so that one slow load (a long journal) does not hold up the others.
        self.journal_loads: GroupCommit[uuid.UUID, list[JournalEntry]] = GroupCommit(
            self._load_journals_of, max_in_flight=4
        )

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        max_size: int = 10,
        connect_timeout: float | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        pooled: bool = False,
        listen_dsn: str | None = None,
    ) -> Self:
        """Open a pool, retrying an unreachable database with capped exponential backoff.

        ``connect_timeout=None`` retries forever (a worker outlives a database restart); a
        malformed URL fails at once with ConfigurationError. With a ``clock`` (a test's virtual
        clock), the database reads its time from that clock instead of its own: every call sets
        ``durable.fake_now``, which ``durable.clock()`` honours.

        ``pooled``: ``dsn`` goes through a transaction pooler (PgBouncer in transaction mode),
        so no call leaves anything in a server session (``engine._driver.open_pool``), and
        LISTEN goes to ``listen_dsn`` (a direct connection) or nowhere (``listen_dsn`` is then
        None: poll). Without ``pooled``, LISTEN goes to ``listen_dsn`` or else to ``dsn``.
        """
        rng = rng or random.Random()
        loop = asyncio.get_running_loop()
        deadline = None if connect_timeout is None else loop.time() + connect_timeout
        delay = 0.1
        while True:
            try:
                pool = await open_pool(dsn, max_size, clock, pooled=pooled)
            except (
                ValueError,
                asyncpg.InvalidCatalogNameError,
                asyncpg.InvalidAuthorizationSpecificationError,
            ) as exc:
                raise ConfigurationError(f"cannot use database URL {redact(dsn)}: {exc}") from exc
            except TRANSIENT as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    raise DatabaseUnavailable(
                        f"database {redact(dsn)} unreachable after {connect_timeout}s: {exc}"
                    ) from exc
                log.warning(
                    "database %s unreachable (%s); retrying in %.1fs", redact(dsn), exc, delay
                )
                await asyncio.sleep(delay * (0.5 + rng.random()))
                delay = min(delay * 2, 10.0)
                continue
            except asyncpg.PostgresError as exc:  # refused for good, not out of reach
                raise surfaced(exc) from exc
            return cls(pool, dsn, pooled=pooled, listen_dsn=listen_dsn)

    async def close(self) -> None:
        await self._pool.close()

    async def _once(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a call that must not be repeated blindly (a write). When its connection died
        under it, the pool's connections are replaced (they may all be dead) and the error
        goes to the caller, which knows whether the write may have happened."""
        try:
            return await call()
        except TRANSIENT:
            await self._pool.expire_connections()
            raise

    async def _journaling(
        self, run_id: uuid.UUID, position: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """A journal write: once, and a second write to a position is a JournalConflict."""
        try:
            return await self._once(call)
        except asyncpg.UniqueViolationError as exc:
            _metrics.journal_conflicts.add(1)
            raise JournalConflict(
                f"run {run_id}: journal position {position} is already written"
            ) from exc

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent call again when its connection died under it (a restart, a
        terminated backend); the pool's connections are replaced before each new try."""
        for delay in _RETRY_DELAYS:
            try:
                return await call()
            except TRANSIENT as exc:
                log.debug("retrying after a connection failure: %s", exc)
                await self._pool.expire_connections()
                await asyncio.sleep(delay)
        return await self._once(call)

    async def listen(
        self,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> Callable[[], None]:
        """LISTEN on ``channels`` on a connection of its own to ``listen_dsn``, outside the
        pool: each notification calls ``on_notify(channel, payload)``, and ``on_lost()`` is
        called when that connection ends. Returns the function that closes it.
        ConfigurationError when there is nowhere to listen (pooled, with no ``listen_dsn``)."""
        if self.listen_dsn is None:
            raise ConfigurationError(
                f"{redact(self.dsn)} goes through a transaction pooler and no URL to LISTEN "
                f"on was given: poll instead, or give a direct URL to listen on"
            )
        try:
            conn = await asyncpg.connect(self.listen_dsn)
        except (
            ValueError,
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise ConfigurationError(f"cannot LISTEN on {redact(self.listen_dsn)}: {exc}") from exc
        try:
            conn.add_termination_listener(lambda _conn: on_lost())
            for channel in channels:
                await conn.add_listener(
                    channel, lambda _c, _pid, ch, payload: on_notify(ch, payload)
                )
        except BaseException:
            conn.terminate()
            raise
        close: Callable[[], None] = conn.terminate
        return close

    # -- schema -------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Bring the schema to this code's (``engine._schema.migrate``); returns the versions of
        the migrations applied now. ConfigurationError for a database it must not touch.

        Behind a transaction pooler the whole of it is one transaction, which keeps it on one
        server session (``_migrate_pooled``)."""
        async with self._pool.acquire() as conn:
            if self.pooled:
                return await _schema.migrate_pooled(conn)
            return await _schema.migrate(conn)

    async def empty(self) -> None:
        """Delete every run, journal entry, event, wait, grant, rate limit and schedule (the
        schema stays): for ``durable.testing``, on the databases it made for simulations."""
        await self._once(lambda: self._pool.execute(self._q["empty_database"]))

    # -- starting and claiming ----------------------------------------------------------------

    async def start_runs_on(
        self, conn: asyncpg.Connection[Any], runs: Sequence[NewRun]
    ) -> list[tuple[uuid.UUID, bool]]:
        """``start_runs`` on the caller's connection, inside its transaction: the runs exist if
        and only if that transaction commits (their NOTIFY is delivered at the commit). Runs
        once; errors are the caller's, as its transaction is."""
        if not runs:
            return []
        if len(runs) == 1 and _one_statement(runs[0]):
            row = await conn.fetchrow(self._q["start_run"], *_run_args(runs[0]), *_UNCLAIMED)
            if row is not None:
                return [(row["id"], True)]
        rows = await conn.fetch(self._q["create_runs"], _json([_run_doc(r) for r in runs]))
        return [(row["run_id"], row["created"]) for row in rows]

    async def start_run_on(
        self, conn: asyncpg.Connection[Any], run: NewRun
    ) -> tuple[uuid.UUID, bool]:
        """``start_runs_on`` for one run."""
        [started] = await self.start_runs_on(conn, [run])
        return started

    async def start_runs(self, runs: Sequence[NewRun]) -> list[tuple[uuid.UUID, bool]]:
        """Start many runs in one statement, in order (durable.create_runs; one fresh run by
        start_run). Tried again when the connection is lost, each run then looked for first:
        a try that was lost may have inserted it, so a fresh run is fresh no more."""
        if not runs:
            return []
        if len(runs) == 1 and _one_statement(runs[0]):
            try:
                row = await self._pool.fetchrow(
                    self._q["start_run"], *_run_args(runs[0]), *_UNCLAIMED
                )
            except TRANSIENT:
                await self._pool.expire_connections()
                runs = [runs[0].named()]
            else:
                if row is not None:
                    return [(row["id"], True)]
        tries = 0

        async def create() -> list[asyncpg.Record]:
            nonlocal tries
            tries += 1
            given = runs if tries == 1 else [r.named() for r in runs]
            return await self._pool.fetch(
                self._q["create_runs"], _json([_run_doc(r) for r in given])
            )

        rows = await self._retrying(create)
        return [(row["run_id"], row["created"]) for row in rows]

    async def start_claimed(
        self,
        run: NewRun,
        worker: str,
        lease: timedelta,
        functions: Sequence[str],
        versions: Sequence[str],
        pinned: Sequence[str] = (),
    ) -> tuple[uuid.UUID, bool, Claim | None]:
        """Start ``run`` and claim it for ``worker`` in one statement when nothing stands between
        it and a worker (durable.start_claimed): its id, whether it was created, and the claim
        (None: the run waits for a claim, and workers were told). Runs once: a connection lost
        under it is raised, and the caller starts the run the usual way, which finds it if it
        was created (its lease then lapses for another claim, as a crashed worker's does): the
        caller must start it as not fresh (``run.named()``)."""
        claiming = (worker, lease, list(functions), _versions(functions, versions), list(pinned))
        if _one_statement(run):
            # Flat when the run will be claimed (start_run_claimed checks it again, and
            # inserts nothing when its class has no open segment: start_claimed follows).
            flat = _claimable(run) and run.function in functions
            query = self._q["start_run_claimed" if flat else "start_run"]
            args = (*_run_args(run), *claiming)
            started = await self._once(lambda: self._pool.fetchrow(query, *args))
            if started is not None:
                claim = _claim(started) if started["claimed"] else None
                return started["id"], True, claim
        doc = _json(_run_doc(run))
        row = await self._once(
            lambda: self._pool.fetchrow(self._q["start_claimed"], doc, *claiming)
        )
        assert row is not None
        claim = _claim(row) if row["id"] is not None else None
        return row["run_id"], row["created"], claim

    async def claim(
        self,
        functions: Sequence[str],
        limit: int,
        worker: str,
        lease: timedelta,
        versions: Sequence[str] | None = None,
        pinned: Sequence[str] = (),
    ) -> list[Claim]:
        """Claim up to ``limit`` due runs of ``functions`` (pending, timers due, leases expired),
        which this worker runs at ``versions`` (aligned with ``functions``: each claim records
        the version of its attempt). A run's first claim pins it when its function is one of
        ``pinned``; a pinned run that started on another version is left to that version's
        workers."""
        names, at, pins = list(functions), _versions(functions, versions), list(pinned)
        rows = await self._once(
            lambda: self._pool.fetch(self._q["claim_runs"], names, limit, worker, lease, at, pins)
        )
        return [_claim(r) for r in rows]

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
        """``claim`` and ``next_due`` in one statement (a worker's every wake-up)."""
        names, at, pins = list(functions), _versions(functions, versions), list(pinned)
        rows = await self._once(
            lambda: self._pool.fetch(
                self._q["claim_due"], names, limit, worker, lease, at, pins, ahead
            )
        )
        *claimed, last = rows
        # The claims' db_now is when the claim began; the last row's, when it ended: closer to
        # the moment the worker reads it, so the database time it estimates lags less.
        now = last["db_now"]
        return [_claim(r, now) for r in claimed], last["next_due"], now

    async def next_due(
        self, functions: Sequence[str], versions: Sequence[str] | None = None
    ) -> tuple[datetime | None, datetime]:
        """The earliest time a run of ``functions`` becomes claimable (by a worker of
        ``versions``), and the database's now."""
        names, at = list(functions), _versions(functions, versions)
        row = await self._retrying(lambda: self._pool.fetchrow(self._q["next_due"], names, at))
        assert row is not None
        return row[0], row[1]

    async def retry_paused(self, functions: Sequence[str], versions: Sequence[str]) -> int:
        """Make pending again, once per version, the runs of ``functions`` that a
        non-determinism paused on versions other than ``versions`` (a worker's, at its start);
        returns how many."""
        names, at = list(functions), _versions(functions, versions)
        count: int = await self._once(
            lambda: self._pool.fetchval(self._q["retry_paused"], names, at)
        )
        return count

    async def renew_leases(
        self, held: Sequence[tuple[uuid.UUID, int]], worker: str, lease: timedelta
    ) -> dict[uuid.UUID, bool]:
        """Extend the leases of ``held`` (run, attempt) pairs; returns the runs still held, each
        with whether it has been asked to cancel."""
        if not held:
            return {}
        rows = await self._once(
            lambda: self._pool.fetch(
                self._q["renew_claims"], [h[0] for h in held], [h[1] for h in held], worker, lease
            )
        )
        return {r["id"]: r["cancel_requested"] for r in rows}

    # -- the journal --------------------------------------------------------------------------

    async def load_journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        """The whole journal of a run, in one query, shared with the loads asked for meanwhile
        (``journal_loads``)."""
        return await self.journal_loads.write(run_id)

    async def _load_journals_of(
        self, run_ids: Sequence[uuid.UUID]
    ) -> list[list[JournalEntry] | BaseException]:
        if len(run_ids) == 1:  # its own query: no array parameter to resolve on a connection
            rows = await self._retrying(
                lambda: self._pool.fetch(self._q["load_journal"], run_ids[0])
            )
            return [[JournalEntry(**dict(r.items())) for r in rows]]
        journals = await self.load_journals(run_ids)
        return [journals.get(run_id, []) for run_id in run_ids]

    async def read_journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        """``load_journal`` with each step's tries (``timing``), which replay does not need:
        for people (``RunHandle.journal``, the dashboard)."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["read_journal"], run_id))
        return [JournalEntry(**dict(r.items())) for r in rows]

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
        """Append one journal entry; False when the claim ``attempt`` is no longer held.

        Returns once the entry is committed. Appends made meanwhile by other runs share the
        statement (group commit, ``engine._group_commit``)."""
        outcome = await self.appends.write(
            PendingEntry(run_id, attempt, position, kind, name, value, error, timing)
        )
        if outcome == "conflict":
            _metrics.journal_conflicts.add(1)
            raise JournalConflict(f"run {run_id}: journal position {position} is already written")
        return outcome == "written"

    async def _append_entries(
        self, entries: Sequence[PendingEntry]
    ) -> list[Outcome | BaseException]:
        return await _isolating(self._append_statement, entries)

    async def _append_statement(self, entries: Sequence[PendingEntry]) -> list[Outcome]:
        rows = await self._once(
            lambda: self._pool.fetch(
                self._q["append_entries"],
                [e.run_id for e in entries],
                [e.attempt for e in entries],
                [e.position for e in entries],
                [e.kind for e in entries],
                [e.name for e in entries],
                [_json(e.value) for e in entries],
                [_json(e.error) for e in entries],
                [e.timing.started_at if e.timing else None for e in entries],
                [e.timing.duration_ms if e.timing else None for e in entries],
                [_tries(e.timing) for e in entries],
            )
        )
        return [row["outcome"] for row in rows]

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
        """Journal a sleep; returns its wake time (fixed by the database), None when fenced."""
        result: datetime | None = await self._journaling(
            run_id,
            position,
            lambda: self._pool.fetchval(
                self._q["append_sleep"], run_id, attempt, position, name, wake_at, duration
            ),
        )
        return result

    async def await_event(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        name: str,
        key: str,
        timeout: timedelta | None,
    ) -> AwaitOutcome:
        """Receive the next event on (name, key) or register the wait (see functions.sql)."""
        row = await self._journaling(
            run_id,
            position,
            lambda: self._pool.fetchrow(
                self._q["await_event"], run_id, attempt, position, name, key, timeout
            ),
        )
        assert row is not None
        return AwaitOutcome(row["outcome"], row["payload"], row["timeout_at"])

    async def send_event_on(
        self,
        conn: asyncpg.Connection[Any],
        name: str,
        key: str,
        payload: Any,
        retention: timedelta | None = None,
    ) -> int:
        """``send_event`` on the caller's connection, inside its transaction: the event exists,
        and wakes its waiters, if and only if that transaction commits."""
        event_id: int = await conn.fetchval(
            self._q["send_event_on"], name, key, _json(payload), retention
        )
        return event_id

    async def send_event(
        self, name: str, key: str, payload: Any, retention: timedelta | None = None
    ) -> int:
        """Store an event and wake the runs waiting on (name, key); returns the event id. The
        event is kept as long as ``retention`` (None: for ever), and while a run may still
        receive it."""
        event_id: int = await self._once(
            lambda: self._pool.fetchval(self._q["send_event"], name, key, payload, retention)
        )
        return event_id

    # -- ending an attempt --------------------------------------------------------------------

    async def suspend(self, run_id: uuid.UUID, attempt: int, until: datetime | None) -> bool:
        """Drop the claim until ``until`` (None: until an event). False when fenced."""
        return bool(
            await self._once(
                lambda: self._pool.fetchval(self._q["suspend_run"], run_id, attempt, until)
            )
        )

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
        """End the attempt as completed, failed or paused. False when fenced. Ends made
        meanwhile by other runs share the statement (group commit), at most one per
        ``_FINISH_SPACING`` unless ``enough`` ends wait for it."""
        return await self.finishes.write(
            PendingFinish(run_id, attempt, status, result, error), enough=enough
        )

    async def _finish_runs(self, ends: Sequence[PendingFinish]) -> list[bool | BaseException]:
        return await _isolating(self._finish_statement, ends)

    async def _finish_statement(self, ends: Sequence[PendingFinish]) -> list[bool]:
        rows = await self._once(
            lambda: self._pool.fetch(
                self._q["finish_runs"],
                [e.run_id for e in ends],
                [e.attempt for e in ends],
                [e.status for e in ends],
                [_json(e.result) for e in ends],
                [_json(e.error) for e in ends],
            )
        )
        return [bool(row["finished"]) for row in rows]

    async def release(self, run_id: uuid.UUID, attempt: int) -> bool:
        """Give a running run back to the queue at once."""
        return bool(
            await self._once(lambda: self._pool.fetchval(self._q["release_run"], run_id, attempt))
        )

    async def resume(self, run_id: uuid.UUID) -> bool:
        """Make a paused run runnable again. False when it is not paused."""
        return bool(await self._once(lambda: self._pool.fetchval(self._q["resume_run"], run_id)))

    # -- children, cancellation, rate limits -----------------------------------------------

    async def start_child(
        self, run_id: uuid.UUID, attempt: int, position: str, child: NewRun
    ) -> bool:
        """Start ``child`` and journal it at ``position``, in one transaction."""
        outcome = await self._journaling(
            run_id,
            position,
            lambda: self._pool.fetchval(
                self._q["start_child"], run_id, attempt, position, _run_doc(child)
            ),
        )
        return bool(outcome == "written")

    async def await_child(
        self, run_id: uuid.UUID, attempt: int, position: str, name: str, child: uuid.UUID
    ) -> ChildOutcome:
        """Journal the child's end at ``position``, or register the wait (see functions.sql)."""
        row = await self._journaling(
            run_id,
            position,
            lambda: self._pool.fetchrow(
                self._q["await_child"], run_id, attempt, position, name, child
            ),
        )
        assert row is not None
        return ChildOutcome(row["outcome"], row["status"], row["result"], row["error"])

    async def cancel(self, run_id: uuid.UUID, reason: str) -> str:
        """Cancel a run and its unfinished descendants (durable.cancel_run)."""
        outcome: str = await self._retrying(
            lambda: self._pool.fetchval(self._q["cancel_run"], run_id, reason)
        )
        return outcome

    async def define_rate_limit(self, name: str, limit: int, period: timedelta) -> None:
        await self._retrying(
            lambda: self._pool.execute(self._q["define_rate_limit"], name, limit, period)
        )

    async def take_rate(self, name: str, key: str, weight: int, holder: str) -> datetime | None:
        """Take units of a rate limit: None when granted now, else the time they are reserved
        for ``holder`` (durable.take_rate)."""
        try:
            retry: datetime | None = await self._once(
                lambda: self._pool.fetchval(self._q["take_rate"], name, key, weight, holder)
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in ("DU002", "DU003"):  # not declared; a weight over the budget
                raise ConfigurationError(str(exc)) from exc
            raise
        return retry

    # -- schedules ----------------------------------------------------------------------------

    async def define_schedule(self, row: ScheduleRow) -> None:
        """Store a schedule's declaration and its ``next_tick`` (the ``last_*`` fields of
        ``row`` are not written: a tick sets them)."""
        await self._retrying(
            lambda: self._pool.execute(
                self._q["define_schedule"],
                row.name,
                row.function,
                row.cron,
                row.timezone,
                _json(row.input),
                row.catch_up,
                row.next_tick,
            )
        )

    async def list_schedules(
        self, names: Sequence[str] | None = None
    ) -> tuple[list[ScheduleRow], datetime]:
        """The stored schedules (of ``names``, or all), by name, and the database's now."""
        names_given = None if names is None else list(names)

        async def read() -> tuple[list[ScheduleRow], datetime]:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q["list_schedules"], names_given)
                now: datetime = await conn.fetchval(self._q["now"])
            return [ScheduleRow(**dict(r.items())) for r in rows], now

        return await self._retrying(read)

    async def fire_schedule(
        self, name: str, expected: datetime, tick: datetime, following: datetime, run: NewRun
    ) -> uuid.UUID | None:
        """Fire one tick (compare and set on the next tick); None if another worker did."""
        fired: uuid.UUID | None = await self._once(
            lambda: self._pool.fetchval(
                self._q["fire_schedule"], name, expected, tick, following, _run_doc(run)
            )
        )
        return fired

    # -- reading ------------------------------------------------------------------------------

    async def get_run(self, run_id: uuid.UUID, *, waiter: str | None = None) -> RunRow | None:
        """The run as stored. ``waiter``: the process reading it will await its end, and is
        recorded in durable.result_waiters by the same statement."""
        args: tuple[Any, ...] = (run_id,) if waiter is None else (run_id, waiter)
        query = self._q["get_run" if waiter is None else "get_run_recording_waiter"]
        row = await self._retrying(lambda: self._pool.fetchrow(query, *args))
        return None if row is None else _run_row(row)

    async def find_runs(
        self,
        where: RunFilter,
        *,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[RunRow]:
        """Runs matching ``where``, newest first: a page of at most ``limit`` created before the
        run ``after`` (its created_at and id: keyset pagination, as fast on the last page as on
        the first)."""
        args = _filter_args(where)
        status = where.status
        at, last = after if after is not None else (None, None)
        query = self._q["find_runs"]
        rows = await self._retrying(
            lambda: self._pool.fetch(query, status, *args[:8], at, last, limit, args[8])
        )
        return [_run_row(r) for r in rows]

    async def count_runs(self, where: RunFilter, *, cap: int) -> dict[str, int]:
        """How many runs match ``where`` (its status aside), by status, counting at most
        ``cap`` of each."""
        args = _filter_args(where)
        rows = await self._retrying(lambda: self._pool.fetch(self._q["count_runs"], *args, cap))
        return {r["status"]: r["runs"] for r in rows}

    async def touch_watcher(self, watcher: str) -> None:
        """Say that ``watcher`` still watches runs live (journal appends are announced)."""
        await self._retrying(lambda: self._pool.execute(self._q["touch_watcher"], watcher))

    async def end_watcher(self, watcher: str) -> None:
        await self._retrying(lambda: self._pool.execute(self._q["end_watcher"], watcher))

    async def end_result_waiter(self, waiter: str) -> None:
        await self._retrying(lambda: self._pool.execute(self._q["end_result_waiter"], waiter))

    async def queue_depths(self) -> list[dict[str, Any]]:
        """Per queue: due (pending), scheduled and running runs, the oldest due run's
        creation, and now (the view durable.queue_depths)."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["queue_depths"]))
        return [dict(r.items()) for r in rows]

    # -- retention ------------------------------------------------------------------------------

    async def clean_up(self) -> Cleanup | None:
        """Open the segments due to open and drop those due to go (functions.sql, "Retention"),
        each step in a transaction of its own; None when another process is cleaning up.
        A DatabaseError with sqlstate 55P03 (lock_not_available): the tables were too busy to
        lock now; try again later."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                if not await conn.fetchval(self._q["try_cleanup_lock"]):
                    return None
                opened: int = await conn.fetchval(self._q["rotate_segments"])
            dropped: list[dict[str, Any]] = []
            for segment in await conn.fetchval(self._q["due_segments"]):
                async with conn.transaction():
                    if not await conn.fetchval(self._q["try_cleanup_lock"]):
                        break
                    report = await conn.fetchval(self._q["drop_segment"], segment)
                if report is not None:
                    dropped.append(json.loads(report))
        return Cleanup(opened, dropped)

    async def open_segments(self, retentions: Sequence[timedelta | None]) -> None:
        """Open the segments of these retention classes (None: for ever) where missing. A new
        partition needs the tables' lock, which is never queued for: tried again a few times
        while the tables stay busy."""
        for delay in (0.5, 1.0, 2.0, 4.0, None):
            try:
                await self._retrying(
                    lambda: self._pool.execute(self._q["open_segments"], list(set(retentions)))
                )
                return
            except asyncpg.LockNotAvailableError:
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def retention_status(self, dropped: int = 10) -> list[SegmentRow]:
        """Every segment not dropped yet, then the last ``dropped`` dropped ones."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["retention_status"], dropped))
        return [
            SegmentRow(
                **{k: v for k, v in r.items() if k not in ("kept", "removed")},
                kept=None if r["kept"] is None else json.loads(r["kept"]),
                removed=None if r["removed"] is None else json.loads(r["removed"]),
            )
            for r in rows
        ]

    async def count_suspended(self) -> int:
        count: int = await self._retrying(lambda: self._pool.fetchval(self._q["count_suspended"]))
        return count

    async def busy_keys(self, limit: int) -> list[dict[str, Any]]:
        """Concurrency keys holding or awaiting slots, the busiest first."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["busy_keys"], limit))
        return [dict(r.items()) for r in rows]

    async def rate_usage(self) -> list[dict[str, Any]]:
        """Each rate limit, its budget and period, and the units used in its window now."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["rate_usage"]))
        return [dict(r.items()) for r in rows]

    async def recent_events(self, limit: int) -> list[dict[str, Any]]:
        """The events sent last, newest first (payloads cut to their first 200 characters)."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["recent_events"], limit))
        return [dict(r.items()) for r in rows]

    async def list_children(self, run_id: uuid.UUID) -> list[RunRow]:
        rows = await self._retrying(lambda: self._pool.fetch(self._q["list_children"], run_id))
        return [_run_row(r) for r in rows]

    async def list_waits(self, run_id: uuid.UUID) -> list[WaitRow]:
        rows = await self._retrying(lambda: self._pool.fetch(self._q["list_waits"], run_id))
        return [WaitRow(**dict(r.items())) for r in rows]

    async def load_journals(
        self, run_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[JournalEntry]]:
        """The journals of many runs in one query, each in the order it was written (a run
        with no entries is absent)."""
        ids = list(run_ids)
        rows = await self._retrying(lambda: self._pool.fetch(self._q["load_journals"], ids))
        return _by_run(rows, JournalEntry)

    async def select_runs(
        self,
        statuses: Sequence[str],
        *,
        function: str | None = None,
        within: timedelta | None = None,
        forked: bool | None = None,
        limit: int = 1000,
        after: uuid.UUID | None = None,
    ) -> list[RunRow]:
        """Runs of ``statuses`` (of ``function``, created within ``within`` of the database's
        now, forked from by some run or not), in id order after ``after``: one page of at most
        ``limit`` (bulk retries)."""
        wanted = list(statuses)
        query = self._q["select_runs"]
        rows = await self._retrying(
            lambda: self._pool.fetch(query, wanted, function, within, limit, after, forked)
        )
        return [_run_row(r) for r in rows]

    async def load_waits(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[WaitRow]]:
        """The registered waits of many runs in one query (a run with none is absent)."""
        ids = list(run_ids)
        rows = await self._retrying(lambda: self._pool.fetch(self._q["load_waits"], ids))
        return _by_run(rows, WaitRow)

    async def runs_to_check(
        self, statuses: Sequence[str], *, limit: int, after: uuid.UUID | None = None
    ) -> list[RunRow]:
        """Runs of ``statuses`` in id order after ``after``, one page of at most ``limit``, with
        the columns of the first migration only (``durable check`` reads a database before the
        code that migrates it is deployed)."""
        wanted = list(statuses)
        rows = await self._retrying(
            lambda: self._pool.fetch(self._q["runs_to_check"], wanted, after, limit)
        )
        return [_run_row(r) for r in rows]

    async def recent_completed(self, limit: int, skip: int = 0) -> list[RunRow]:
        """The runs that completed last, as ``runs_to_check``: at most ``limit`` after the
        first ``skip``."""
        rows = await self._retrying(
            lambda: self._pool.fetch(self._q["recent_completed"], limit, skip)
        )
        return [_run_row(r) for r in rows]

    async def fork(
        self,
        source: uuid.UUID,
        new: uuid.UUID,
        keep: Sequence[str],
        position: str | None,
        *,
        input: Any = None,
        replace_input: bool = False,
    ) -> bool:
        """Start run ``new`` as a fork of ``source``: its options, its input (or ``input``),
        and a copy of its journal entries at positions ``keep`` (durable.fork_run). False when
        there is no run ``source``."""
        keep_list = list(keep)
        outcome = await self._once(
            lambda: self._pool.fetchval(
                self._q["fork_run"],
                source,
                new,
                keep_list,
                position,
                _json(input),
                replace_input,
            )
        )
        return bool(outcome == "forked")

    async def list_versions(self) -> list[dict[str, Any]]:
        """Runs by function, the version they started on (None: not started) and status."""
        rows = await self._retrying(lambda: self._pool.fetch(self._q["list_versions"]))
        return [dict(r.items()) for r in rows]


async def _isolating(
    statement: Callable[[Sequence[W]], Awaitable[list[R]]], writes: Sequence[W]
) -> list[R | BaseException]:
    """Run a group-commit statement; when the database refuses it (a value it cannot store),
    run each write on its own, so that the bad one fails its own run alone. A statement whose
    connection died (a terminated backend is a PostgresError too) fails every write in it: none
    is sent again, and each caller's run takes it from its journal."""
    try:
        return list(await statement(writes))
    except asyncpg.PostgresError as exc:
        if len(writes) == 1 or isinstance(exc, TRANSIENT):
            raise
    outcomes: list[R | BaseException] = []
    for write in writes:
        try:
            outcomes.extend(await statement([write]))
        except asyncpg.PostgresError as exc:
            outcomes.append(exc)
    return outcomes


def _claim(row: asyncpg.Record, db_now: datetime | None = None) -> Claim:
    return Claim(
        run_id=row["id"],
        function=row["function"],
        input=row["input"],
        attempt=row["attempt"],
        trace_context=row["trace_context"],
        db_now=row["db_now"] if db_now is None else db_now,
        deadline_at=row["deadline_at"],
        forked=bool(row["forked"]),
        created_at=row["created_at"],
        due_at=row["due_at"],
    )


# start_run's worker, lease, functions, versions and pinned functions for a start not claimed.
_UNCLAIMED = (None, None, None, None, None)


def _one_statement(run: NewRun) -> bool:
    """Whether ``run`` may start by queries.sql's start_run: fresh (nothing to look for or
    lock), with no idempotency key and no concurrency strategy that acts on other runs."""
    return run.fresh and run.idempotency_key is None and run.strategy == "queue"


def _claimable(run: NewRun) -> bool:
    """Whether ``run``, started by a worker that serves its function, is claimed as it is
    inserted (durable.new_run's claim, for a run given no start time: due at once, with no
    concurrency key or rate limit in the way, and a start timeout, if any, still ahead)."""
    return (
        run.available_at is None
        and run.delay is None
        and run.concurrency_key is None
        and run.rate_limit is None
        and (run.start_timeout is None or run.start_timeout > timedelta(0))
    )


def _versions(functions: Sequence[str], versions: Sequence[str] | None) -> list[str]:
    """``versions`` as the claim reads them: one per function (empty: not known)."""
    if versions is None:
        return [""] * len(functions)
    if len(versions) != len(functions):
        raise ValueError(f"{len(functions)} functions but {len(versions)} versions")
    return list(versions)


# queries.sql's start_run's parameters $1 to $18: the options of ``_run_doc``, in this order
# (the input, the trace context and the tags as JSON text).
_START_RUN_OPTIONS = (
    "id",
    "function",
    "input",
    "trace_context",
    "priority",
    "available_at",
    "delay",
    "start_timeout",
    "run_timeout",
    "parent_id",
    "concurrency_key",
    "concurrency_limit",
    "slot_while_suspended",
    "rate_limit",
    "rate_key",
    "tags",
    "queue",
    "retention",
)
_JSON_OPTIONS = frozenset({"trace_context", "tags"})


def _run_args(run: NewRun) -> list[Any]:
    """``run`` as queries.sql's start_run takes it: the values of its ``_run_doc`` (None where
    an option is left at its default), so that both statements read the same values."""
    doc = _run_doc(run)
    doc["input"] = compact_json(doc["input"])  # always there: None is null
    return [_json(doc.get(o)) if o in _JSON_OPTIONS else doc.get(o) for o in _START_RUN_OPTIONS]


def _run_doc(run: NewRun) -> dict[str, Any]:
    """A run as durable.create_runs reads it: one JSON object, without the options left at
    their defaults (a batch of thousands parses faster)."""
    doc: dict[str, Any] = {"id": str(run.run_id), "function": run.function, "input": run.input}
    at = _aware(run.available_at)
    options: dict[str, Any] = {
        "idempotency_key": run.idempotency_key,
        "trace_context": run.trace_context,
        "priority": run.priority or None,
        "available_at": None if at is None else at.isoformat(),
        "delay": _seconds(run.delay),
        "start_timeout": _seconds(run.start_timeout),
        "run_timeout": _seconds(run.run_timeout),
        "parent_id": None if run.parent_id is None else str(run.parent_id),
        "concurrency_key": run.concurrency_key,
        "concurrency_limit": run.concurrency_limit,
        "concurrency_strategy": None if run.strategy == "queue" else run.strategy,
        "slot_while_suspended": run.slot_while_suspended or None,
        "rate_limit": run.rate_limit,
        "rate_key": run.rate_key if run.rate_limit is not None else None,
        "tags": dict(run.tags) if run.tags else None,
        "queue": run.queue,
        "retention": _seconds(run.retention),
    }
    doc.update((k, v) for k, v in options.items() if v is not None)
    if run.fresh:
        doc["fresh"] = True
    return doc


def _tries(timing: StepTiming | None) -> str | None:
    """A step's failed tries as the journal's timing (None when it passed at once)."""
    if timing is None or not timing.failed_tries:
        return None
    return _json({"tries": list(timing.failed_tries)})


def _filter_args(where: RunFilter) -> list[Any]:
    """A filter as the parameters of find_runs and count_runs (status aside): function,
    queue, version, tags, since, until, the run id searched, the key searched, and the
    jsonpath that finds a tag of the searched value."""
    run_id, key, path = None, None, None
    if where.search is not None:
        try:
            run_id = uuid.UUID(where.search)
        except ValueError:
            key = where.search
            path = f"$.* == {json.dumps(where.search)}"
    tags = dict(where.tags) if where.tags else None
    return [
        where.function,
        where.queue,
        where.version,
        tags,
        where.since,
        where.until,
        run_id,
        key,
        path,
    ]


def _aware(moment: datetime | None) -> datetime | None:
    """``moment`` with a zone (a naive one taken as UTC, as the SDK takes it), so that neither
    the session's zone nor the process's decides what it means."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _seconds(span: timedelta | None) -> float | None:
    return None if span is None else span.total_seconds()


def _json(value: Any) -> str | None:
    """A value for a text[] parameter of JSON (see durable.append_entries); None stays NULL."""
    return None if value is None else compact_json(value)
