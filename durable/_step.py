"""``@durable.step``: per-step defaults (retries, backoff, timeout) attached to a function."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, overload

from engine import POLICY_ATTRIBUTE, Backoff, StepPolicy

F = TypeVar("F", bound=Callable[..., Any])


@overload
def step(fn: F, /) -> F: ...


@overload
def step(
    *,
    retries: int = 0,
    backoff: Backoff | None = None,
    timeout: timedelta | float | None = None,
) -> Callable[[F], F]: ...


def step(
    fn: Any = None,
    /,
    *,
    retries: int = 0,
    backoff: Backoff | None = None,
    timeout: timedelta | float | None = None,
) -> Any:
    """Give a step function its defaults for ``ctx.step``::

        @durable.step(retries=3, backoff=durable.Backoff(initial=timedelta(seconds=2)),
                      timeout=timedelta(seconds=30))
        async def charge(card: str, cents: int) -> Receipt: ...

    ``retries`` is how many more attempts follow a failed first one (default 0). Each attempt is
    bounded by ``timeout`` when given (a sync function running in a thread is not interrupted;
    its attempt is counted as failed). The function stays an ordinary callable.
    """
    if timeout is not None and not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    policy = StepPolicy(retries=retries, backoff=backoff or Backoff(), timeout=timeout)

    def attach(target: F) -> F:
        try:
            setattr(target, POLICY_ATTRIBUTE, policy)
            return target
        except (AttributeError, TypeError):
            wrapper = functools.wraps(target)(lambda *a, **k: target(*a, **k))
            setattr(wrapper, POLICY_ATTRIBUTE, policy)
            return wrapper  # type: ignore[return-value]

    return attach(fn) if fn is not None else attach
