"""``@durable.step``: per-step defaults (retries, backoff, timeout, rate limit) attached to a
function."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, overload

from engine import POLICY_ATTRIBUTE, Backoff, StepPolicy, _limits
from engine.errors import ConfigurationError

F = TypeVar("F", bound=Callable[..., Any])


@overload
def step(fn: F, /) -> F: ...


@overload
def step(
    *,
    retries: int = 0,
    backoff: Backoff | None = None,
    timeout: timedelta | float | None = None,
    rate_limit: str | None = None,
    rate_key: str | Callable[..., object] | None = None,
    weight: int = 1,
) -> Callable[[F], F]: ...


def step(
    fn: Any = None,
    /,
    *,
    retries: int = 0,
    backoff: Backoff | None = None,
    timeout: timedelta | float | None = None,
    rate_limit: str | None = None,
    rate_key: str | Callable[..., object] | None = None,
    weight: int = 1,
) -> Any:
    """Give a step function its defaults for ``ctx.step``::

        @durable.step(retries=3, backoff=durable.Backoff(initial=timedelta(seconds=2)),
                      timeout=timedelta(seconds=30))
        async def charge(card: str, cents: int) -> Receipt: ...

    ``retries`` is how many more attempts follow a failed first one (default 0). Each attempt is
    bounded by ``timeout`` when given (a sync function running in a thread is not interrupted;
    its attempt is counted as failed). The function stays an ordinary callable.

    With ``rate_limit`` (a limit declared with ``app.rate_limit``), every attempt first takes
    ``weight`` units of its budget for ``rate_key``: a string, or a function of the step's
    arguments (``rate_key=lambda tenant, prompt: tenant`` for a per-tenant budget). A step that
    must wait for budget waits without polling; a wait longer than the app's ``short_wait``
    suspends the run until the budget is there::

        @durable.step(rate_limit="openai", retries=2)
        async def complete(prompt: str) -> str: ...
    """
    if timeout is not None:
        timeout = _limits.duration(timeout, "durable.step: timeout", error=ConfigurationError)
    policy = StepPolicy(
        retries=retries,
        backoff=backoff or Backoff(),
        timeout=timeout,
        rate_limit=rate_limit,
        rate_key=rate_key,
        weight=weight,
    )

    def attach(target: F) -> F:
        try:
            setattr(target, POLICY_ATTRIBUTE, policy)
            return target
        except (AttributeError, TypeError):
            wrapper = functools.wraps(target)(lambda *a, **k: target(*a, **k))
            setattr(wrapper, POLICY_ATTRIBUTE, policy)
            return wrapper  # type: ignore[return-value]

    return attach(fn) if fn is not None else attach
