"""Crash at every point: the check that a durable function survives a crash anywhere."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from durable._app import App
from durable.testing._outcome import Outcome, describe
from durable.testing._simulation import Send, Simulation, SimulationError
from engine import Checkpoint, Moment

ALL_MOMENTS: tuple[Moment, ...] = ("before", "ran", "journaled")


class CrashCheckFailed(AssertionError):
    """A crash changed what the run did. The message names the earliest crash point that did
    (the shortest counterexample) and how the run differed."""


@dataclass(frozen=True)
class CrashReport:
    """What ``crash_at_every_point`` checked: the uninterrupted run, and each crash point."""

    baseline: Outcome
    points: list[Checkpoint]

    def __str__(self) -> str:
        return (
            f"{len(self.points)} crash points checked; the run ended {self.baseline.status} "
            f"after {len(self.baseline.journal)} journal entries"
        )


async def crash_at_every_point(
    app: App,
    fn: Callable[..., Awaitable[Any]],
    input: Any = None,
    *,
    events: Sequence[Send] = (),
    stubs: Mapping[str, Callable[..., Any]] | None = None,
    moments: Sequence[Moment] = ALL_MOMENTS,
    seed: int = 0,
    start: datetime | None = None,
    database_url: str | None = None,
) -> CrashReport:
    """Run ``fn(input)`` once uninterrupted, then once per journal boundary with a crash
    injected there (before live work, after a step's body ran but before its result was
    journaled, after the entry was journaled), resuming by replay each time.

    The uninterrupted run must complete (or wait for an event that never comes): one that
    fails, is cancelled or pauses raises ``CrashCheckFailed`` at once, since every crashed run
    would end the same way and the check would prove nothing (check a run meant to fail with
    ``Simulation.run(crashes=[...])``). Each crashed run must end like the uninterrupted one:
    the same status and result, the same journal, every journaled step executed, and none
    executed again once journaled. Otherwise ``CrashCheckFailed`` names the earliest failing
    crash point::

        await crash_at_every_point(app, order, Order(id="o1", amount=30),
                                   events=[Send("paid", key="o1")])

    Every run happens in one simulation (see ``Simulation`` for ``database_url``), emptied and
    rewound between crash points.
    """
    async with Simulation(
        app, stubs=stubs, seed=seed, start=start, database_url=database_url
    ) as sim:
        baseline = await sim.run(fn, input, events=events)
        _check_baseline(baseline)
        points: list[Checkpoint] = []
        failures: list[str] = []
        for index, point in enumerate(baseline.checkpoints):
            if point.moment not in moments:
                continue
            points.append(point)
            await sim.reset()
            try:
                crashed = await sim.run(fn, input, events=events, crashes=[index])
            except SimulationError as exc:
                failures.append(f"{describe(point)}: {exc}")
                continue
            differences = crashed.differences(baseline)
            if differences:
                failures.append(f"{describe(point)}: {'; '.join(differences)}")
    if failures:
        raise CrashCheckFailed(
            f"{failures[0]}\n({len(failures)} of {len(points)} crash points changed the run)"
        )
    return CrashReport(baseline, points)


def _check_baseline(baseline: Outcome) -> None:
    if baseline.status in ("completed", "suspended") and not baseline.reruns:
        return
    ending = f" ({baseline.error.type}: {baseline.error.message})" if baseline.error else ""
    raise CrashCheckFailed(
        f"the uninterrupted run itself ended {baseline.status}{ending}"
        + ("" if not baseline.reruns else f", with steps run again: {baseline.reruns}")
        + ": crash_at_every_point needs a run that completes (or waits for an event), since "
        "every crashed run of one that fails would fail the same way"
    )
