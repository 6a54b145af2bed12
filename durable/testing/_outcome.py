"""``Outcome``: what a simulated run did, and how a crashed run departs from an uninterrupted
one."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from engine import Checkpoint, JournalEntry, RunStatus, WaitRow
from engine.errors import ErrorInfo


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

    ``status``, ``result``, ``error``, ``journal`` and ``waits`` are read from the database.
    Each journal entry's ``created_at`` is the virtual time of the attempt that wrote it (the
    database stamps its rows with its real clock). ``elapsed`` is the virtual time from the
    run's start to its end (to the simulation's last moment while it has not ended).

    The rest is what the simulation saw while it drove every run of its database (the run's
    children and the runs started beside it included): ``checkpoints`` lists every journal
    boundary passed, in order, replays included (crash schedules count in it); ``attempts``
    counts the attempts executed; ``executions`` counts the live executions of each step,
    keyed by position for this run and ``run_id@position`` for the others; ``reruns`` lists
    the steps that ran again after their result was journaled (never, unless the engine is
    broken).
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


def _position_key(position: str) -> tuple[list[tuple[int, ...]], int, str]:
    """Positions in call order; a patch marker (``3~name``) just before the call it precedes."""
    call, _mark, patch = position.partition("~")
    numbers = [tuple(int(p) for p in part.split(".")) for part in call.split(":")]
    return numbers, 0 if patch else 1, patch
