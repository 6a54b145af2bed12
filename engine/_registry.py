"""What the engine knows of a registered durable function (its run options: queue, priority,
concurrency, rate limit, timeouts) and of a step's policy (retries, timeout, rate limit)."""

from __future__ import annotations

import ast
import hashlib
import inspect
import random
import textwrap
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from engine import _limits
from engine._codec import load, return_type
from engine._records import NewRun, Strategy, Versioning
from engine.errors import ConfigurationError, InvalidInput

POLICY_ATTRIBUTE = "__durable_step_policy__"


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): ``initial * factor**(n-1)``, capped at ``maximum``,
    then scaled by a random factor in [1 - jitter, 1 + jitter]."""

    initial: timedelta = timedelta(seconds=1)
    factor: float = 2.0
    maximum: timedelta = timedelta(minutes=1)
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for what in ("initial", "maximum"):
            _limits.duration(
                getattr(self, what), f"Backoff: {what}", error=ConfigurationError, negative=False
            )
        if not (isinstance(self.factor, int | float) and 1 <= self.factor <= 100):
            raise ConfigurationError(f"Backoff: factor must be from 1 to 100, got {self.factor!r}")
        if not (isinstance(self.jitter, int | float) and 0 <= self.jitter <= 1):
            raise ConfigurationError(f"Backoff: jitter must be from 0 to 1, got {self.jitter!r}")

    def delay(self, retry: int, rng: random.Random) -> float:
        base = min(
            self.initial.total_seconds() * self.factor ** (retry - 1),
            self.maximum.total_seconds(),
        )
        return base * (1 + self.jitter * (2 * rng.random() - 1))


@dataclass(frozen=True)
class StepPolicy:
    """How a step is retried: ``retries`` more attempts after the first, each bounded by
    ``timeout`` when given. With ``rate_limit``, each attempt first takes ``weight`` units of
    that limit's budget for ``rate_key`` (a string, or a function of the step's arguments)."""

    retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    timeout: timedelta | None = None
    rate_limit: str | None = None
    rate_key: str | Callable[..., object] | None = None
    weight: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigurationError(
                f"durable.step: retries must be an integer >= 0, got {self.retries!r}"
            )
        _limits.count(self.weight, "durable.step: the rate limit weight", ConfigurationError)
        if self.timeout is not None:
            _limits.duration(
                self.timeout,
                "durable.step: timeout",
                error=ConfigurationError,
                negative=False,
                zero=False,
            )
        if self.rate_limit is not None:
            _limits.name(self.rate_limit, "durable.step: the rate limit name", ConfigurationError)
        if isinstance(self.rate_key, str):
            _limits.key(self.rate_key, "durable.step: the rate key", ConfigurationError)

    def budget_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The rate limit key this call of the step draws from."""
        if callable(self.rate_key):
            return _limits.key(str(self.rate_key(*args, **kwargs)), "ctx.step: the rate key")
        return self.rate_key or ""


DEFAULT_POLICY = StepPolicy()


def policy_of(fn: Callable[..., Any]) -> StepPolicy:
    policy = getattr(fn, POLICY_ATTRIBUTE, None)
    return policy if isinstance(policy, StepPolicy) else DEFAULT_POLICY


