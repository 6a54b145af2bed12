"""What the engine knows of a registered durable function and of a step's retry policy."""

from __future__ import annotations

import inspect
import random
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from engine._codec import return_type
from engine.errors import ConfigurationError

POLICY_ATTRIBUTE = "__durable_step_policy__"


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): ``initial * factor**(n-1)``, capped at ``maximum``,
    then scaled by a random factor in [1 - jitter, 1 + jitter]."""

    initial: timedelta = timedelta(seconds=1)
    factor: float = 2.0
    maximum: timedelta = timedelta(minutes=1)
    jitter: float = 0.2

    def delay(self, retry: int, rng: random.Random) -> float:
        base = min(
            self.initial.total_seconds() * self.factor ** (retry - 1),
            self.maximum.total_seconds(),
        )
        return base * (1 + self.jitter * (2 * rng.random() - 1))


@dataclass(frozen=True)
class StepPolicy:
    """How a step is retried: ``retries`` more attempts after the first, each bounded by
    ``timeout`` when given."""

    retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    timeout: timedelta | None = None

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigurationError(f"retries must be >= 0, got {self.retries}")


DEFAULT_POLICY = StepPolicy()


def policy_of(fn: Callable[..., Any]) -> StepPolicy:
    policy = getattr(fn, POLICY_ATTRIBUTE, None)
    return policy if isinstance(policy, StepPolicy) else DEFAULT_POLICY


_NO_INPUT: Any = object()


@dataclass(frozen=True)
class FunctionSpec:
    """A registered durable function: ``fn(ctx)`` or ``fn(ctx, input)``."""

    name: str
    fn: Callable[..., Awaitable[Any]]
    input_type: Any
    return_type: Any

    @property
    def takes_input(self) -> bool:
        return self.input_type is not _NO_INPUT

    @classmethod
    def describe(cls, fn: Callable[..., Awaitable[Any]], name: str | None) -> FunctionSpec:
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
        )
