"""``check_runs``: replay every unfinished run of a database against the code as it is now,
before a deploy (``durable check module:app``)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from durable._app import App
from durable._connection import reading_store
from durable._settings import Settings
from engine import JournalEntry, PostgresStore, RunRow, WaitRow, dump, replay_journal

UNFINISHED = ("pending", "running", "suspended", "paused")
_PAGE = 500


@dataclass(frozen=True)
class RunDifference:
    """Where one run's journal and the code part: at ``position`` the journal ``recorded``
    one thing and the code now ``requested`` another."""

    run_id: uuid.UUID
    function: str
    status: str
    position: str
    recorded: str
    requested: str

    @property
    def cause(self) -> tuple[str, str, str, str]:
        """What runs that fail the same way share: the function, position and both sides."""
        return (self.function, self.position, self.recorded, self.requested)


@dataclass
class CheckReport:
    """What ``check_runs`` found: how many runs it replayed (by status), the runs of functions
    the app does not define (not checked), and every run that would fail, with its first
    difference. ``passed`` when none would."""

    checked: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failures: list[RunDifference] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def by_cause(self) -> dict[tuple[str, str, str, str], list[RunDifference]]:
        """The failures grouped by cause, the most common first."""
        groups: dict[tuple[str, str, str, str], list[RunDifference]] = defaultdict(list)
        for failure in self.failures:
            groups[failure.cause].append(failure)
        return dict(sorted(groups.items(), key=lambda item: -len(item[1])))

    def __str__(self) -> str:
        total = sum(self.checked.values())
        counts = ", ".join(f"{n:,} {status}" for status, n in sorted(self.checked.items()))
        lines = [f"checked {total:,} runs ({counts or 'none'}) in {self.seconds:.1f} s"]
        for function, n in sorted(self.skipped.items()):
            lines.append(f"not checked: {n:,} runs of {function!r}, which this app does not define")
        if self.passed:
            lines.append("every run replays on this code")
            return "\n".join(lines)
        lines.append(f"{len(self.failures):,} runs would fail on this code:")
        for (function, position, recorded, requested), runs in self.by_cause().items():
            lines.append(
                f"  {function}: at position {position}, the journal has {recorded}, the code "
                f"asks for {requested} ({len(runs):,} runs)"
            )
            lines.extend(f"    {r.run_id}  {r.status}" for r in runs[:20])
            if len(runs) > 20:
                lines.append(f"    ... and {len(runs) - 20:,} more")
        return "\n".join(lines)


async def check_runs(
    app: App, *, database_url: str | None = None, include_completed: int = 0
) -> CheckReport:
    """Replay the journal of every unfinished run (pending, running, suspended, paused) of
    ``app``'s database against ``app``'s code as it is now, running nothing live, and report
    each run that would fail with its first difference; ``include_completed`` recent completed
    runs are replayed too (their results must come out the same). It reads only: no migration,
    no write. For CI, before a deploy::

        report = await durable.testing.check_runs(app, database_url=os.environ["DATABASE_URL"])
        assert report.passed, str(report)

    Runs of functions ``app`` does not define are counted in ``skipped``, not checked.
    """
    started = time.monotonic()
    settings = app.settings if database_url is None else _with_url(app, database_url)
    store = await reading_store(settings)
    report = CheckReport()
    try:
        await _check_unfinished(app, store, report)
        for start in range(0, include_completed, _PAGE):
            rows = await store.recent_completed(min(_PAGE, include_completed - start), start)
            await _check_rows(app, store, rows, report)
    finally:
        await store.close()
    report.seconds = time.monotonic() - started
    return report


async def _check_unfinished(app: App, store: PostgresStore, report: CheckReport) -> None:
    after: uuid.UUID | None = None
    while True:
        rows = await store.runs_to_check(UNFINISHED, limit=_PAGE, after=after)
        await _check_rows(app, store, rows, report)
        if len(rows) < _PAGE:
            return
        after = rows[-1].id


async def _check_rows(
    app: App, store: PostgresStore, rows: list[RunRow], report: CheckReport
) -> None:
    ids = [r.id for r in rows]
    journals, waits = await store.load_journals(ids), await store.load_waits(ids)
    for row in rows:
        if row.function not in app.functions:
            report.skipped[row.function] = report.skipped.get(row.function, 0) + 1
            continue
        report.checked[row.status] = report.checked.get(row.status, 0) + 1
        difference = await _replay(app, row, journals.get(row.id, []), waits.get(row.id, []))
        if difference is not None:
            report.failures.append(difference)


async def _replay(
    app: App, row: RunRow, journal: list[JournalEntry], waits: list[WaitRow]
) -> RunDifference | None:
    """The first difference between ``row``'s journal and the code, or None."""
    result = await replay_journal(app.functions, row.id, row.function, row.input, journal, waits)
    found = result.nondeterminism
    if found is not None:
        return _difference(row, found.position, found.recorded, found.requested)
    if row.status == "completed" and result.status == "completed":
        recorded = dump(Any, row.result, "recorded result")
        if result.result != recorded:
            return _difference(row, "result", repr(recorded), repr(result.result))
    if result.status == "failed" and row.status != "failed":
        error = result.error or {}
        ended = f"{error.get('type')}: {error.get('message')}"
        return _difference(row, "end", f"a run that is {row.status}", ended)
    return None


def _difference(row: RunRow, position: str, recorded: str, requested: str) -> RunDifference:
    return RunDifference(row.id, row.function, row.status, position, recorded, requested)


def _with_url(app: App, database_url: str) -> Settings:
    return dataclasses.replace(app.settings, database_url=database_url)
