"""``MemoryStore``: the store contract kept in one process's memory, for fast tests.

It mirrors the plpgsql functions of ``sql/schema.sql`` rule for rule (the contract suite in
tests/contract runs against both), with time read from an injected clock, so that a test on a
virtual clock sleeps for a week in no time. Values are copied through JSON on the way in and
out, as they would be by Postgres, so a caller can never mutate what was stored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from engine._clock import Clock, SystemClock
from engine._records import (
    AwaitOutcome,
    Claim,
    EndStatus,
    JournalEntry,
    NewRun,
    RunRow,
    RunStatus,
    WaitRow,
)
from engine.errors import JournalConflict

_CLAIMABLE = ("pending", "suspended", "running")


def _copy(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value))


@dataclass
class _Run:
    row: RunRow
    trace_context: dict[str, str] | None
    event_cursor: int
    wakeup: bool = False
    journal: dict[str, JournalEntry] = field(default_factory=dict)
    waits: dict[str, WaitRow] = field(default_factory=dict)


@dataclass(frozen=True)
class _Event:
    id: int
    name: str
    key: str
    payload: Any


class MemoryStore:
    """The engine's transitions on plain dictionaries; one instance is one database."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._runs: dict[uuid.UUID, _Run] = {}
        self._keys: dict[str, uuid.UUID] = {}
        self._events: list[_Event] = []

    async def close(self) -> None:
        return None

    # -- starting and claiming ----------------------------------------------------------------

    async def start_run(
        self,
        run_id: uuid.UUID,
        function: str,
        input: Any,
        idempotency_key: str | None,
        trace_context: dict[str, str] | None,
    ) -> tuple[uuid.UUID, bool]:
        if run_id in self._runs:
            return run_id, False
        if idempotency_key is not None and idempotency_key in self._keys:
            return self._keys[idempotency_key], False
        now = self.clock.now()
        row = RunRow(
            id=run_id,
            function=function,
            input=_copy(input),
            status="pending",
            idempotency_key=idempotency_key,
            attempt=0,
            available_at=now,
            lease_owner=None,
            result=None,
            error=None,
            created_at=now,
            started_at=None,
            updated_at=now,
            finished_at=None,
        )
        cursor = self._events[-1].id if self._events else 0
        self._runs[run_id] = _Run(row, _copy(trace_context), cursor)
        if idempotency_key is not None:
            self._keys[idempotency_key] = run_id
        return run_id, True

    async def start_runs(self, runs: Sequence[NewRun]) -> list[tuple[uuid.UUID, bool]]:
        return [
            await self.start_run(r.run_id, r.function, r.input, r.idempotency_key, r.trace_context)
            for r in runs
        ]

    async def claim(
        self, functions: Sequence[str], limit: int, worker: str, lease: timedelta
    ) -> list[Claim]:
        now = self.clock.now()
        due = sorted(
            (
                run
                for run in self._runs.values()
                if run.row.status in _CLAIMABLE
                and run.row.available_at is not None
                and run.row.available_at <= now
                and run.row.function in functions
            ),
            key=lambda run: run.row.available_at or now,
        )[:limit]
        claims = []
        for run in due:
            run.wakeup = False
            self._update(
                run,
                status="running",
                attempt=run.row.attempt + 1,
                lease_owner=worker,
                available_at=now + lease,
                started_at=run.row.started_at or now,
            )
            claims.append(
                Claim(
                    run_id=run.row.id,
                    function=run.row.function,
                    input=_copy(run.row.input),
                    attempt=run.row.attempt,
                    trace_context=_copy(run.trace_context),
                    db_now=now,
                )
            )
        return claims

    async def claim_due(
        self, functions: Sequence[str], limit: int, worker: str, lease: timedelta
    ) -> tuple[list[Claim], datetime | None, datetime]:
        claims = await self.claim(functions, limit, worker, lease)
        due, now = await self.next_due(functions)
        return claims, due, now

    async def next_due(self, functions: Sequence[str]) -> tuple[datetime | None, datetime]:
        times = [
            run.row.available_at
            for run in self._runs.values()
            if run.row.status in _CLAIMABLE
            and run.row.available_at is not None
            and run.row.function in functions
        ]
        return min(times, default=None), self.clock.now()

    async def renew_leases(
        self, held: Sequence[tuple[uuid.UUID, int]], worker: str, lease: timedelta
    ) -> set[uuid.UUID]:
        kept = set()
        for run_id, attempt in held:
            run = self._runs.get(run_id)
            if run is not None and self._holds(run, attempt) and run.row.lease_owner == worker:
                self._update(run, available_at=self.clock.now() + lease)
                kept.add(run_id)
        return kept

    # -- the journal --------------------------------------------------------------------------

    async def load_journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        run = self._runs.get(run_id)
        if run is None:
            return []
        return [
            replace(e, value=_copy(e.value), error=_copy(e.error)) for e in run.journal.values()
        ]

    async def append(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        kind: str,
        name: str,
        value: Any,
        error: Any = None,
    ) -> bool:
        run = self._held(run_id, attempt)
        if run is None:
            return False
        self._journal(run, attempt, position, kind, name, value, error)
        return True

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
        wake = wake_at if wake_at is not None else self.clock.now() + (duration or timedelta(0))
        run = self._held(run_id, attempt)
        if run is None:
            return None
        self._journal(run, attempt, position, "sleep", name, {"wake_at": wake.isoformat()})
        return wake

    async def await_event(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        name: str,
        key: str,
        timeout: timedelta | None,
    ) -> AwaitOutcome:
        run = self._held(run_id, attempt)
        if run is None:
            return AwaitOutcome("fenced", None, None)
        received = [
            e.value["event_id"]
            for e in run.journal.values()
            if e.kind == "event"
            and e.name == name
            and e.value.get("key") == key
            and "event_id" in e.value
        ]
        after = max([run.event_cursor, *received])
        event = next(
            (e for e in self._events if e.name == name and e.key == key and e.id > after), None
        )
        if event is not None:
            value = {"event_id": event.id, "key": key, "payload": event.payload}
            self._journal(run, attempt, position, "event", name, value)
            run.waits.pop(position, None)
            return AwaitOutcome("event", _copy(event.payload), None)
        now = self.clock.now()
        if position not in run.waits:
            deadline = None if timeout is None else now + timeout
            run.waits[position] = WaitRow(position, name, key, deadline)
        deadline = run.waits[position].timeout_at
        if deadline is not None and deadline <= now:
            self._journal(run, attempt, position, "event", name, {"timeout": True, "key": key})
            del run.waits[position]
            return AwaitOutcome("timeout", None, deadline)
        return AwaitOutcome("waiting", None, deadline)

    async def send_event(self, name: str, key: str, payload: Any) -> int:
        event = _Event(len(self._events) + 1, name, key, _copy(payload))
        self._events.append(event)
        now = self.clock.now()
        for run in self._runs.values():
            if any(w.name == name and w.key == key for w in run.waits.values()):
                run.wakeup = True
                if run.row.status == "suspended":
                    self._update(run, available_at=now)
                else:
                    self._update(run)
        return event.id

    # -- ending an attempt --------------------------------------------------------------------

    async def suspend(self, run_id: uuid.UUID, attempt: int, until: datetime | None) -> bool:
        run = self._held(run_id, attempt)
        if run is None:
            return False
        self._update(
            run,
            status="suspended",
            lease_owner=None,
            available_at=self.clock.now() if run.wakeup else until,
        )
        return True

    async def finish(
        self,
        run_id: uuid.UUID,
        attempt: int,
        status: EndStatus,
        result: Any = None,
        error: Any = None,
    ) -> bool:
        run = self._held(run_id, attempt)
        if run is None:
            return False
        self._update(
            run,
            status=status,
            result=_copy(result),
            error=_copy(error),
            lease_owner=None,
            available_at=None,
            finished_at=None if status == "paused" else self.clock.now(),
        )
        if status != "paused":
            run.waits.clear()
        return True

    async def release(self, run_id: uuid.UUID, attempt: int) -> bool:
        run = self._held(run_id, attempt)
        if run is None:
            return False
        self._update(run, status="pending", lease_owner=None, available_at=self.clock.now())
        return True

    async def resume(self, run_id: uuid.UUID) -> bool:
        run = self._runs.get(run_id)
        if run is None or run.row.status != "paused":
            return False
        self._update(run, status="pending", error=None, available_at=self.clock.now())
        return True

    # -- reading ------------------------------------------------------------------------------

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        run = self._runs.get(run_id)
        return None if run is None else run.row

    async def list_runs(self, status: str | None, limit: int) -> list[RunRow]:
        rows = [r.row for r in self._runs.values() if status is None or r.row.status == status]
        return sorted(rows, key=lambda r: r.created_at, reverse=True)[:limit]

    async def list_waits(self, run_id: uuid.UUID) -> list[WaitRow]:
        run = self._runs.get(run_id)
        return [] if run is None else sorted(run.waits.values(), key=lambda w: w.position)

    # -- outside the contract -----------------------------------------------------------------

    def import_journal(self, run_id: uuid.UUID, entries: Sequence[JournalEntry]) -> None:
        """Give a run a recorded journal (replaying a run exported from another database).
        The run's attempt moves past the recorded ones, as a claim after them would see it."""
        run = self._runs[run_id]
        recorded = max((e.attempt for e in entries), default=0)
        self._update(run, attempt=max(run.row.attempt, recorded))
        for entry in entries:
            if entry.position in run.journal:
                raise JournalConflict(f"run {run_id}: position {entry.position} given twice")
            run.journal[entry.position] = replace(
                entry, value=_copy(entry.value), error=_copy(entry.error)
            )

    # -- internals ----------------------------------------------------------------------------

    def _holds(self, run: _Run, attempt: int) -> bool:
        return run.row.attempt == attempt and run.row.status == "running"

    def _held(self, run_id: uuid.UUID, attempt: int) -> _Run | None:
        run = self._runs.get(run_id)
        return run if run is not None and self._holds(run, attempt) else None

    def _journal(
        self,
        run: _Run,
        attempt: int,
        position: str,
        kind: str,
        name: str,
        value: Any,
        error: Any = None,
    ) -> None:
        if position in run.journal:
            raise JournalConflict(
                f"run {run.row.id}: journal position {position} is already written"
            )
        run.journal[position] = JournalEntry(
            position, kind, name, _copy(value), _copy(error), attempt, self.clock.now()
        )

    def _update(self, run: _Run, **changes: Any) -> None:
        status: RunStatus = changes.pop("status", run.row.status)
        run.row = replace(run.row, status=status, updated_at=self.clock.now(), **changes)
