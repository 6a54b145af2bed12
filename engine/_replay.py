"""Replaying a journal in memory, running nothing live: the core of ``durable.testing.replay``,
and of any check that replays recorded runs against the code as it is now.

``replay_journal`` executes one attempt of a run with the ``Runner`` every worker uses, on a
``JournalStore``. A probe halts each branch of the function where live work would begin (a step
not journaled, a wait not yet received, a child not yet started), so nothing runs live and
nothing is written: the attempt ends as the function decides from its journal alone::

    result = await replay_journal(app.functions, run_id, "order", input, journal)
    if result.nondeterminism is not None:
        raise result.nondeterminism

``JournalStore`` keeps only what such a replay needs: one run's journal, and how the attempt
ended. It is not a store to run anything on. Claiming, events, timers, children and flow control
are transitions of the SQL functions (``engine/sql/functions.sql``), defined there and nowhere
else; each of those methods raises ``NotImplementedError`` naming itself. Simulations run on
PostgreSQL (``durable.testing.Simulation``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn, cast

from engine import _lineage
from engine._clock import DatabaseTime, VirtualClock
from engine._records import (
    AwaitOutcome,
    ChildOutcome,
    Claim,
    EndStatus,
    JournalEntry,
    NewRun,
    RunFilter,
    RunRow,
    StepTiming,
    WaitRow,
)
from engine._registry import FunctionSpec
from engine._run_state import Checkpoint, Decision, Execution
from engine._runner import Runner
from engine.errors import NonDeterminismError

ReplayStatus = Literal["completed", "failed", "paused", "suspended"]


@dataclass(frozen=True)
class ReplayResult:
    """How a replayed attempt ended.

    ``status`` is ``completed`` or ``failed`` (the function returned or raised: ``result`` or
    ``error`` as the run would store them), ``paused`` (a non-determinism: ``nondeterminism``)
    or ``suspended`` (every branch reached live work, at the positions ``live_at``).
    ``consumed`` counts the journal entries the code asked for again; ``unconsumed`` are those
    it never reached, in journal order."""

    status: ReplayStatus
    result: Any
    error: Any
    consumed: int
    unconsumed: list[JournalEntry]
    live_at: list[str]
    nondeterminism: NonDeterminismError | None


def _refuse(method: str) -> NoReturn:
    raise NotImplementedError(
        f"JournalStore.{method} is not implemented: the in-memory store only holds a run's "
        f"journal for a replay that runs nothing live. Run on PostgreSQL (PostgresStore; "
        f"durable.testing.Simulation runs on the embedded server or on a URL)"
    )


class JournalStore:
    """One run's journal in memory, and how the attempt replaying it ended.

    ``load_journal`` answers with the journal; ``suspend`` and ``finish`` record the end of the
    attempt (a claim other than ``attempt`` is fenced: they return False). Every other method of
    ``engine._records.Store`` raises NotImplementedError: those are transitions of the SQL
    functions, which have no copy here."""

    def __init__(
        self,
        run_id: uuid.UUID,
        attempt: int,
        journal: Sequence[JournalEntry],
        waits: Sequence[WaitRow] = (),
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self._journal = list(journal)
        self._waits = list(waits)
        self.status: EndStatus | Literal["suspended"] | None = None
        self.result: Any = None
        self.error: Any = None

    def _holds(self, run_id: uuid.UUID, attempt: int) -> bool:
        return (run_id, attempt) == (self.run_id, self.attempt) and self.status is None

    async def close(self) -> None:
        return None

    async def load_journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        return list(self._journal) if run_id == self.run_id else []

    async def suspend(self, run_id: uuid.UUID, attempt: int, until: datetime | None) -> bool:
        if not self._holds(run_id, attempt):
            return False
        self.status = "suspended"
        return True

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
        if not self._holds(run_id, attempt):
            return False
        self.status, self.result, self.error = status, result, error
        return True

    # -- refused: transitions defined by the SQL functions only ---------------------------------

    async def start_runs(self, runs: Sequence[NewRun]) -> list[tuple[uuid.UUID, bool]]:
        _refuse("start_runs")

    async def start_claimed(
        self,
        run: NewRun,
        worker: str,
        lease: timedelta,
        functions: Sequence[str],
        versions: Sequence[str],
        pinned: Sequence[str] = (),
    ) -> tuple[uuid.UUID, bool, Claim | None]:
        _refuse("start_claimed")

    async def claim(
        self,
        functions: Sequence[str],
        limit: int,
        worker: str,
        lease: timedelta,
        versions: Sequence[str] | None = None,
        pinned: Sequence[str] = (),
    ) -> list[Claim]:
        _refuse("claim")

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
        _refuse("claim_due")

    async def next_due(
        self, functions: Sequence[str], versions: Sequence[str] | None = None
    ) -> tuple[datetime | None, datetime]:
        _refuse("next_due")

    async def retry_paused(self, functions: Sequence[str], versions: Sequence[str]) -> int:
        _refuse("retry_paused")

    async def renew_leases(
        self, held: Sequence[tuple[uuid.UUID, int]], worker: str, lease: timedelta
    ) -> dict[uuid.UUID, bool]:
        _refuse("renew_leases")

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
        _refuse("append")

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
        _refuse("append_sleep")

    async def await_event(
        self,
        run_id: uuid.UUID,
        attempt: int,
        position: str,
        name: str,
        key: str,
        timeout: timedelta | None,
    ) -> AwaitOutcome:
        _refuse("await_event")

    async def send_event(self, name: str, key: str, payload: Any) -> int:
        _refuse("send_event")

    async def release(self, run_id: uuid.UUID, attempt: int) -> bool:
        _refuse("release")

    async def resume(self, run_id: uuid.UUID) -> bool:
        _refuse("resume")

    async def start_child(
        self, run_id: uuid.UUID, attempt: int, position: str, child: NewRun
    ) -> bool:
        _refuse("start_child")

    async def await_child(
        self, run_id: uuid.UUID, attempt: int, position: str, name: str, child: uuid.UUID
    ) -> ChildOutcome:
        _refuse("await_child")

    async def cancel(self, run_id: uuid.UUID, reason: str) -> str:
        _refuse("cancel")

    async def define_rate_limit(self, name: str, limit: int, period: timedelta) -> None:
        _refuse("define_rate_limit")

    async def take_rate(self, name: str, key: str, weight: int, holder: str) -> datetime | None:
        _refuse("take_rate")

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        _refuse("get_run")

    async def list_children(self, run_id: uuid.UUID) -> list[RunRow]:
        _refuse("list_children")

    async def find_runs(
        self,
        where: RunFilter,
        *,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[RunRow]:
        _refuse("find_runs")

    async def list_waits(self, run_id: uuid.UUID) -> list[WaitRow]:
        return list(self._waits) if run_id == self.run_id else []


class _Halt:
    """The probe of a replay: every branch stops where its live work would begin."""

    def __init__(self) -> None:
        self.live_at: list[str] = []

    async def __call__(self, point: Checkpoint) -> Decision:
        if point.moment == "before":
            self.live_at.append(point.position)
            return "halt"
        return "continue"


async def replay_journal(
    functions: Mapping[str, FunctionSpec],
    run_id: uuid.UUID,
    function: str,
    input: Any,
    journal: Sequence[JournalEntry],
    waits: Sequence[WaitRow] = (),
) -> ReplayResult:
    """Replay ``journal`` (run ``run_id`` of ``function`` with ``input``, as stored) against
    ``functions`` as they are now, running nothing live; see the module's docstring. ``waits``
    are the run's registered waits (a run suspended on an event has no journal entry at its
    wait): a patch point just before one is one the run went past.

    The attempt starts after the last recorded one, on a clock past every recorded moment and
    wake time, so that every journaled timer has fired. A ``function`` that ``functions`` lacks
    raises NonDeterminismError, as a worker would meet it."""
    if function not in functions:
        raise NonDeterminismError(
            str(run_id),
            "function",
            recorded=f"function {function!r}",
            requested="nothing: no such function in this app",
        )
    clock = VirtualClock(moment_after(journal))
    # A run with a wait registered had an attempt, even with nothing journaled.
    attempt = max((e.attempt for e in journal), default=1 if waits else 0) + 1
    store = JournalStore(run_id, attempt, journal, waits)
    probe = _Halt()
    _lineage.install(asyncio.get_running_loop())
    execution = Execution(
        store,
        functions,
        DatabaseTime(clock),
        short_wait=0.0,
        rng=random.Random(0),
        probe=probe,
        replay_only=True,
    )
    claim = Claim(run_id, function, input, attempt, None, clock.now(), forked=bool(journal))
    runner = Runner(execution, claim)
    await runner.execute()
    state = runner.state
    assert state is not None
    assert store.status not in (None, "cancelled"), f"a replay ended {store.status}"
    return ReplayResult(
        status=cast(ReplayStatus, store.status),
        result=store.result,
        error=store.error,
        consumed=len(state.consumed),
        unconsumed=state.unconsumed(),
        live_at=probe.live_at,
        nondeterminism=state.nondeterminism,
    )


def moment_after(journal: Sequence[JournalEntry]) -> datetime:
    """A moment after everything ``journal`` records (entries and sleeps' wake times)."""
    moments = [datetime(2000, 1, 1, tzinfo=UTC)]
    for entry in journal:
        moments.append(entry.created_at)
        if entry.kind == "sleep":
            moments.append(datetime.fromisoformat(entry.value["wake_at"]))
    return max(moments) + timedelta(seconds=1)
