"""``Declarations``: what an app declares, with no database in sight: its durable functions
(and each one's run options), its cron schedules and its rate limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal, TypeVar

from durable._settings import json_or_invalid, setting
from durable._settings import retention as _retention
from engine import (
    CatchUp,
    Concurrency,
    FunctionSpec,
    RunOptions,
    Schedule,
    _limits,
    validate_input,
)
from engine._records import Versioning
from engine.errors import ConfigurationError, InvalidInput

Fn = TypeVar("Fn", bound=Callable[..., Awaitable[Any]])


class Declarations:
    """The functions, schedules and rate limits of an app (``App`` is one).

    ``max_payload_bytes`` bounds a schedule's input, as it bounds every value the app stores.
    ``version``, when given, names the code of every function (else each function's own source
    names it: see ``FunctionSpec``).
    """

    def __init__(
        self,
        max_payload_bytes: int | None,
        version: str | None = None,
        retention: timedelta | None = None,
    ) -> None:
        self._payload_limit = max_payload_bytes
        self._version = version
        self._retention = retention
        self._functions: dict[str, FunctionSpec] = {}
        self._schedules: dict[str, Schedule] = {}
        self._rate_limits: dict[str, tuple[int, timedelta]] = {}

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
        versioning: Versioning = "replay",
        retention: timedelta | Literal["forever"] | None = None,
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
        - ``versioning``: ``"replay"`` (the default) lets any worker resume a run, replaying its
          journal on the code it has (checked: a mismatch pauses the run); ``"pinned"`` lets
          only workers of the version the run started on claim it, so old and new workers run
          side by side until the old runs drain (``durable versions`` shows them).
        - ``retention``: how long its finished runs are kept, instead of the app's
          ``retention``; ``"forever"`` keeps them however the app's is set.
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
            timeout=None if timeout is None else setting(timeout, "@app.function: timeout", True),
            start_timeout=(
                None
                if start_timeout is None
                else setting(start_timeout, "@app.function: start_timeout", True)
            ),
            versioning=versioning,
            retention=self._retention_of(retention),
        )

        def register(fn: Fn) -> Fn:
            spec = FunctionSpec.describe(fn, name, options, self._version)
            if spec.name in self._functions and self._functions[spec.name].fn is not fn:
                raise ConfigurationError(f"a durable function named {spec.name!r} already exists")
            self._functions[spec.name] = spec
            if cron is not None:
                self._add_schedule(Schedule(spec.name, spec.name, cron, timezone))
            return fn

        return register

    @property
    def retention(self) -> timedelta | None:
        """How long finished runs of functions without a retention of their own are kept, and
        the events this app sends (None: for ever)."""
        return self._retention

    @property
    def retentions(self) -> list[timedelta | None]:
        """The retention classes this app starts runs and sends events in."""
        return [self._retention, *(f.options.retention for f in self._functions.values())]

    def _retention_of(self, given: timedelta | str | None) -> timedelta | None:
        if given is None:
            return self._retention
        if given == "forever":
            return None
        return _retention(given, "@app.function: retention")

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
        spec = self.spec_for(fn)
        function = spec.name if spec else str(fn)
        what = f"schedule of {function!r}"
        if spec is not None and spec.takes_input:
            data = validate_input(spec.input_type, input, what, self._payload_limit)
        elif spec is not None and input is not None:
            raise InvalidInput(f"function {function!r} takes no input")
        else:
            data = json_or_invalid(input, what, self._payload_limit)
        self._add_schedule(Schedule(name or function, function, cron, timezone, data, catch_up))

    def _add_schedule(self, schedule: Schedule) -> None:
        _limits.name(schedule.name, "app.schedule: the name", ConfigurationError)
        if schedule.name in self._schedules and self._schedules[schedule.name] != schedule:
            raise ConfigurationError(f"a schedule named {schedule.name!r} already exists")
        self._schedules[schedule.name] = schedule

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
        period = setting(period, f"app.rate_limit {name!r}: the period", positive=True)
        self._rate_limits[name] = (limit, period)

    @property
    def functions(self) -> dict[str, FunctionSpec]:
        """The registered functions, by name."""
        return dict(self._functions)

    @property
    def schedules(self) -> list[Schedule]:
        """The declared schedules."""
        return list(self._schedules.values())

    @property
    def rate_limits(self) -> dict[str, tuple[int, timedelta]]:
        """The declared rate limits: name → (limit, period)."""
        return dict(self._rate_limits)

    def spec_for(self, fn: Callable[..., Awaitable[Any]] | str) -> FunctionSpec | None:
        """The registration of ``fn`` (a registered function, or a name: None when no function
        of this app has it). A function that is not registered is a ConfigurationError."""
        if isinstance(fn, str):
            return self._functions.get(fn)
        for spec in self._functions.values():
            if spec.fn is fn:
                return spec
        raise ConfigurationError(
            f"{getattr(fn, '__qualname__', fn)!r} is not registered with this app; decorate it "
            f"with @app.function() (or pass the function's name as a string)"
        )
