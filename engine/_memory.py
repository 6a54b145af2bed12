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
    FINAL_STATUSES,
    AwaitOutcome,
    ChildOutcome,
    Claim,
    EndStatus,
    JournalEntry,
    NewRun,
    RunRow,
    RunStatus,
    WaitRow,
)
from engine.errors import ConfigurationError, JournalConflict

_CLAIMABLE = ("pending", "suspended", "running")
_CHILD_WAIT = "durable.child"


def _failure(kind: str, message: str) -> dict[str, str]:
    return {"type": kind, "message": message, "module": "durable"}


def _cancelled(reason: str) -> dict[str, str]:
    return _failure("RunCancelled", reason)


def _copy(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value))


@dataclass
class _Run:
    row: RunRow
    trace_context: dict[str, str] | None
    event_cursor: int
    options: NewRun
    wakeup: bool = False
    holds_slot: bool = False
    awaiting_slot: bool = False
    journal: dict[str, JournalEntry] = field(default_factory=dict)
    waits: dict[str, WaitRow] = field(default_factory=dict)


@dataclass
class _Grant:
    at: datetime
    weight: int
    holder: str
    used: bool


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
        self._rate_limits: dict[str, tuple[int, timedelta]] = {}
        self._grants: dict[tuple[str, str], list[_Grant]] = {}

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
        [started] = await self.start_runs(
            [NewRun(run_id, function, input, idempotency_key, trace_context)]
        )
        return started

    async def start_runs(self, runs: Sequence[NewRun]) -> list[tuple[uuid.UUID, bool]]:
        return [self._create(r) for r in runs]

    def _create(self, new: NewRun) -> tuple[uuid.UUID, bool]:
        if new.run_id in self._runs:
            return new.run_id, False
        if new.idempotency_key is not None and new.idempotency_key in self._keys:
            return self._keys[new.idempotency_key], False
        now = self.clock.now()
        starts = new.available_at or now + (new.delay or timedelta(0))
        expires = None if new.start_timeout is None else starts + new.start_timeout
        row = RunRow(
            id=new.run_id,
            function=new.function,
            input=_copy(new.input),
            status="pending",
            idempotency_key=new.idempotency_key,
            attempt=0,
            available_at=starts,
            lease_owner=None,
            result=None,
            error=None,
            created_at=now,
            started_at=None,
            updated_at=now,
            finished_at=None,
            priority=new.priority,
            parent_id=new.parent_id,
            concurrency_key=new.concurrency_key,
            expires_at=expires,
        )
        cursor = self._events[-1].id if self._events else 0
        self._runs[new.run_id] = _Run(row, _copy(new.trace_context), cursor, new)
        if new.idempotency_key is not None:
            self._keys[new.idempotency_key] = new.run_id
        self._apply_strategy(self._runs[new.run_id])
        return new.run_id, True

    def _apply_strategy(self, run: _Run) -> None:
        new = run.options
        if new.concurrency_key is None or new.strategy == "queue":
            return
        limit = new.concurrency_limit or 1
        others = sorted(
            (
                r
                for r in self._runs.values()
                if r is not run
                and r.row.concurrency_key == new.concurrency_key
                and r.row.status not in FINAL_STATUSES
            ),
            key=lambda r: r.row.created_at,
            reverse=True,
        )
        if new.strategy == "cancel_newest":
            if len(others) >= limit:
                self._end(
                    run,
                    "cancelled",
                    _cancelled(
                        f"cancel-newest: concurrency key {new.concurrency_key} already has "
                        f"{limit} active run(s)"
                    ),
                )
            return
        for old in others[limit - 1 :]:
            self._cancel(old.row.id, f"cancel-in-progress: run {new.run_id} replaced it")

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
            key=lambda run: (-run.row.priority, run.row.available_at or now),
        )
        claims: list[Claim] = []
        for run in due:
            if len(claims) >= limit:
                break
            if self._admit(run, now):
                claims.append(self._take(run, worker, now, lease))
        return claims

    def _admit(self, run: _Run, now: datetime) -> bool:
        """The claim's rules before a due run is taken (durable.claim_runs)."""
        row, options = run.row, run.options
        if row.cancel_requested:
            self._end(run, "cancelled", _cancelled("cancelled"))
            return False
        if row.started_at is None and row.expires_at is not None and row.expires_at <= now:
            self._end(run, "failed", _failure("RunExpired", "the run did not start in time"))
            return False
        if row.deadline_at is not None and row.deadline_at <= now:
            self._end(run, "failed", _failure("RunTimedOut", "the run passed its deadline"))
            return False
        key = row.concurrency_key
        if key is not None and not run.holds_slot:
            if self._slots_held(key) >= (options.concurrency_limit or 1):
                run.awaiting_slot = True
                self._update(run, available_at=None)
                return False
            run.holds_slot, run.awaiting_slot = True, False
        if options.rate_limit is not None and row.started_at is None:
            retry = self._take_rate(options.rate_limit, options.rate_key, 1, f"start {row.id}")
            if retry is not None:
                self._update(run, available_at=retry)
                return False
        return True

    def _take(self, run: _Run, worker: str, now: datetime, lease: timedelta) -> Claim:
        run.wakeup = False
        timeout = run.options.run_timeout
        deadline = run.row.deadline_at or (None if timeout is None else now + timeout)
        self._update(
            run,
            status="running",
            attempt=run.row.attempt + 1,
            lease_owner=worker,
            available_at=now + lease,
            started_at=run.row.started_at or now,
            deadline_at=deadline,
        )
        return Claim(
            run_id=run.row.id,
            function=run.row.function,
            input=_copy(run.row.input),
            attempt=run.row.attempt,
            trace_context=_copy(run.trace_context),
            db_now=now,
            deadline_at=deadline,
        )

    async def claim_due(
        self, functions: Sequence[str], limit: int, worker: str, lease: timedelta
    ) -> tuple[list[Claim], datetime | None, datetime]:
        claims = await self.claim(functions, limit, worker, lease)
        due, now = await self.next_due(functions)
        return claims, due, now

    async def next_due(self, functions: Sequence[str]) -> tuple[datetime | None, datetime]:
        times = [
            run.row.available_at
            for run in list(self._runs.values())
            if run.row.status in _CLAIMABLE
            and run.row.available_at is not None
            and run.row.function in functions
        ]
        return min(times, default=None), self.clock.now()

    async def renew_leases(
        self, held: Sequence[tuple[uuid.UUID, int]], worker: str, lease: timedelta
    ) -> dict[uuid.UUID, bool]:
        kept = {}
        for run_id, attempt in held:
            run = self._runs.get(run_id)
            if run is not None and self._holds(run, attempt) and run.row.lease_owner == worker:
                self._update(run, available_at=self.clock.now() + lease)
                kept[run_id] = run.row.cancel_requested
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
        if run.row.cancel_requested:
            self._end(run, "cancelled", _cancelled("cancelled"))
            return True
        deadline = run.row.deadline_at
        if deadline is not None and (until is None or deadline < until):
            until = deadline
        freed = run.holds_slot and not run.options.slot_while_suspended
        run.holds_slot = run.holds_slot and run.options.slot_while_suspended
        self._update(
            run,
            status="suspended",
            lease_owner=None,
            available_at=self.clock.now() if run.wakeup else until,
        )
        if freed:
            self._hand_over(run.row.concurrency_key)
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
        self._end(run, status, error, result)
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

    # -- children, cancellation, rate limits -----------------------------------------------

    async def start_child(
        self, run_id: uuid.UUID, attempt: int, position: str, child: NewRun
    ) -> bool:
        run = self._held(run_id, attempt)
        if run is None:
            return False
        if position in run.journal:
            raise JournalConflict(f"run {run_id}: journal position {position} is already written")
        self._create(child)
        self._journal(
            run, attempt, position, "start", child.function, {"run_id": str(child.run_id)}
        )
        return True

    async def await_child(
        self, run_id: uuid.UUID, attempt: int, position: str, name: str, child: uuid.UUID
    ) -> ChildOutcome:
        run = self._held(run_id, attempt)
        if run is None:
            return ChildOutcome("fenced", None, None, None)
        row = self._runs[child].row
        if row.status in FINAL_STATUSES:
            value = {
                "run_id": str(child),
                "status": row.status,
                "result": row.result,
                "error": row.error,
            }
            self._journal(run, attempt, position, "join", name, value)
            run.waits.pop(position, None)
            return ChildOutcome("done", row.status, _copy(row.result), _copy(row.error))
        run.waits.setdefault(position, WaitRow(position, _CHILD_WAIT, str(child), None))
        return ChildOutcome("waiting", row.status, None, None)

    async def cancel(self, run_id: uuid.UUID, reason: str) -> str:
        return self._cancel(run_id, reason)

    def _cancel(self, run_id: uuid.UUID, reason: str) -> str:
        run = self._runs.get(run_id)
        if run is None:
            return "not_found"
        if run.row.status in FINAL_STATUSES:
            return "finished"
        tree, frontier = [run], [run_id]
        while frontier:
            parent = frontier.pop()
            children = [r for r in self._runs.values() if r.row.parent_id == parent]
            tree.extend(children)
            frontier.extend(c.row.id for c in children)
        for target in sorted(tree, key=lambda r: r.row.id):
            why = reason if target is run else f"its parent run was cancelled ({reason})"
            if target.row.status == "running":
                self._update(target, cancel_requested=True, error=_cancelled(why))
            elif target.row.status not in FINAL_STATUSES:
                self._end(target, "cancelled", _cancelled(why))
        return {"cancelled": "cancelled", "running": "requested"}.get(run.row.status, "finished")

    async def define_rate_limit(self, name: str, limit: int, period: timedelta) -> None:
        self._rate_limits[name] = (limit, period)

    async def take_rate(self, name: str, key: str, weight: int, holder: str) -> datetime | None:
        return self._take_rate(name, key, weight, holder)

    def _take_rate(self, name: str, key: str, weight: int, holder: str) -> datetime | None:
        """durable.take_rate: a sliding-window log with reservations for waiting holders."""
        if name not in self._rate_limits:
            raise ConfigurationError(f"rate limit {name!r} is not declared")
        budget, period = self._rate_limits[name]
        if weight > budget:
            raise ConfigurationError(f"weight {weight} exceeds the budget {budget} of {name!r}")
        now = self.clock.now()
        grants = self._grants.setdefault((name, key), [])
        reserved = next((g for g in grants if g.holder == holder and not g.used), None)
        if reserved is not None:
            if reserved.at > now:
                return reserved.at
            reserved.used = True
            return None
        grants[:] = [g for g in grants if g.at > now - period]
        used = sum(g.weight for g in grants)
        at = max([now, *(g.at for g in grants)])
        if used + weight > budget:
            for grant in sorted(grants, key=lambda g: g.at):
                used -= grant.weight
                if used + weight <= budget:
                    at = max(at, grant.at + period)
                    break
        grants.append(_Grant(at, weight, holder, used=at <= now))
        return None if at <= now else at

    # -- reading ------------------------------------------------------------------------------

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        run = self._runs.get(run_id)
        return None if run is None else run.row

    async def list_runs(self, status: str | None, limit: int) -> list[RunRow]:
        rows = [r.row for r in self._runs.values() if status is None or r.row.status == status]
        return sorted(rows, key=lambda r: r.created_at, reverse=True)[:limit]

    async def list_children(self, run_id: uuid.UUID) -> list[RunRow]:
        rows = [r.row for r in self._runs.values() if r.row.parent_id == run_id]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

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

    def _end(self, run: _Run, status: EndStatus, error: Any, result: Any = None) -> None:
        """durable.end_run and durable.finish_runs for one run: the run ends (or pauses), its
        slot goes to the next waiting run, and an ended run drops its waits and wakes its
        parent. A run asked to cancel keeps the reason it was given."""
        held = run.holds_slot
        run.holds_slot = run.awaiting_slot = False
        if status == "cancelled" and run.row.cancel_requested and run.row.error is not None:
            error = run.row.error
        self._update(
            run,
            status=status,
            result=_copy(result),
            error=_copy(error),
            lease_owner=None,
            available_at=None,
            cancel_requested=False,
            finished_at=None if status == "paused" else self.clock.now(),
        )
        if held:
            self._hand_over(run.row.concurrency_key)
        if status != "paused":
            run.waits.clear()
            self._wake_parent(run)

    def _slots_held(self, key: str) -> int:
        return sum(1 for r in self._runs.values() if r.row.concurrency_key == key and r.holds_slot)

    def _hand_over(self, key: str | None) -> None:
        """durable.hand_over_slots: free slots go to awaiting runs, by priority, then age."""
        if key is None:
            return
        waiting = sorted(
            (r for r in self._runs.values() if r.row.concurrency_key == key and r.awaiting_slot),
            key=lambda r: (-r.row.priority, r.row.created_at, r.row.id),
        )
        for run in waiting:
            if self._slots_held(key) >= (run.options.concurrency_limit or 1):
                return
            run.holds_slot, run.awaiting_slot = True, False
            self._update(run, available_at=self.clock.now())

    def _wake_parent(self, child: _Run) -> None:
        """durable.wake_parents for one ended child."""
        parent = self._runs.get(child.row.parent_id) if child.row.parent_id else None
        if parent is None:
            return
        if parent.row.status == "running":
            parent.wakeup = True
        elif parent.row.status == "suspended" and any(
            w.name == _CHILD_WAIT and w.key == str(child.row.id) for w in parent.waits.values()
        ):
            parent.wakeup = True
            self._update(parent, available_at=self.clock.now())

    def _update(self, run: _Run, **changes: Any) -> None:
        status: RunStatus = changes.pop("status", run.row.status)
        run.row = replace(run.row, status=status, updated_at=self.clock.now(), **changes)