_NO_INPUT: Any = object()
_STRATEGIES = ("queue", "cancel_in_progress", "cancel_newest")


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` runs of a function at once, across every worker; with ``key`` (a
    function of the run's input), at most ``limit`` per key.

    ``strategy`` says what a new run does when its key is full: ``"queue"`` (wait for a slot;
    keys are served in turn, so a busy key cannot starve the others), ``"cancel_in_progress"``
    (the newest run wins: the oldest are cancelled) or ``"cancel_newest"`` (the running ones win:
    the new run is cancelled). A suspended run (sleeping, waiting) gives its slot back unless
    ``hold_while_suspended``."""

    limit: int
    key: Callable[[Any], object] | None = None
    strategy: str = "queue"
    hold_while_suspended: bool = False

    def __post_init__(self) -> None:
        _limits.count(self.limit, "Concurrency: the limit", ConfigurationError)
        strategy = self.strategy.replace("-", "_")
        if strategy not in _STRATEGIES:
            raise ConfigurationError(
                f"unknown concurrency strategy {self.strategy!r}; use one of {_STRATEGIES}"
            )
        object.__setattr__(self, "strategy", strategy)


@dataclass(frozen=True)
class RunOptions:
    """What every run of a function gets unless its start says otherwise."""

    queue: str = "default"
    priority: int = 0
    concurrency: Concurrency | None = None
    rate_limit: str | None = None
    rate_key: Callable[[Any], object] | None = None
    timeout: timedelta | None = None
    start_timeout: timedelta | None = None
    versioning: Versioning = "replay"
    retention: timedelta | None = None

    def __post_init__(self) -> None:
        if self.versioning not in ("replay", "pinned"):
            raise ConfigurationError(
                f"@app.function: versioning must be 'replay' or 'pinned', got {self.versioning!r}"
            )


@dataclass(frozen=True)
class FunctionSpec:
    """A registered durable function: ``fn(ctx)`` or ``fn(ctx, input)``.

    ``version`` names its code: the app's ``version`` when given, else a digest of the
    function's own source (its syntax tree: comments and layout do not count), so an unchanged
    function keeps its version across deploys and a changed one gets another."""

    name: str
    fn: Callable[..., Awaitable[Any]]
    input_type: Any
    return_type: Any
    options: RunOptions = field(default_factory=RunOptions)
    version: str = ""

    @property
    def takes_input(self) -> bool:
        return self.input_type is not _NO_INPUT

    def new_run(
        self,
        data: Any,
        *,
        run_id: uuid.UUID | None,
        idempotency_key: str | None = None,
        trace_context: dict[str, str] | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
        parent_id: uuid.UUID | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> NewRun:
        """A run of this function with ``data`` (its input as stored), with the function's
        options; ``priority``, ``delay`` and ``start_at`` override them for this run. With no
        ``run_id``, the run is fresh: its id a new random one."""
        options = self.options
        concurrency = options.concurrency
        key = None
        if concurrency is not None:
            key = self.name
            if concurrency.key is not None:
                key = f"{self.name}:{self._key(concurrency.key, data, 'concurrency')}"
        rate_key = ""
        if options.rate_limit is not None and options.rate_key is not None:
            rate_key = self._key(options.rate_key, data, "rate limit")
        return NewRun(
            run_id=uuid.uuid4() if run_id is None else run_id,
            function=self.name,
            input=data,
            idempotency_key=idempotency_key,
            trace_context=trace_context,
            priority=options.priority if priority is None else priority,
            available_at=start_at,
            delay=delay,
            start_timeout=options.start_timeout,
            run_timeout=options.timeout,
            parent_id=parent_id,
            concurrency_key=key,
            concurrency_limit=None if concurrency is None else concurrency.limit,
            strategy=cast(Strategy, "queue" if concurrency is None else concurrency.strategy),
            slot_while_suspended=concurrency is not None and concurrency.hold_while_suspended,
            rate_limit=options.rate_limit,
            rate_key=rate_key,
            tags=tags,
            queue=options.queue,
            retention=options.retention,
            fresh=run_id is None,
        )

    def _key(self, key: Callable[[Any], object], data: Any, what: str) -> str:
        """A key function's value for the run's input (as the function receives it)."""
        try:
            found = str(key(load(self.input_type, data) if self.takes_input else None))
        except Exception as exc:
            raise InvalidInput(
                f"the {what} key of {self.name!r} failed on this input: {type(exc).__name__}: {exc}"
            ) from exc
        return _limits.key(found, f"start {self.name!r}: the {what} key")

    @classmethod
    def describe(
        cls,
        fn: Callable[..., Awaitable[Any]],
        name: str | None,
        options: RunOptions | None = None,
        version: str | None = None,
    ) -> FunctionSpec:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"{fn!r} is not an async function: a durable function is `async def f(ctx, ...)`"
            )
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional or len(positional) > 2 or len(params) != len(positional):
            raise ConfigurationError(
                f"durable function {fn.__qualname__} must take `ctx` and at most one input, "
                f"got ({', '.join(p.name for p in params)})"
            )
        input_type: Any = _NO_INPUT
        if len(positional) == 2:
            try:
                hints = typing.get_type_hints(fn)
            except NameError as exc:
                raise ConfigurationError(
                    f"cannot resolve the annotations of durable function {fn.__qualname__} "
                    f"({exc}); define the types it uses at module level"
                ) from exc
            input_type = hints.get(positional[1].name, Any)
        return cls(
            name=name or f"{fn.__module__}.{fn.__qualname__}",
            fn=fn,
            input_type=input_type,
            return_type=return_type(fn),
            options=options or RunOptions(),
            version=version or code_version(fn),
        )


def code_version(fn: Callable[..., Any]) -> str:
    """A digest of ``fn``'s source as a syntax tree (comments, blank lines and indentation do
    not count), or of its bytecode when its source cannot be read (a function made by exec)."""
    target = inspect.unwrap(fn)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
        text = ast.dump(tree, annotate_fields=False)
    except (OSError, TypeError, SyntaxError):
        code = getattr(target, "__code__", None)
        text = _bytecode(code) if isinstance(code, types.CodeType) else repr(target)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _bytecode(code: types.CodeType) -> str:
    """``code`` as text that is the same for the same code compiled again (a nested function's
    code object is spelled out, not shown with its address)."""
    consts = [_bytecode(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names, code.co_varnames))


@dataclass(frozen=True)
class CodeVersions:
    """What a worker tells a claim about its code: its functions, the version of each (aligned),
    and those declared ``versioning="pinned"``."""

    names: list[str]
    versions: list[str]
    pinned: list[str]

    @classmethod
    def of(cls, functions: Mapping[str, FunctionSpec]) -> CodeVersions:
        specs = list(functions.values())
        return cls(
            [s.name for s in specs],
            [s.version for s in specs],
            [s.name for s in specs if s.options.versioning == "pinned"],
        )

    def of_one(self, function: str) -> CodeVersions:
        """What a claim of a run of ``function`` alone needs to know: its entry, if any.
        asyncpg checks every element of an array it sends, so an eager start sends one
        function's entry rather than the whole worker's."""
        if function not in self.names:
            return CodeVersions([], [], [])
        at = self.names.index(function)
        pinned = [function] if function in self.pinned else []
        return CodeVersions([function], [self.versions[at]], pinned)


def new_run(
    functions: Mapping[str, FunctionSpec],
    function: str,
    data: Any,
    *,
    run_id: uuid.UUID | None,
    idempotency_key: str | None = None,
    trace_context: dict[str, str] | None = None,
    priority: int | None = None,
    delay: timedelta | None = None,
    start_at: datetime | None = None,
    tags: Mapping[str, str] | None = None,
    retention: timedelta | None = None,
) -> NewRun:
    """The one way to build a run to store: ``function`` with ``data`` (its input as stored),
    with the function's options when ``functions`` registers it (``FunctionSpec.new_run``),
    else with none but ``retention`` (a function that another app's workers serve)."""
    spec = functions.get(function)
    if spec is not None:
        return spec.new_run(
            data,
            run_id=run_id,
            idempotency_key=idempotency_key,
            trace_context=trace_context,
            priority=priority,
            delay=delay,
            start_at=start_at,
            tags=tags,
        )
    return NewRun(
        uuid.uuid4() if run_id is None else run_id,
        function,
        data,
        idempotency_key,
        trace_context,
        priority=priority or 0,
        available_at=start_at,
        delay=delay,
        tags=tags,
        retention=retention,
        fresh=run_id is None,
    )
