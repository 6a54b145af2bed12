"""Cron schedules: each tick of a schedule starts exactly one run, however many workers tick it.

Every worker runs a ``Scheduler`` for the schedules its app declares. It reads their next ticks
(one query), and for each tick that has come it asks the store to fire it: a compare-and-set on
the schedule's next tick, with the run started in the same transaction under an idempotency key
naming the tick. Of the workers that race for a tick, one moves it on; the others find it gone.

Missed ticks (every worker was down) follow the schedule's ``catch_up`` policy: ``"latest"``
(the default) starts the latest missed tick once and moves on to the first tick in the future;
``"all"`` starts every missed tick, one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine._records import NewRun, ScheduleRow
from engine._registry import FunctionSpec, new_run
from engine.errors import ConfigurationError, DatabaseUnavailable

if TYPE_CHECKING:
    from croniter import croniter

log = logging.getLogger(__name__)

CatchUp = Literal["latest", "all"]


@dataclass(frozen=True)
class Schedule:
    """A cron schedule of a durable function: ``cron`` has five fields (minute hour day month
    weekday) or six with seconds first, read in ``timezone`` (DST included)."""

    name: str
    function: str
    cron: str
    timezone: str = "UTC"
    input: Any = None
    catch_up: CatchUp = "latest"

    def __post_init__(self) -> None:
        from croniter import croniter  # imported when an app declares a schedule

        fields = len(self.cron.split())
        if fields not in (5, 6) or not croniter.is_valid(
            self.cron, second_at_beginning=fields == 6
        ):
            raise ConfigurationError(
                f"schedule {self.name!r}: {self.cron!r} is not a cron expression (five fields, "
                f"or six with seconds first)"
            )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}"
            ) from exc
        if self.catch_up not in ("latest", "all"):
            raise ConfigurationError(f"schedule {self.name!r}: catch_up must be latest or all")

    def _ticks(self, start: datetime, *, backwards: bool = False) -> croniter:
        from croniter import croniter

        local = start.astimezone(ZoneInfo(self.timezone))
        six = len(self.cron.split()) == 6
        return croniter(self.cron, local, is_prev=backwards, second_at_beginning=six)

    def tick_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""
        tick: datetime = self._ticks(moment).get_next(datetime)
        return tick

    def latest_tick(self, moment: datetime) -> datetime:
        """The latest tick at or before ``moment``."""
        tick: datetime = self._ticks(moment + timedelta(microseconds=1)).get_prev(datetime)
        return tick

    def row(self, next_tick: datetime) -> ScheduleRow:
        """This schedule as the store keeps it, due next at ``next_tick``."""
        return ScheduleRow(
            self.name,
            self.function,
            self.cron,
            self.timezone,
            self.input,
            self.catch_up,
            next_tick,
            last_tick=None,
            last_run_id=None,
        )


class ScheduleStore(Protocol):
    """What a scheduler needs of its store (PostgresStore keeps it)."""

    async def define_schedule(self, row: ScheduleRow) -> None: ...

    async def list_schedules(
        self, names: Sequence[str] | None = None
    ) -> tuple[list[ScheduleRow], datetime]:
        """The stored schedules (of ``names``, or all), and the store's now."""
        ...

    async def fire_schedule(
        self, name: str, expected: datetime, tick: datetime, following: datetime, run: NewRun
    ) -> uuid.UUID | None: ...


class Scheduler:
    """Fires the ticks of ``schedules`` until cancelled."""

    def __init__(
        self,
        store: ScheduleStore,
        schedules: Sequence[Schedule],
        functions: Mapping[str, FunctionSpec],
        *,
        poll_interval: timedelta,
    ) -> None:
        self.store = store
        self.schedules = {s.name: s for s in schedules}
        self.functions = functions
        self.poll = poll_interval.total_seconds()

    async def run(self) -> None:
        if not self.schedules:
            return
        await self._declare()
        while True:
            try:
                wait = await self._fire_due()
            except DatabaseUnavailable as exc:
                log.warning("schedules: database unreachable (%s); retrying", exc)
                wait = min(self.poll, 1.0)
            await asyncio.sleep(wait)

    async def _declare(self) -> None:
        while True:
            with contextlib.suppress(DatabaseUnavailable):
                _rows, now = await self.store.list_schedules([])
                for schedule in self.schedules.values():
                    await self.store.define_schedule(schedule.row(schedule.tick_after(now)))
                return
            await asyncio.sleep(min(self.poll, 1.0))

    async def _fire_due(self) -> float:
        """Fire every tick that has come; returns how long to wait for the next one."""
        rows, now = await self.store.list_schedules(list(self.schedules))
        upcoming = []
        for row in rows:
            schedule = self.schedules[row.name]
            next_tick = row.next_tick
            if next_tick <= now:
                next_tick = await self._fire(schedule, row, now)
            upcoming.append(next_tick)
        soonest = min(upcoming, default=None)
        if soonest is None:
            return self.poll
        return max(0.0, min(self.poll, (soonest - now).total_seconds()))

    async def _fire(self, schedule: Schedule, row: ScheduleRow, now: datetime) -> datetime:
        if schedule.catch_up == "all":
            tick, following = row.next_tick, schedule.tick_after(row.next_tick)
        else:
            tick, following = schedule.latest_tick(now), schedule.tick_after(now)
        run = self._run_for(schedule, tick)
        run_id = await self.store.fire_schedule(schedule.name, row.next_tick, tick, following, run)
        if run_id is not None:
            log.info("schedule %s: tick %s started run %s", schedule.name, tick, run_id)
        return following

    def _run_for(self, schedule: Schedule, tick: datetime) -> NewRun:
        key = f"schedule:{schedule.name}:{tick.isoformat()}"
        return new_run(
            self.functions,
            schedule.function,
            schedule.input,
            run_id=uuid.uuid4(),
            idempotency_key=key,
        )
