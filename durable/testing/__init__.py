"""Test durable functions: crash them anywhere, deploy new code at any point, move time, vary
event order, stub steps, and replay recorded journals and runs in flight against new code.

Runs execute in this process, on a virtual clock, on PostgreSQL: in a database of each
simulation's own, on the embedded server unless a URL says otherwise (``Simulation``). The
database's own functions apply every rule of a deployment (rate limits, concurrency keys,
priorities, timeouts, delays, children), so a simulation honours every declaration of the app::

    from durable.testing import Send, Simulation, crash_at_every_point

    async def test_order_survives_a_crash_anywhere():
        await crash_at_every_point(app, order, Order(id="o1", amount=30),
                                   events=[Send("paid", key="o1", at=timedelta(hours=1))])

    async def test_an_unpaid_order_is_cancelled_after_a_day():
        outcome = await Simulation(app).run(order, Order(id="o1", amount=30))
        assert outcome.result == "cancelled"
        assert outcome.elapsed == timedelta(days=1)

``upgrade_at_every_point(old_app, new_app, fn, input)`` deploys ``new_app``'s code at every
journal boundary of a run of ``old_app``'s. ``replay`` needs no database: it replays a recorded
journal in memory, running nothing live; ``check_runs`` does that for every unfinished run of a
database (``durable check``).
Hypothesis strategies for crash schedules, event orders, timer lateness and the completion
order of parallel steps are in ``durable.testing.strategies``.
"""

from __future__ import annotations

from durable.testing._check import CheckReport, RunDifference, check_runs
from durable.testing._crashes import CrashCheckFailed, CrashReport, crash_at_every_point
from durable.testing._outcome import Outcome, describe
from durable.testing._replay import RecordedRun, ReplayReport, replay
from durable.testing._simulation import Send, Simulation, SimulationError
from durable.testing._stubs import failing
from durable.testing._upgrade import UpgradeCheckFailed, upgrade_at_every_point
from engine import Checkpoint, VirtualClock

__all__ = [
    "CheckReport",
    "Checkpoint",
    "CrashCheckFailed",
    "CrashReport",
    "Outcome",
    "RecordedRun",
    "ReplayReport",
    "RunDifference",
    "Send",
    "Simulation",
    "SimulationError",
    "UpgradeCheckFailed",
    "VirtualClock",
    "check_runs",
    "crash_at_every_point",
    "describe",
    "failing",
    "replay",
    "upgrade_at_every_point",
]
