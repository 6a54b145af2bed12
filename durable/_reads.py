"""Reading runs for people: runs by filter with keyset pagination, counts by status, and what
holds capacity (queues, concurrency keys, rate limits, schedules, recent events). The dashboard
and ``durable runs list`` read through these; nothing here writes."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, get_args

from durable._connection import Connection
from durable._handle import RunInfo
from engine import RunFilter, RunStatus, ScheduleRow, _limits
from engine.errors import InvalidInput

MAX_LISTED = 100_000
# What changes a run: an entry journaled, its end, a cancellation (migration 0003).
WATCHED = ("durable_journal", "durable_done", "durable_cancel")


@dataclass(frozen=True)
class QueueDepth:
    """A queue's runs due to start (``pending``), not due yet (``scheduled``) and running, and
    how long its oldest due run has waited (``queue`` None: runs started by code that does not
    declare their function). The view durable.queue_depths holds the same."""

    queue: str | None
    pending: int
    running: int
    oldest_pending_age: timedelta | None
    scheduled: int = 0


@dataclass(frozen=True)
class KeySlots:
    """A concurrency key: its limit, the runs holding a slot and the runs awaiting one."""

    key: str
    limit: int | None
    holding: int
    awaiting: int


@dataclass(frozen=True)
class RateUsage:
    """A rate limit and the units granted in its current window."""

    name: str
    budget: int
    period: timedelta
    used: int


@dataclass(frozen=True)
class RecentEvent:
    event_id: int
    name: str
    key: str
    payload: str | None  # its JSON, cut to 200 characters
    created_at: datetime


@dataclass(frozen=True)
class Capacity:
    """What holds capacity now (``App.capacity``, the dashboard's capacity page)."""

    queues: list[QueueDepth]
    keys: list[KeySlots]
    rate_limits: list[RateUsage]
    schedules: list[ScheduleRow]
    events: list[RecentEvent]


class Reads:
    """Runs and capacity as people read them, through an app's connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def list_runs(self, where: RunFilter, limit: int, after: RunInfo | None) -> list[RunInfo]:
        _limits.count(limit, "list_runs: the limit", maximum=MAX_LISTED)
        checked = checked_filter(where)
        keyset = None if after is None else (after.created_at, after.run_id)
        rows = await self._connection.store.find_runs(checked, limit=limit, after=keyset)
        return [RunInfo.from_row(r) for r in rows]

    async def count_runs(self, where: RunFilter, cap: int) -> dict[str, int]:
        _limits.count(cap, "count_runs: the cap", maximum=MAX_LISTED)
        return await self._connection.store.count_runs(checked_filter(where), cap=cap)

    async def watch(self, on_change: Callable[[str], None]) -> Callable[[], Awaitable[None]]:
        """Call ``on_change(ids)`` whenever runs change: ``ids`` is their ids, comma-separated,
        or empty when any run may have changed (a large batch, a reconnection). Returns the
        coroutine function that stops watching (closing the app stops it too)."""
        return await self._connection.watch(WATCHED, on_change)

    async def capacity(self, *, keys: int = 50, events: int = 20) -> Capacity:
        store = self._connection.store
        depths = await store.queue_depths()
        schedules, _now = await store.list_schedules()
        return Capacity(
            queues=[
                QueueDepth(
                    d["queue"],
                    d["pending"],
                    d["running"],
                    None if d["oldest_pending"] is None else d["now"] - d["oldest_pending"],
                    d["scheduled"],
                )
                for d in depths
            ],
            keys=[KeySlots(**k) for k in await store.busy_keys(keys)],
            rate_limits=[RateUsage(**r) for r in await store.rate_usage()],
            schedules=schedules,
            events=[
                RecentEvent(e["id"], e["name"], e["key"], e["payload"], e["created_at"])
                for e in await store.recent_events(events)
            ],
        )


def checked_filter(where: RunFilter) -> RunFilter:
    """``where`` with every value checked (InvalidInput naming the field otherwise)."""
    if where.status is not None and where.status not in get_args(RunStatus):
        raise InvalidInput(
            f"runs filter: {where.status!r} is not a run status ({', '.join(get_args(RunStatus))})"
        )
    names: dict[str, Any] = {
        field: _limits.name(value, f"runs filter: the {field}")
        for field in ("function", "queue", "version")
        if (value := getattr(where, field)) is not None
    }
    if where.tags is not None:
        names["tags"] = _limits.tags(where.tags, "runs filter: tags")
    for field in ("since", "until"):
        if (value := getattr(where, field)) is not None:
            names[field] = _limits.moment(value, f"runs filter: {field}")
    if where.search is not None:
        names["search"] = _limits.key(where.search, "runs filter: the search")
    return dataclasses.replace(where, **names)
