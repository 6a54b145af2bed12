"""``RunHandle``: a started run, to ask about and to wait for."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from engine import JournalEntry, RunRow, RunStatus, WaitRow, load
from engine.errors import (
    DatabaseUnavailable,
    ErrorInfo,
    ResultTimeout,
    RunCancelled,
    RunFailed,
    RunNotFound,
)

T = TypeVar("T")

NO_TYPE: Any = object()  # the return type is not known here: results come back as stored JSON
KEEP_INPUT: Any = object()  # a fork keeps the input of the run it comes from


class RunSource(Protocol):
    """What a ``RunHandle`` asks of the app it came from (``durable._client.Client``)."""

    async def run_row(self, run_id: uuid.UUID) -> RunRow | None: ...

    async def read_awaited(self, run_id: uuid.UUID) -> tuple[RunRow | None, float]:
        """``run_row`` for a caller that waits for the run's end (``on_done``) unless the read
        shows it, and how long to wait for that before reading again (seconds)."""
        ...

    async def children(self, run_id: uuid.UUID) -> list[RunRow]: ...

    async def journal(self, run_id: uuid.UUID) -> list[JournalEntry]: ...

    async def waits(self, run_id: uuid.UUID) -> list[WaitRow]: ...

    async def cancel_run(self, run_id: uuid.UUID | str, reason: str) -> str: ...

    def return_type_of(self, function: str) -> Any: ...

    def on_done(self, run_id: uuid.UUID, callback: Callable[[], None]) -> Callable[[], None]: ...

    def attempt_here(self, run_id: uuid.UUID) -> asyncio.Task[None] | None:
        """The attempt of ``run_id`` a worker of this process runs now on this event loop, if
        any: a task that ends when the attempt does (its end written, the run suspended,
        handed back or lost)."""
        ...

    async def fork_run(
        self,
        run_id: uuid.UUID,
        *,
        from_step: str | None,
        from_position: str | None,
        input: Any,
    ) -> RunHandle[Any]: ...


@dataclass(frozen=True)
class RunInfo:
    """A run as stored: its function, status, timestamps, and result or error."""

    run_id: uuid.UUID
    function: str
    status: RunStatus
    attempt: int
    idempotency_key: str | None
    input: Any
    result: Any
    error: ErrorInfo | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    available_at: datetime | None
    priority: int = 0
    parent_id: uuid.UUID | None = None
    concurrency_key: str | None = None
    cancel_requested: bool = False
    deadline_at: datetime | None = None
    expires_at: datetime | None = None
    # The version of the code of each attempt; version is the one the run started on.
    versions: tuple[str, ...] = ()
    pinned: bool = False
    forked_from: uuid.UUID | None = None
    fork_position: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    queue: str | None = None  # None: started by code that does not declare the function

    @property
    def version(self) -> str | None:
        """The version of the code the run started on (None: it has not started)."""
        return self.versions[0] if self.versions else None

    @classmethod
    def from_row(cls, row: RunRow) -> RunInfo:
        return cls(
            run_id=row.id,
            function=row.function,
            status=row.status,
            attempt=row.attempt,
            idempotency_key=row.idempotency_key,
            input=row.input,
            result=row.result,
            error=None if row.error is None else ErrorInfo.from_json(row.error),
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            available_at=row.available_at,
            priority=row.priority,
            parent_id=row.parent_id,
            concurrency_key=row.concurrency_key,
            cancel_requested=row.cancel_requested,
            deadline_at=row.deadline_at,
            expires_at=row.expires_at,
            versions=tuple(row.versions),
            pinned=row.pinned,
            forked_from=row.forked_from,
            fork_position=row.fork_position,
            tags=dict(row.tags),
            queue=row.queue,
        )


class RunHandle(Generic[T]):
    """A run: ``await handle.result()`` waits for it and returns its result::

    run = await app.start(onboarding, Signup(user_id="u1", email="a@b.c"))
    print(await run.status())        # "pending", "running", "suspended", ...
    outcome = await run.result(timeout=60)
    """

    def __init__(self, source: RunSource, run_id: uuid.UUID, return_type: Any = NO_TYPE) -> None:
        self._source = source
        self.run_id = run_id
        self._return_type = return_type

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id})"

    async def info(self) -> RunInfo:
        """The run as stored now. Raises RunNotFound for an unknown id."""
        row = await self._source.run_row(self.run_id)
        if row is None:
            raise RunNotFound(str(self.run_id))
        return RunInfo.from_row(row)

    async def status(self) -> RunStatus:
        """One of pending, running, suspended, paused, completed, failed, cancelled."""
        return (await self.info()).status

    async def children(self) -> list[RunInfo]:
        """The child runs this run started (``ctx.start``, ``ctx.run``), oldest first."""
        rows = await self._source.children(self.run_id)
        return [RunInfo.from_row(r) for r in rows]

    async def cancel(self, reason: str = "cancelled") -> str:
        """Cancel the run and its unfinished child runs.

        A run no worker is executing ends as cancelled at once. A running one is asked to stop:
        its worker cancels the run's tasks, so the step in progress receives
        ``asyncio.CancelledError``, and ends the run as cancelled. Returns ``"cancelled"``,
        ``"requested"``, ``"finished"`` (it had already ended) or ``"not_found"``;
        ``result()`` then raises RunCancelled."""
        return await self._source.cancel_run(self.run_id, reason)

    async def fork(
        self,
        *,
        from_step: str | None = None,
        from_position: str | None = None,
        input: Any = KEEP_INPUT,
    ) -> RunHandle[T]:
        """Start a new run that reuses this run's journal up to a point and runs the rest live::

            fixed = await app.get_run(run_id).fork(from_step="ship")

        The new run gets every entry journaled before the first entry of step ``from_step``
        (or before the entry at ``from_position``), in the order they were written: the steps
        before the point are not run again, and the step at the point and all after it run on
        the code as it is now. ``input`` replaces the input (the options stay those of this
        run). This run is untouched; the new one records where it came from
        (``info().forked_from``, ``fork_position``; ``durable runs show``). Giving neither
        point forks after the whole journal."""
        handle: RunHandle[T] = await self._source.fork_run(
            self.run_id, from_step=from_step, from_position=from_position, input=input
        )
        return handle

    async def journal(self) -> list[JournalEntry]:
        """The run's journal, in the order it was written."""
        return await self._source.journal(self.run_id)

    async def waits(self) -> list[WaitRow]:
        """What the run waits for now: each event wait registered and not yet received (with
        its deadline), and each child it waits on (name ``durable.child``, key the child's
        id), by journal position."""
        return await self._source.waits(self.run_id)

    async def result(self, timeout: float | None = None) -> T:
        """Wait for the run to finish and return its result, rehydrated by the function's return
        annotation. Raises RunFailed if it failed (RunCancelled if it was cancelled),
        ResultTimeout after ``timeout`` seconds.
        A paused run is waited for like a running one (it continues once resumed)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            here = self._source.attempt_here(self.run_id)
            if here is not None:
                # Run here: its attempt's end is known here first. Waiting for it rather than
                # reading at once keeps a read (which asks the database to announce the end)
                # off the attempt's way, and the read after it finds the end written.
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait({here}, timeout=remaining)
            finished = asyncio.Event()
            unsubscribe = self._source.on_done(self.run_id, finished.set)
            try:
                try:
                    row, patience = await self._source.read_awaited(self.run_id)
                except DatabaseUnavailable:
                    # The database is away (restarting); keep waiting until the deadline.
                    await _wait(finished.wait(), 0.5)
                    continue
                if row is None:
                    raise RunNotFound(str(self.run_id))
                info = RunInfo.from_row(row)
                if info.status == "completed":
                    return self._rehydrate(info)
                if info.status == "failed":
                    assert info.error is not None
                    raise RunFailed(str(self.run_id), info.error)
                if info.status == "cancelled":
                    error = info.error or ErrorInfo("RunCancelled", "cancelled", "durable")
                    raise RunCancelled(str(self.run_id), error)
                wait = patience if deadline is None else min(patience, deadline - loop.time())
                if wait <= 0:
                    raise ResultTimeout(
                        f"run {self.run_id} did not finish within {timeout}s (status {info.status})"
                    )
                await _wait(finished.wait(), wait)
            finally:
                unsubscribe()

    def _rehydrate(self, info: RunInfo) -> T:
        annotation = self._return_type
        if annotation is NO_TYPE:
            annotation = self._source.return_type_of(info.function)
        if annotation is NO_TYPE:
            result: T = info.result
            return result
        rehydrated: T = load(annotation, info.result)
        return rehydrated


async def _wait(waitable: Awaitable[Any], seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waitable, seconds)
