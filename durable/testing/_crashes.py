"""Crash at every point: the check that a durable function survives a crash anywhere."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from durable._app import App
from durable.testing._simulation import Outcome, Send, Simulation, SimulationError, describe
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

    Each crashed run must end like the uninterrupted one: the same status and result, the same
    journal, every journaled step executed, and none executed again once journaled. Otherwise
    ``CrashCheckFailed`` names the earliest failing crash point::

        await crash_at_every_point(app, order, Order(id="o1", amount=30),
                                   events=[Send("paid", key="o1")])
    """

    def simulation() -> Simulation:
        return Simulation(app, stubs=stubs, seed=seed, start=start, database_url=database_url)

    async with simulation() as sim:
        baseline = await sim.run(fn, input, events=events)
    if baseline.status in ("running", "pending", "paused") or baseline.reruns:
        raise CrashCheckFailed(
            f"the uninterrupted run itself ended {baseline.status}"
            + (f" ({baseline.error.type}: {baseline.error.message})" if baseline.error else "")
        )
    points: list[Checkpoint] = []
    failures: list[str] = []
    for index, point in enumerate(baseline.checkpoints):
        if point.moment not in moments:
            continue
        points.append(point)
        async with simulation() as sim:
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
