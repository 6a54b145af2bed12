"""Deploy at every point: the check that new code can take over runs the old code started."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from durable._app import App
from durable.testing._crashes import CrashCheckFailed, CrashReport
from durable.testing._outcome import Outcome, describe
from durable.testing._simulation import Send, Simulation, SimulationError
from engine import Checkpoint


class UpgradeCheckFailed(AssertionError):
    """A run the old code started did not finish on the new code. The message names the
    earliest journal boundary at which the deploy broke it, and how the run ended."""


async def upgrade_at_every_point(
    old_app: App,
    new_app: App,
    fn: Callable[..., Awaitable[Any]] | str,
    input: Any = None,
    *,
    events: Sequence[Send] = (),
    stubs: Mapping[str, Callable[..., Any]] | None = None,
    seed: int = 0,
    start: datetime | None = None,
    database_url: str | None = None,
) -> CrashReport:
    """Run ``fn(input)`` on ``old_app``'s code up to each journal boundary in turn, then deploy:
    the old code's worker dies there, and the run continues on ``new_app``'s code (the function
    of the same name) until it ends. Every such run must end as a run of the new code alone
    ends (completed, or waiting for an event that never comes), with no journaled step run
    again: not paused by a non-determinism, not failed. Otherwise ``UpgradeCheckFailed`` names
    the earliest boundary and the difference::

        await upgrade_at_every_point(v1.app, v2.app, "approval", Request(id="r1"),
                                     events=[Send("decision", {"ok": True}, key="r1")])

    A change made behind ``ctx.patched`` passes; the same change made without one fails at
    the first boundary after the changed code. Results are not compared: the new code may
    compute another one. Both apps run in one simulation (see ``Simulation`` for
    ``database_url``), emptied between boundaries.
    """
    name = fn if isinstance(fn, str) else _name_in(old_app, fn)
    async with Simulation(
        new_app, stubs=stubs, seed=seed, start=start, database_url=database_url
    ) as sim:
        target = await sim.run(name, input, events=events)
        if target.status not in ("completed", "suspended"):
            raise CrashCheckFailed(
                f"the new code's own run ended {target.status}{_error(target)}: it must "
                f"complete (or wait for an event) for the upgrade check to mean anything"
            )
        sim.app = old_app
        await sim.reset()
        baseline = await sim.run(name, input, events=events)
        points: list[Checkpoint] = []
        failures: list[str] = []
        for index, point in enumerate(baseline.checkpoints):
            points.append(point)
            sim.app = old_app
            await sim.reset()
            try:
                upgraded = await sim.run(
                    name, input, events=events, crashes=[index], upgrade=new_app
                )
            except SimulationError as exc:
                failures.append(f"{_upgraded(point)}: {exc}")
                continue
            if upgraded.status != target.status or upgraded.reruns:
                failures.append(
                    f"{_upgraded(point)}: the run ended {upgraded.status}{_error(upgraded)} "
                    f"where the new code's own run ended {target.status}"
                    + (f", and steps ran again: {upgraded.reruns}" if upgraded.reruns else "")
                )
    if failures:
        raise UpgradeCheckFailed(
            f"{failures[0]}\n({len(failures)} of {len(points)} deploy points broke the run)"
        )
    return CrashReport(baseline, points)


def _name_in(app: App, fn: Callable[..., Awaitable[Any]]) -> str:
    spec = app.spec_for(fn)
    assert spec is not None  # spec_for raises for a function the app does not register
    return spec.name


def _upgraded(point: Checkpoint) -> str:
    """``describe(point)`` as a deploy: "deploy after position 3 (step 'x') was journaled"."""
    return "deploy" + describe(point).removeprefix("crash")


def _error(outcome: Outcome) -> str:
    return f" ({outcome.error.type}: {outcome.error.message})" if outcome.error else ""
