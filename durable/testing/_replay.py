"""Replay a recorded run against the current code: the check to run before a deploy."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from durable._app import App
from durable._handle import RunHandle
from durable.testing._simulation import _Probe
from engine import (
    DatabaseTime,
    Execution,
    JournalEntry,
    MemoryStore,
    Runner,
    RunStatus,
    VirtualClock,
    _lineage,
    dump,
)
from engine.errors import NonDeterminismError

FORMAT = "durable.run/1"


@dataclass(frozen=True)
class RecordedRun:
    """A run and its journal as exported by ``durable runs export RUN_ID`` (JSON)."""

    run_id: uuid.UUID
    function: str
    input: Any
    status: RunStatus
    result: Any
    journal: list[JournalEntry]

    @classmethod
    async def from_handle(cls, handle: RunHandle[Any]) -> RecordedRun:
        """Read a run from its database (``app.get_run(run_id)`` of a connected app)."""
        info = await handle.info()
        return cls(
            run_id=info.run_id,
            function=info.function,
            input=info.input,
            status=info.status,
            result=info.result,
            journal=await handle.journal(),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "run_id": str(self.run_id),
                "function": self.function,
                "input": self.input,
                "status": self.status,
                "result": self.result,
                "journal": [
                    {
                        "position": e.position,
                        "kind": e.kind,
                        "name": e.name,
                        "value": e.value,
                        "error": e.error,
                        "attempt": e.attempt,
                        "created_at": e.created_at.isoformat(),
                    }
                    for e in self.journal
                ],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> RecordedRun:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a durable run export (format {data.get('format')!r})")
        return cls(
            run_id=uuid.UUID(data["run_id"]),
            function=data["function"],
            input=data["input"],
            status=data["status"],
            result=data["result"],
            journal=[
                JournalEntry(
                    position=e["position"],
                    kind=e["kind"],
                    name=e["name"],
                    value=e["value"],
                    error=e["error"],
                    attempt=e["attempt"],
                    created_at=datetime.fromisoformat(e["created_at"]),
                )
                for e in data["journal"]
            ],
        )


@dataclass(frozen=True)
class ReplayReport:
    """A replay that matched: how many entries it consumed, and where live work would begin."""

    replayed: int
    status: RunStatus
    live_at: list[str]


async def replay(app: App, recorded: RecordedRun) -> ReplayReport:
    """Replay ``recorded`` against the code of ``app`` as it is now, running nothing live.

    Every journaled call must be asked for again, with the same kind and name, and a completed
    run must return the same result; the replay stops where live work would begin. Raises
    ``NonDeterminismError`` with the first difference, as a worker would on resuming it::

        recorded = RecordedRun.from_json(Path("run.json").read_text())
        await replay(app, recorded)
    """
    spec = app.spec_for(recorded.function)
    if spec is None:
        raise NonDeterminismError(
            str(recorded.run_id),
            "function",
            recorded=f"function {recorded.function!r}",
            requested="nothing: no such function in this app",
        )
    clock = VirtualClock(_after(recorded.journal))
    store = MemoryStore(clock)
    await store.start_run(recorded.run_id, spec.name, recorded.input, None, None)
    store.import_journal(recorded.run_id, recorded.journal)
    [claim] = await store.claim([spec.name], 1, "replay", timedelta(days=1))
    probe = _Probe((), None, halt=True)
    _lineage.install(asyncio.get_running_loop())
    execution = Execution(
        store,
        app.functions,
        DatabaseTime(clock),
        short_wait=0.0,
        rng=random.Random(0),
        probe=probe,
    )
    runner = Runner(execution, claim)
    await runner.execute()
    state = runner.state
    assert state is not None
    if state.nondeterminism is not None:
        raise state.nondeterminism
    row = await store.get_run(recorded.run_id)
    assert row is not None
    leftover = state.unconsumed()
    if leftover:
        first = leftover[0]
        raise NonDeterminismError(
            str(recorded.run_id),
            first.position,
            recorded=f"{first.kind} {first.name!r}",
            requested="nothing (the code never reached it)",
        )
    if recorded.status == "completed" and row.status == "completed":
        expected = dump(Any, recorded.result, "recorded result")
        if row.result != expected:
            raise NonDeterminismError(
                str(recorded.run_id),
                "result",
                recorded=f"result {expected!r}",
                requested=f"result {row.result!r}",
            )
    halted = [p.position for p in probe.passed if p.moment == "before"]
    return ReplayReport(replayed=len(state.consumed), status=row.status, live_at=halted)


def _after(journal: list[JournalEntry]) -> datetime:
    """A moment after everything recorded, so every journaled timer has fired."""
    moments = [datetime(2000, 1, 1, tzinfo=UTC)]
    for entry in journal:
        moments.append(entry.created_at)
        if entry.kind == "sleep":
            moments.append(datetime.fromisoformat(entry.value["wake_at"]))
    return max(moments) + timedelta(seconds=1)
