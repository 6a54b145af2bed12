"""``App``: a durable application. What it declares lives in ``durable._declarations``, its way
to the database in ``durable._connection``, what it does with runs and events in
``durable._client``, and the workers it runs in ``durable._hosting``; ``App`` puts them together
behind the public API.

Over 400 lines: the public API's signatures (the overloads of ``start`` spelled out for type
checkers) and docstrings; the work is done in the modules it puts together.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

import asyncpg

from durable._client import Client, VersionCount
from durable._connection import Connection
from durable._declarations import Declarations
from durable._handle import RunHandle, RunInfo
from durable._hosting import Hosting
from durable._reads import MAX_LISTED, Capacity, Reads
from durable._settings import Settings
from engine import Cleanup, Context, RunFilter, ScheduleRow, SegmentRow, _limits, prepare
from engine.errors import ConfigurationError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741

__all__ = ["MAX_LISTED", "App"]


class App(Declarations):
    """A durable application: its functions and its connection to Postgres.

    ::

        app = durable.App()          # database_url=None → $DURABLE_DATABASE_URL → embedded

        @app.function()
        async def greet(ctx: durable.Context, name: str) -> str:
            return await ctx.step("greet", make_greeting, name)

        async with app:              # connects and applies migrations
            run = await app.start(greet, "Ada")
            print(await run.result())

    ``lease`` bounds how long a killed worker's runs stay stuck before another worker resumes
    them; ``connect_timeout=None`` retries an unreachable database forever (with backoff).
    ``max_payload_bytes`` (1 MiB; None for no limit) caps the JSON of an input, an event payload,
    a step's result and a run's result: a larger one raises ``PayloadTooLarge``. ``version``
    names the code of every function (a release tag, a commit); by default each function's
    version is a digest of its own source, so an unchanged function keeps its version across
    deploys. Each run records the version it started on and each attempt the version it ran
    on (``durable versions``). ``retention`` (at least an hour; None keeps everything) is how
    long finished runs are kept, with their journal, and the events this app sends; each
    worker cleans up every ``cleanup_interval`` (one at a time across all of them), by
    dropping whole partitions (``durable retention status`` shows them). A setting out of range
    (a lease that is not positive, a pool of no connections) raises ConfigurationError here.

    With ``database_url`` through PgBouncer in transaction mode: ``listen_url`` (or
    ``$DURABLE_LISTEN_URL``) is a direct URL of the same database to LISTEN on, and says the
    app is pooled; ``pooled=True`` (``DURABLE_POOLED=1``) without it polls every
    ``poll_interval``. A pooled app keeps nothing in a server session between transactions.

    ``eager_start`` (on by default): a run started beside a worker of this app that serves its
    function and has a slot free is claimed by that worker in the start's own statement and
    begins at once; off, every start goes through the queue.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: timedelta = timedelta(seconds=2),
        short_wait: timedelta = timedelta(milliseconds=250),
        pool_size: int = 10,
        connect_timeout: float | None = None,
        max_payload_bytes: int | None = 1 << 20,
        version: str | None = None,
        retention: timedelta | None = None,
        cleanup_interval: timedelta = timedelta(minutes=10),
        listen_url: str | None = None,
        pooled: bool | None = None,
        eager_start: bool = True,
    ) -> None:
        if version is not None and not (
            isinstance(version, str) and 0 < len(version) <= 100 and version.isprintable()
        ):
            raise ConfigurationError(
                f"App: version must be 1 to 100 printable characters, got {version!r:.120}"
            )
        settings = Settings(
            database_url=database_url,
            lease=lease,
            poll_interval=poll_interval,
            short_wait=short_wait,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            max_payload_bytes=max_payload_bytes,
            retention=retention,
            cleanup_interval=cleanup_interval,
            listen_url=listen_url,
            pooled=pooled,
            eager_start=eager_start,
        )
        super().__init__(settings.max_payload_bytes, version, settings.retention)
        self._connection = Connection(settings, on_lost=self.stop_workers)
        self._hosting = Hosting(self, self._connection, self.connect)
        self._client = Client(
            self, self._connection, self._hosting.worker_for, self._hosting.attempt_here
        )
        self._reads = Reads(self._connection)

    @property
    def settings(self) -> Settings:
        """The app's settings, checked when it was built."""
        return self._connection.settings

    def configure(
        self, *, database_url: str | None = None, connect_timeout: float | None = None
    ) -> None:
        """Point the app elsewhere before it connects (the CLI's ``--database-url`` and
        ``--connect-timeout`` do this to the app they load). A value left None is kept."""
        if self._connection.is_open:
            raise ConfigurationError("configure() must come before the app connects")
        changes: dict[str, Any] = {}
        if database_url is not None:
            changes["database_url"] = database_url
        if connect_timeout is not None:
            changes["connect_timeout"] = connect_timeout
        self._connection.settings = dataclasses.replace(self.settings, **changes)

    # -- connection -----------------------------------------------------------------------------

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (starting the embedded Postgres if no URL is set) and apply migrations."""
        await self._connection.open(
            self.rate_limits, {"durable_done": self._client.dispatch_done}, self.retentions
        )
        for spec in self._functions.values():  # not at a process's first start of each
            if spec.takes_input:
                prepare(spec.input_type)
            prepare(spec.return_type)

    async def close(self) -> None:
        """Stop this app's workers and close its connections."""
        self.stop_workers()
        await self._connection.close()

    @property
    def connected(self) -> bool:
        """Whether the app is connected (``connect`` was awaited and not yet closed)."""
        return self._connection.is_open

    @property
    def database_url(self) -> str | None:
        """The URL in use once connected (the embedded server's when none was given)."""
        return self._connection.dsn

    # -- runs -----------------------------------------------------------------------------------

    @overload
    async def start(
        self,
        fn: Callable[[Context, I], Awaitable[T]],
        input: I,
        *,
        run_id: uuid.UUID | str | None = None,
        idempotency_key: str | None = None,
        connection: asyncpg.Connection[Any] | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle[T]: ...

    @overload
    async def start(
        self,
        fn: Callable[[Context], Awaitable[T]],
        input: None = None,
        *,
        run_id: uuid.UUID | str | None = None,
        idempotency_key: str | None = None,
        connection: asyncpg.Connection[Any] | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle[T]: ...

    @overload
    async def start(
        self,
        fn: str,
        input: Any = None,
        *,
        run_id: uuid.UUID | str | None = None,
        idempotency_key: str | None = None,
        connection: asyncpg.Connection[Any] | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle[Any]: ...

    async def start(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        input: Any = None,
        *,
        run_id: uuid.UUID | str | None = None,
        idempotency_key: str | None = None,
        connection: asyncpg.Connection[Any] | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle[Any]:
        """Start a run of ``fn`` (a registered function, or its name) with ``input``.

        The input is validated against the function's annotation here: invalid input raises
        InvalidInput and nothing is stored. With an ``idempotency_key`` (or a ``run_id``) that
        already exists, the existing run is returned instead of starting a second one.
        ``priority`` overrides the function's; ``delay`` (from the database's now) or
        ``start_at`` postpone the run's start. ``tags`` (at most 20 string names and values,
        such as ``{"tenant": "acme"}``) are stored with the run, to find it by
        (``durable runs list --tag tenant=acme``, the dashboard).

        With ``connection`` (your own asyncpg connection, in your transaction) the run is
        stored in that transaction: it exists, and a worker sees it, if and only if your
        transaction commits::

            async with conn.transaction():
                await conn.execute("INSERT INTO orders ...")
                await app.start(fulfil, order, connection=conn)
        """
        return await self._client.start(
            fn,
            input,
            run_id=run_id,
            idempotency_key=idempotency_key,
            connection=connection,
            priority=priority,
            delay=delay,
            start_at=start_at,
            tags=tags,
        )

    async def start_many(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        priority: int | None = None,
        connection: asyncpg.Connection[Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[RunHandle[Any]]:
        """Start one run of ``fn`` per input, in one round trip; handles come back in order.

        Every input is validated before anything is stored, so one invalid input starts none.
        With ``idempotency_keys`` (one per input, distinct, None for none), a key that already
        exists returns the existing run, as ``start`` does::

            handles = await app.start_many(send_invoice, invoices,
                                           idempotency_keys=[f"invoice-{i.id}" for i in invoices])

        With ``connection``, the runs are stored in your transaction, as with ``start``;
        ``tags`` go with every run, as with ``start``.
        """
        return await self._client.start_many(
            fn,
            inputs,
            idempotency_keys=idempotency_keys,
            priority=priority,
            connection=connection,
            tags=tags,
        )

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        """A handle on an existing run (its existence is checked when you ask it something).
        A string that is not a UUID raises InvalidInput."""
        return self._client.get_run(run_id)

    async def list_runs(
        self,
        where: RunFilter | None = None,
        *,
        status: str | None = None,
        limit: int = 50,
        after: RunInfo | None = None,
    ) -> list[RunInfo]:
        """The most recent runs (at most ``limit``, up to 100,000), newest first, that match
        ``where`` (status, function, queue, version, tags, time range, search: see
        ``RunFilter``) and ``status``. The next page: ``after=`` the last run of this one::

            page = await app.list_runs(RunFilter(tags={"tenant": "acme"}), status="failed")
        """
        where = where or RunFilter()
        if status is not None:
            where = dataclasses.replace(where, status=status)  # type: ignore[arg-type]
        return await self._reads.list_runs(where, limit, after)

    async def count_runs(
        self, where: RunFilter | None = None, *, cap: int = 10_000
    ) -> dict[str, int]:
        """How many runs match ``where`` (its status aside), by status, counting at most
        ``cap`` of each (a count equal to ``cap`` means "at least")."""
        return await self._reads.count_runs(where or RunFilter(), cap)

    async def watch_runs(self, on_change: Callable[[str], None]) -> Callable[[], Awaitable[None]]:
        """Call ``on_change(ids)`` when runs change (their ids comma-separated, or "": any may
        have); returns the coroutine function that stops. Feeds the dashboard's live pages."""
        return await self._reads.watch(on_change)

    async def capacity(self) -> Capacity:
        """What holds capacity now: each queue's pending and running runs and its oldest
        pending run's age, the busiest concurrency keys, rate limits with the units used in
        their window, schedules, and the events sent last."""
        return await self._reads.capacity()

    async def clean_up(self) -> Cleanup | None:
        """One retention pass now, as the workers make every ``cleanup_interval``: open the
        segments due to open, drop those whose retention has passed (after carrying forward
        what must stay). None when another process is cleaning up."""
        return await self._connection.store.clean_up()

    async def retention_status(self) -> list[SegmentRow]:
        """Each segment of the partitioned tables: its size, its runs and events, when it is
        due, and what would outlive it; then the last ten dropped, with what each removed."""
        return await self._connection.store.retention_status()

    def select_runs(
        self,
        statuses: Sequence[str],
        *,
        function: str | None = None,
        within: timedelta | None = None,
        forked: bool | None = None,
    ) -> AsyncIterator[RunInfo]:
        """Every run of ``statuses``, optionally of one function, created within ``within`` of
        now, and (``forked``) already forked or retried or not, in no particular order, read
        page by page (``durable runs retry --status``)::

            recent = app.select_runs(["failed"], within=timedelta(hours=2), forked=False)
            async for info in recent:
                await app.retry_run(info.run_id)
        """
        within = None if within is None else _limits.duration(within, "select_runs: within")
        return self._client.select_runs(statuses, function=function, within=within, forked=forked)

    async def cancel_run(self, run_id: uuid.UUID | str, reason: str = "cancelled") -> str:
        """Cancel a run and its unfinished child runs (see ``RunHandle.cancel``). Returns
        ``"cancelled"``, ``"requested"`` (running: its worker is ending it), ``"finished"``
        (it had already ended) or ``"not_found"``."""
        return await self._client.cancel_run(run_id, reason)

    async def resume_run(self, run_id: uuid.UUID | str) -> bool:
        """Make a paused run (non-determinism) runnable again; False if it was not paused.
        Raises RunNotFound when no run has that id."""
        return await self._client.resume_run(run_id)

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule stored in the database (of any app), by name."""
        return await self._client.list_schedules()

    async def retry_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        """Run a failed, cancelled or timed-out run again from its failure point, as a new run:
        a fork (``RunHandle.fork``) that keeps every journal entry before the first failed one
        (all of them when none failed), so the steps that succeeded are not run again and the
        rest runs on the code as it is now. The failed run is untouched; the new one records
        it as ``forked_from``. InvalidInput for a run that has not ended so."""
        return await self._client.retry_run(run_id)

    async def versions(self) -> list[VersionCount]:
        """The runs of every function by the version of the code they started on and by
        status (``durable versions``): a version with no pending, running, suspended or paused
        run left is one no run needs any more."""
        return await self._client.list_versions()

    async def send_event(
        self,
        name: str,
        payload: Any = None,
        *,
        key: str | None = None,
        connection: asyncpg.Connection[Any] | None = None,
    ) -> int:
        """Send an event; every run waiting on ``name`` and ``key`` receives it once.

        The event is stored, so a run that reaches ``wait_for_event`` later still receives it
        (if it was sent after the run started). Returns the event's id. With ``connection``
        (your own asyncpg connection, in your transaction) the event exists, and wakes its
        waiters, if and only if your transaction commits.
        """
        return await self._client.send_event(name, payload, key=key, connection=connection)

    # -- workers --------------------------------------------------------------------------------

    async def run_worker(
        self,
        concurrency: int = 10,
        *,
        functions: list[str] | None = None,
        queues: Sequence[str] = ("default",),
        worker_id: str | None = None,
        shutdown_grace: timedelta = timedelta(seconds=10),
    ) -> None:
        """Execute runs of this app's functions until cancelled or ``stop_workers()``.

        ``concurrency`` bounds the runs executing at once; suspended (sleeping, waiting) runs
        hold no slot. The worker serves the functions on ``queues`` (``@app.function(queue=)``;
        the default queue unless given), optionally narrowed to ``functions``.

        ``stop_workers()`` stops it: no new runs are claimed, the runs in flight get
        ``shutdown_grace`` to finish, and the rest are handed back to the queue (a run whose
        sync step is still running in a thread keeps its lease until that step returns).
        Called while the worker is still connecting (an unreachable database), it returns at
        once.
        """
        await self._hosting.run_worker(
            concurrency,
            functions=functions,
            queues=queues,
            worker_id=worker_id,
            shutdown_grace=shutdown_grace,
        )

    def stop_workers(self) -> None:
        """Ask this app's workers to finish their runs (within the grace period) and return;
        a ``run_worker`` still connecting returns at once."""
        self._hosting.stop()
