"""Group commit: writes that arrive while a statement is committing go together in the next.

Under load many runs' journal appends (or completions) share one round trip and one commit,
and an idle worker adds no delay at all: the first write is sent at once, in the next turn of
the event loop, with the writes made in the same turn as it. A caller returns only
when the statement that holds its write has committed, so a step is durable before it returns,
exactly as with one statement per step. A statement that fails fails every caller in it with
the same error: no step in a failed flush returns success, and each runs again on the run's
next attempt.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from engine import _lineage
from engine._records import StepTiming

Outcome = Literal["written", "fenced", "conflict"]
W = TypeVar("W")  # a write
R = TypeVar("R")  # its outcome


@dataclass(frozen=True)
class PendingEntry:
    """A journal append waiting for its statement."""

    run_id: uuid.UUID
    attempt: int
    position: str
    kind: str
    name: str
    value: Any
    error: Any
    timing: StepTiming | None = None


@dataclass(frozen=True)
class PendingFinish:
    """A run's end (completed, failed or paused) waiting for its statement."""

    run_id: uuid.UUID
    attempt: int
    status: str
    result: Any
    error: Any


class GroupCommit(Generic[W, R]):
    """Sends writes in at most ``max_in_flight`` concurrent statements of at most ``max_batch``
    writes each. ``flush`` returns one outcome per write, in order; an exception in place of an
    outcome fails that caller alone.

    ``spacing`` (seconds): the least time between the starts of two statements. A write that
    comes sooner after the last statement began waits out the rest, and every write made
    meanwhile goes with it: under a steady load of lone writes (runs started one by one, each
    ending alone) statements carry several writes instead of one each, which saves each of
    those writes a statement's client work (its send is the largest part) and a commit. A write
    after a quiet spell goes at once, and so do writes made with ``enough`` once that many wait
    (work waits on them, and they make a statement worth sending): they end the wait of a
    statement that is waiting out the spacing."""

    def __init__(
        self,
        flush: Callable[[Sequence[W]], Awaitable[list[R | BaseException]]],
        *,
        max_batch: int = 500,
        max_in_flight: int = 1,
        spacing: float = 0.0,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._spacing = spacing
        self._last_start = -math.inf
        self._queue: list[tuple[W, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._next: asyncio.Task[None] | None = None  # a statement yet to take its batch
        self._hurried = False  # enough writes wait for _next: no spacing
        self._spaced: asyncio.Future[None] | None = None  # _next's wait, while it lasts
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self.statements = 0  # flushes that committed, for benchmarks and tests
        self.writes = 0

    async def write(self, item: W, *, enough: int | None = None) -> R:
        """Queue ``item`` and return its outcome once its statement has committed. ``enough``:
        once this many writes wait (``item`` among them), their statement goes without waiting
        out the spacing."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if enough is not None and len(self._queue) >= enough:
            self._hurried = True
            if self._spaced is not None and not self._spaced.done():
                self._spaced.set_result(None)
        self._send()
        return await future

    def _send(self) -> None:
        if self._queue and self._next is None and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            loop = asyncio.get_running_loop()
            wait = 0.0 if self._hurried else self._last_start + self._spacing - loop.time()
            task = loop.create_task(self._commit(wait), context=_lineage.detached_context())
            self._next = task
            self._tasks.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task is self._next:
            # Cancelled before it took its batch (in its spacing's wait, or before it first
            # ran): the loop is going away. The writes that waited for it are cancelled, as
            # those of a statement cancelled in flight are, and a later write starts another.
            self._next = None
            self._hurried = False
            self._in_flight -= 1
            waiting, self._queue = self._queue, []
            for _item, future in waiting:
                future.cancel()

    async def _commit(self, wait: float) -> None:
        if wait > 0:  # spaced: the wait is the task's, so a loop that shuts down cancels it
            loop = asyncio.get_running_loop()
            self._spaced = spaced = loop.create_future()
            timer = loop.call_later(wait, _settle, spaced)
            try:
                await spaced
            finally:
                timer.cancel()
                self._spaced = None
        # The batch is taken when the task runs (after its spacing), not when it was created:
        # the writes queued in the same turn of the event loop as the first (the runs of one
        # claim, ending together) go with it, at no cost in latency.
        self._next = None
        self._hurried = False
        self._last_start = asyncio.get_running_loop().time()
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        self._send()  # the rest, if more statements may be in flight
        cancelled = False
        try:
            outcomes = await self._flush([item for item, _future in batch])
        except BaseException as exc:  # every caller in the statement learns it failed
            for _entry, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                cancelled = True  # the loop is going away: send nothing more
                raise
        else:
            self.statements += 1
            self.writes += len(batch)
            for (_entry, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            if not cancelled:
                self._send()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
