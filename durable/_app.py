"""``App``: registers durable functions, starts runs, sends events, runs workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

import asyncpg

from durable._handle import _NO_TYPE, RunHandle, RunInfo
from engine import (
    CatchUp,
    Concurrency,
    Context,
    FunctionSpec,
    Listener,
    NewRun,
    PostgresStore,
    RunOptions,
    Schedule,
    Scheduler,
    ScheduleRow,
    Worker,
    WorkerOptions,
    _limits,
    _urls,
    current_carrier,
    dump,
    validate_input,
)
from engine.errors import (
    ConfigurationError,
    EmbeddedPostgresError,
    InvalidInput,
    RunNotFound,
    SerializationError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
Fn = TypeVar("Fn", bound=Callable[..., Awaitable[Any]])


class App:
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
    a step's result and a run's result: a larger one raises ``PayloadTooLarge``. A setting out
    of range (a lease that is not positive, a pool of no connections) raises
    ConfigurationError here.
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
    ) -> None:
        self._database_url = database_url
        self._lease = _setting(lease, "App: lease", positive=True)
        self._poll_interval = _setting(poll_interval, "App: poll_interval", positive=True)
        self._short_wait = _setting(short_wait, "App: short_wait")
        self._pool_size = _limits.count(pool_size, "App: pool_size", ConfigurationError)
        if connect_timeout is not None:
            _setting(connect_timeout, "App: connect_timeout", positive=True)
        self._connect_timeout = connect_timeout
        if max_payload_bytes is not None:
            _limits.count(max_payload_bytes, "App: max_payload_bytes", ConfigurationError)
        self._max_payload_bytes = max_payload_bytes
        self._functions: dict[str, FunctionSpec] = {}
        self._store: PostgresStore | None = None
        self._listener: Listener | None = None
        self._done_waiters: dict[uuid.UUID, set[Callable[[], None]]] = {}
        self._rate_limits: dict[str, tuple[int, timedelta]] = {}
        self._schedules: dict[str, Schedule] = {}
        self._hosted: set[_Hosted] = set()
        # Watches the embedded server, when the app uses it (see _embedded.keep).
        self._keeper: asyncio.Task[None] | None = None
        self._embedded_lost: EmbeddedPostgresError | None = None

    # -- registration ---------------------------------------------------------------------------

    def function(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        concurrency: int | Concurrency | None = None,
        rate_limit: str | None = None,
        rate_key: Callable[[Any], object] | None = None,
        timeout: timedelta | None = None,
        start_timeout: timedelta | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
    ) -> Callable[[Fn], Fn]:
        """Register a durable function ``async def f(ctx, input) -> result``.

        The name defaults to ``module.qualname`` and is what runs are stored under, so keep it
        stable across deploys (or pass ``name=``). The rest are defaults for its runs, enforced
        in Postgres across every worker:

        - ``queue``: the worker queue it runs on (``durable worker app:app --queue NAME``).
        - ``priority``: among runnable runs, a higher one is claimed first (``start`` can
          override it per run).
        - ``concurrency``: at most N runs executing at once, or a ``durable.Concurrency`` with a
          per-key limit and a strategy.
        - ``rate_limit``/``rate_key``: each run's start takes one unit of that declared limit
          (``app.rate_limit``), for the key ``rate_key(input)`` when given.
        - ``timeout``: the execution deadline, fixed at the run's first start; a run still
          unfinished then fails with RunTimedOut.
        - ``start_timeout``: a run not started within it fails with RunExpired.
        - ``cron``/``timezone``: start a run (without input) on every tick of this cron
          expression, as ``app.schedule`` does; the schedule is named after the function.
        """
        limit = Concurrency(limit=concurrency) if isinstance(concurrency, int) else concurrency
        if name is not None:
            _limits.name(name, "@app.function: the name", ConfigurationError)
        _limits.name(queue, "@app.function: the queue name", ConfigurationError)
        _limits.priority(priority, "@app.function: the priority", ConfigurationError)
        options = RunOptions(
            queue=queue,
            priority=priority,
            concurrency=limit,
            rate_limit=rate_limit,
            rate_key=rate_key,
            timeout=None
            if timeout is None
            else _setting(timeout, "@app.function: timeout", positive=True),
            start_timeout=(
                None
                if start_timeout is None
                else _setting(start_timeout, "@app.function: start_timeout", positive=True)
            ),
        )

        def register(fn: Fn) -> Fn:
            spec = FunctionSpec.describe(fn, name, options)
            if spec.name in self._functions and self._functions[spec.name].fn is not fn:
                raise ConfigurationError(f"a durable function named {spec.name!r} already exists")
            self._functions[spec.name] = spec
            if cron is not None:
                self._add_schedule(Schedule(spec.name, spec.name, cron, timezone))
            return fn

        return register

    def schedule(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        *,
        cron: str,
        input: Any = None,
        name: str | None = None,
        timezone: str = "UTC",
        catch_up: CatchUp = "latest",
    ) -> None:
        """Start a run of ``fn`` with ``input`` on every tick of ``cron``.

        ``cron`` has five fields (minute hour day-of-month month day-of-week) or six with
        seconds first (``"*/10 * * * * *"``), read in ``timezone`` (daylight saving included).
        Every worker of the app keeps the schedule and each tick starts exactly one run (its
        idempotency key is ``schedule:<name>:<tick>``). After a time with no worker running,
        ``catch_up="latest"`` starts the latest missed tick once; ``"all"`` starts every missed
        tick. ``name`` (default: the function's name) identifies the schedule across deploys::

            app.schedule(send_digest, cron="0 8 * * mon", timezone="Europe/Berlin",
                         input=Digest(kind="weekly"), name="weekly-digest")
        """
        spec = self._spec_for(fn)
        function = spec.name if spec else str(fn)
        if spec is not None and spec.takes_input:
            data = validate_input(spec.input_type, input, f"schedule of {function!r}")
        elif spec is not None and input is not None:
            raise InvalidInput(f"function {function!r} takes no input")
        else:
            data = _json_or_invalid(input, f"schedule of {function!r}", self._max_payload_bytes)
        self._add_schedule(Schedule(name or function, function, cron, timezone, data, catch_up))

    def _add_schedule(self, schedule: Schedule) -> None:
        _limits.name(schedule.name, "app.schedule: the name", ConfigurationError)
        if schedule.name in self._schedules and self._schedules[schedule.name] != schedule:
            raise ConfigurationError(f"a schedule named {schedule.name!r} already exists")
        self._schedules[schedule.name] = schedule

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule stored in the database (of any app), by name."""
        rows, _now = await self._store_or_raise().list_schedules()
        return rows

    def rate_limit(self, name: str, limit: int, period: timedelta) -> None:
        """Declare a rate limit: at most ``limit`` units in any window of length ``period``,
        per key, across every worker.

        Steps consume it (``@durable.step(rate_limit=name, rate_key=..., weight=...)``), as do
        run starts (``@app.function(rate_limit=name)``). The algorithm is a sliding-window log:
        units are granted at the earliest time t (no earlier than now, nor than the latest
        grant) at which the units granted in (t - period, t] plus the new ones stay within
        ``limit``; when t is later than now they are reserved, and the caller waits for them
        without polling. Declarations are written to the database when the app connects and
        when a worker starts (the last to write wins when two apps disagree)."""
        _limits.name(name, "app.rate_limit: the name", ConfigurationError)
        _limits.count(limit, f"app.rate_limit {name!r}: the limit", ConfigurationError)
        self._rate_limits[name] = (
            limit,
            _setting(period, f"app.rate_limit {name!r}: the period", True),
        )

    async def _declare_rate_limits(self, store: PostgresStore) -> None:
        for limit_name, (limit, period) in self._rate_limits.items():
            await store.define_rate_limit(limit_name, limit, period)

    @property
    def functions(self) -> dict[str, FunctionSpec]:
        """The registered functions, by name."""
        return dict(self._functions)

    # -- connection -----------------------------------------------------------------------------

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (starting the embedded Postgres if no URL is set) and apply migrations."""
        if self._store is not None:
            return
        dsn = await self._resolve_url()
        store = await PostgresStore.connect(
            dsn, max_size=self._pool_size, connect_timeout=self._connect_timeout
        )
        try:
            await store.migrate()
            await self._declare_rate_limits(store)
            listener = Listener(store.connect_raw)
            listener.subscribe("durable_done", self._dispatch_done)
            await listener.start()
        except BaseException:
            await store.close()
            await self._stop_keeper()
            raise
        self._store, self._listener = store, listener

    async def close(self) -> None:
        """Stop this app's workers and close its connections."""
        self.stop_workers()
        await self._stop_keeper()  # first: no restart of the server may race the shutdown
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    @property
    def database_url(self) -> str | None:
        """The URL in use once connected (the embedded server's when none was given)."""
        return self._store.dsn if self._store else self._database_url

    async def _resolve_url(self) -> str:
        if self._database_url == "":
            raise ConfigurationError(
                "database_url is empty: pass a postgresql:// URL, or None for "
                "$DURABLE_DATABASE_URL or the embedded PostgreSQL"
            )
        url = self._database_url or os.environ.get("DURABLE_DATABASE_URL")
        if url:
            return _urls.check(url)
        from durable import _embedded

        server = await asyncio.to_thread(_embedded.acquire)
        _embedded.exit_on_sigterm()
        log.info("using embedded PostgreSQL in %s", server.data_dir)
        # It is ours: should it die (a kill -9, an OOM kill), say so once and restart it.
        self._keeper = asyncio.create_task(_embedded.keep(server), name="durable-embedded-keeper")
        self._keeper.add_done_callback(self._keeper_done)
        return server.dsn

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if isinstance(error, EmbeddedPostgresError):
            self._embedded_lost = error
            log.error("%s", error)
            self.stop_workers()

    async def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, EmbeddedPostgresError):
                await keeper

    def _store_or_raise(self) -> PostgresStore:
        if self._store is None:
            raise ConfigurationError(
                "the app is not connected: use `async with app:` or `await app.connect()`"
            )
        return self._store

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
    ) -> RunHandle[Any]:
        """Start a run of ``fn`` (a registered function, or its name) with ``input``.

        The input is validated against the function's annotation here: invalid input raises
        InvalidInput and nothing is stored. With an ``idempotency_key`` (or a ``run_id``) that
        already exists, the existing run is returned instead of starting a second one.
        ``priority`` overrides the function's; ``delay`` (from the database's now) or
        ``start_at`` postpone the run's start.

        With ``connection`` (your own asyncpg connection, in your transaction) the run is
        stored in that transaction: it exists, and a worker sees it, if and only if your
        transaction commits::

            async with conn.transaction():
                await conn.execute("INSERT INTO orders ...")
                await app.start(fulfil, order, connection=conn)
        """
        store = self._store_or_raise()
        spec = self._spec_for(fn)
        new = self._new_run(
            fn,
            spec,
            input,
            run_id,
            idempotency_key,
            priority=priority,
            delay=delay,
            start_at=start_at,
        )
        if connection is not None:
            found, created = await store.start_run_on(connection, new)
        else:
            [(found, created)] = await store.start_runs([new])
        if not created:
            log.info("run %s already exists; returning it", found, extra={"run_id": str(found)})
        return RunHandle(self, found, spec.return_type if spec else _NO_TYPE)

    async def start_many(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        priority: int | None = None,
        connection: asyncpg.Connection[Any] | None = None,
    ) -> list[RunHandle[Any]]:
        """Start one run of ``fn`` per input, in one round trip; handles come back in order.

        Every input is validated before anything is stored, so one invalid input starts none.
        With ``idempotency_keys`` (one per input, distinct, None for none), a key that already
        exists returns the existing run, as ``start`` does::

            handles = await app.start_many(send_invoice, invoices,
                                           idempotency_keys=[f"invoice-{i.id}" for i in invoices])

        With ``connection``, the runs are stored in your transaction, as with ``start``.
        """
        store = self._store_or_raise()
        spec = self._spec_for(fn)
        values = list(inputs)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(values)
        if len(keys) != len(values):
            raise InvalidInput(f"{len(values)} inputs but {len(keys)} idempotency keys")
        given = [k for k in keys if k is not None]
        if len(set(given)) != len(given):
            raise InvalidInput("idempotency keys must be distinct within one start_many call")
        new = [
            self._new_run(fn, spec, v, None, k, priority=priority)
            for v, k in zip(values, keys, strict=True)
        ]
        if connection is not None:
            started = await store.start_runs_on(connection, new)
        else:
            started = await store.start_runs(new)
        return_type = spec.return_type if spec else _NO_TYPE
        return [RunHandle(self, found, return_type) for found, _created in started]

    def _new_run(
        self,
        fn: Callable[..., Awaitable[Any]] | str,
        spec: FunctionSpec | None,
        input: Any,
        run_id: uuid.UUID | str | None,
        idempotency_key: str | None,
        *,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
    ) -> NewRun:
        """A validated run to store, or InvalidInput."""
        name = spec.name if spec else _limits.name(fn, "start: the function name")
        if idempotency_key is not None:
            _limits.key(idempotency_key, f"start {name!r}: the idempotency key")
        if priority is not None:
            _limits.priority(priority, f"start {name!r}: the priority")
        if delay is not None:
            delay = _limits.duration(delay, f"start {name!r}: the delay")
        if start_at is not None:
            start_at = _limits.moment(start_at, f"start {name!r}: start_at")
        if spec is not None:
            if not spec.takes_input and input is not None:
                raise InvalidInput(f"function {name!r} takes no input, got {type(input).__name__}")
            data = (
                validate_input(spec.input_type, input, f"start {name!r}", self._max_payload_bytes)
                if spec.takes_input
                else None
            )
        else:
            data = _json_or_invalid(input, f"start {name!r}", self._max_payload_bytes)
        chosen = _run_id(run_id) if run_id is not None else uuid.uuid4()
        if delay is not None and start_at is not None:
            raise InvalidInput("give delay or start_at, not both")
        if spec is None:
            return NewRun(
                chosen,
                name,
                data,
                idempotency_key,
                current_carrier(),
                priority=priority or 0,
                available_at=start_at,
                delay=delay,
            )
        return spec.new_run(
            data,
            run_id=chosen,
            idempotency_key=idempotency_key,
            trace_context=current_carrier(),
            priority=priority,
            delay=delay,
            start_at=start_at,
        )

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        """A handle on an existing run (its existence is checked when you ask it something).
        A string that is not a UUID raises InvalidInput."""
        return RunHandle(self, _run_id(run_id))

    async def list_runs(self, *, status: str | None = None, limit: int = 50) -> list[RunInfo]:
        """The most recent runs (at most ``limit``, up to 100,000), newest first, optionally of
        one status."""
        _limits.count(limit, "list_runs: the limit", maximum=MAX_LISTED)
        rows = await self._store_or_raise().list_runs(status, limit)
        return [RunInfo.from_row(r) for r in rows]

    async def cancel_run(self, run_id: uuid.UUID | str, reason: str = "cancelled") -> str:
        """Cancel a run and its unfinished child runs (see ``RunHandle.cancel``). Returns
        ``"cancelled"``, ``"requested"`` (running: its worker is ending it), ``"finished"``
        (it had already ended) or ``"not_found"``."""
        _limits.text(reason, "cancel_run: the reason", _MAX_REASON_BYTES)
        return await self._store_or_raise().cancel(_run_id(run_id), reason)

    async def resume_run(self, run_id: uuid.UUID | str) -> bool:
        """Make a paused run (non-determinism) runnable again; False if it was not paused.
        Raises RunNotFound when no run has that id."""
        store = self._store_or_raise()
        found = _run_id(run_id)
        if await store.resume(found):
            return True
        if await store.get_run(found) is None:
            raise RunNotFound(str(found))
        return False

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
        _limits.name(name, "send_event: the event name")
        if key is not None:
            _limits.key(key, "send_event: the event key")
        data = _json_or_invalid(payload, f"event {name!r}", self._max_payload_bytes)
        store = self._store_or_raise()
        if connection is not None:
            return await store.send_event_on(connection, name, key or "", data)
        return await store.send_event(name, key or "", data)

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
        options = WorkerOptions(
            concurrency=concurrency,
            lease=self._lease,
            poll_interval=self._poll_interval,
            short_wait=self._short_wait,
            shutdown_grace=shutdown_grace,
            max_payload_bytes=self._max_payload_bytes,
            **({"worker_id": worker_id} if worker_id else {}),
        )
        hosted = _Hosted()
        self._hosted.add(hosted)
        try:
            if not await hosted.unless_stopped(self.connect()):
                log.info("worker stopped before it connected to the database")
                return
            store, listener = self._store_or_raise(), self._listener
            assert listener is not None
            await self._declare_rate_limits(store)  # those declared after the app connected too
            served = {
                n: s
                for n, s in self._functions.items()
                if s.options.queue in queues and (functions is None or n in functions)
            }
            worker = Worker(store, served, listener, options, registry=self._functions)
            scheduler = Scheduler(
                store,
                list(self._schedules.values()),
                self._functions,
                poll_interval=self._poll_interval,
            )
            await hosted.serve(worker, scheduler)
        finally:
            self._hosted.discard(hosted)
        if self._embedded_lost is not None:  # the embedded server died for good
            raise self._embedded_lost

    def stop_workers(self) -> None:
        """Ask this app's workers to finish their runs (within the grace period) and return;
        a ``run_worker`` still connecting returns at once."""
        for hosted in list(self._hosted):
            hosted.stop()

    # -- internals used by RunHandle ------------------------------------------------------------

    def _spec_for(self, fn: Callable[..., Awaitable[Any]] | str) -> FunctionSpec | None:
        if isinstance(fn, str):
            return self._functions.get(fn)
        for spec in self._functions.values():
            if spec.fn is fn:
                return spec
        raise ConfigurationError(
            f"{getattr(fn, '__qualname__', fn)!r} is not registered with this app; decorate it "
            f"with @app.function() (or pass the function's name as a string)"
        )

    def _return_type_of(self, function: str) -> Any:
        spec = self._functions.get(function)
        return spec.return_type if spec else _NO_TYPE

    def _on_done(self, run_id: uuid.UUID, callback: Callable[[], None]) -> Callable[[], None]:
        self._done_waiters.setdefault(run_id, set()).add(callback)

        def unsubscribe() -> None:
            waiters = self._done_waiters.get(run_id)
            if waiters is not None:
                waiters.discard(callback)
                if not waiters:
                    del self._done_waiters[run_id]

        return unsubscribe

    def _dispatch_done(self, payload: str) -> None:
        if not payload:
            targets = [cb for cbs in self._done_waiters.values() for cb in cbs]
        else:
            try:
                targets = list(self._done_waiters.get(uuid.UUID(payload), ()))
            except ValueError:
                return
        for callback in targets:
            callback()


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

    async def serve(self, worker: Worker, scheduler: Scheduler) -> None:
        self.worker = worker
        if self.stopped.is_set():
            return
        ticking = asyncio.create_task(scheduler.run())
        try:
            await worker.run()
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking


def _json_or_invalid(value: Any, what: str, max_bytes: int | None) -> Any:
    try:
        return dump(Any, value, what, max_bytes)
    except SerializationError as exc:
        raise InvalidInput(str(exc)) from exc


def _run_id(value: uuid.UUID | str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise InvalidInput(f"not a run id (a UUID): {str(value)[:60]!r}") from None


_MAX_REASON_BYTES = 4096
MAX_LISTED = 100_000


def _setting(value: object, what: str, positive: bool = False) -> timedelta:
    """A duration setting (never negative; with ``positive``, more than zero), or
    ConfigurationError."""
    return _limits.duration(
        value, what, error=ConfigurationError, negative=False, zero=not positive
    )
