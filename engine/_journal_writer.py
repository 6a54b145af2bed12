"""Group commit for journal appends.

Appends that arrive while a statement is committing wait and go together in the next one, so
under load many runs' steps share one round trip and one commit, and an idle worker adds no
delay at all (the first append is sent at once). A caller returns only when the statement that
holds its entry has committed: a step is durable before it returns, exactly as with one
statement per step. A statement that fails fails every caller in it with the same error, so no
step in a failed flush returns success; each is run again on the run's next attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine import _lineage

Outcome = Literal["written", "fenced", "conflict"]


@dataclass(frozen=True)
class PendingEntry:
    run_id: uuid.UUID
    attempt: int
    position: str
    kind: str
    name: str
    value: Any
    error: Any


# One outcome per entry, in order; an exception in place of an outcome fails that caller alone.
Flush = Callable[[Sequence[PendingEntry]], Awaitable[list[Outcome | BaseException]]]


class JournalWriter:
    """Batches appends into at most ``max_in_flight`` concurrent statements of at most
    ``max_batch`` entries each."""

    def __init__(self, flush: Flush, *, max_batch: int = 500, max_in_flight: int = 2) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[tuple[PendingEntry, asyncio.Future[Outcome]]] = []
        self._in_flight = 0
        self.statements = 0  # flushes sent, for the benchmarks and tests
        self.entries = 0

    async def append(self, entry: PendingEntry) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, future))
        self._send()
        return await future

    def _send(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(
                self._commit(batch), context=_lineage.detached_context()
            )

    async def _commit(self, batch: list[tuple[PendingEntry, asyncio.Future[Outcome]]]) -> None:
        try:
            outcomes = await self._flush([entry for entry, _future in batch])
        except BaseException as exc:  # every caller in the statement learns it failed
            for _entry, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self.statements += 1
            self.entries += len(batch)
            for (_entry, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            self._send()
