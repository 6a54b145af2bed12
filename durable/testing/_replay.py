"""Replay a recorded run against the current code: the check to run before a deploy."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from durable._app import App
from durable._handle import RunHandle
from engine import JournalEntry, RunStatus, dump, replay_journal
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

    It needs no database: the journal is replayed in memory (``engine.replay_journal``).
    """
    replayed = await replay_journal(
        app.functions, recorded.run_id, recorded.function, recorded.input, recorded.journal
    )
    if replayed.nondeterminism is not None:
        raise replayed.nondeterminism
    if replayed.unconsumed:
        first = replayed.unconsumed[0]
        raise NonDeterminismError(
            str(recorded.run_id),
            first.position,
            recorded=f"{first.kind} {first.name!r}",
            requested="nothing (the code never reached it)",
        )
    if recorded.status == "completed" and replayed.status == "completed":
        expected = dump(Any, recorded.result, "recorded result")
        if replayed.result != expected:
            raise NonDeterminismError(
                str(recorded.run_id),
                "result",
                recorded=f"result {expected!r}",
                requested=f"result {replayed.result!r}",
            )
    return ReplayReport(
        replayed=replayed.consumed, status=replayed.status, live_at=replayed.live_at
    )
