"""``Hosting``: the workers an app runs in this process (``app.run_worker``), each with the
scheduler that fires the app's cron ticks and the cleaner that applies retention, and how they
are told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from durable._connection import Connection, declare_rate_limits
from durable._declarations import Declarations
from engine import Cleaner, Scheduler, Worker, WorkerOptions, _metrics

log = logging.getLogger("durable._app")


class Hosting:
    """The ``run_worker`` calls in progress, so that ``stop`` reaches each of them."""

    def __init__(
        self,
        declarations: Declarations,
        connection: Connection,
        connect: Callable[[], Awaitable[None]],
    ) -> None:
        self._declarations = declarations
        self._connection = connection
        self._connect = connect
        self._hosted: set[_Hosted] = set()

    async def run_worker(
        self,
        concurrency: int,
        *,
        functions: list[str] | None,
        queues: Sequence[str],
        worker_id: str | None,
        shutdown_grace: timedelta,
    ) -> None:
        settings = self._connection.settings
        options = WorkerOptions(
            concurrency=concurrency,
            lease=settings.lease,
            poll_interval=settings.poll_interval,
            short_wait=settings.short_wait,
            shutdown_grace=shutdown_grace,
            max_payload_bytes=settings.max_payload_bytes,
            **({"worker_id": worker_id} if worker_id else {}),
        )
        hosted = _Hosted()
        self._hosted.add(hosted)
        try:
            if not await hosted.unless_stopped(self._connect()):
                log.info("worker stopped before it connected to the database")
                return
            store = self._connection.store
            declared = self._declarations
            # Those declared after the app connected too.
            await declare_rate_limits(store, declared.rate_limits)
            await store.open_segments(declared.retentions)
            every = declared.functions
            served = {
                name: spec
                for name, spec in every.items()
                if spec.options.queue in queues and (functions is None or name in functions)
            }
            worker = Worker(store, served, self._connection.listener, options, registry=every)
            scheduler = Scheduler(
                store, declared.schedules, every, poll_interval=settings.poll_interval
            )
            cleaner = Cleaner(store, settings.cleanup_interval)

            async def read_gauges() -> _metrics.Snapshot:
                return _metrics.snapshot_of(
                    await store.queue_depths(),
                    await store.count_suspended(),
                    await store.busy_keys(_metrics.KEYS),
                )

            # What the database holds, read when a metrics reader collects (never otherwise).
            _metrics.database_gauges.add(asyncio.get_running_loop(), read_gauges)
            try:
                await hosted.serve(worker, scheduler, cleaner)
            finally:
                _metrics.database_gauges.remove(read_gauges)
        finally:
            self._hosted.discard(hosted)
        if self._connection.embedded_lost is not None:  # the embedded server died for good
            raise self._connection.embedded_lost

    def stop(self) -> None:
        for hosted in list(self._hosted):
            hosted.stop()

    def worker_for(self, function: str) -> Worker | None:
        """A worker of this process that can run a run of ``function`` started now, at once
        (``Worker.can_start``), if the app starts runs eagerly."""
        if not self._connection.settings.eager_start:
            return None
        for hosted in self._hosted:
            if hosted.worker is not None and hosted.worker.can_start(function):
                return hosted.worker
        return None

    def attempt_here(self, run_id: uuid.UUID) -> asyncio.Task[None] | None:
        """The task of an attempt of ``run_id`` that a worker of this process runs now on the
        caller's event loop (``Worker.attempt_here``), if any."""
        for hosted in self._hosted:
            if hosted.worker is not None:
                found = hosted.worker.attempt_here(run_id)
                if found is not None:
                    return found
        return None


class _Hosted:
    """One ``run_worker`` call: its worker once it has one, and whether it was told to stop."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        self.worker: Worker | None = None

    def stop(self) -> None:
        self.stopped.set()
        if self.worker is not None:
            self.worker.stop()

    async def unless_stopped(self, work: Awaitable[None]) -> bool:
        """Await ``work`` unless ``stop`` comes first (then cancel it); True if it finished."""
        doing = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({doing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task is being cancelled: take the work down with it
            doing.cancel()
            raise
        finally:
            stopping.cancel()
        if doing.done():
            doing.result()
            return True
        doing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await doing
        return False

    async def serve(self, worker: Worker, scheduler: Scheduler, cleaner: Cleaner) -> None:
        self.worker = worker
        if self.stopped.is_set():
            return
        beside = [asyncio.create_task(scheduler.run()), asyncio.create_task(cleaner.run())]
        try:
            await worker.run()
        finally:
            for task in beside:
                task.cancel()
            for task in beside:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
