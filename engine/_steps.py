"""A step's body, run live: its rate-limit budget, its retries with backoff, its timeout, its
trace span, and the record of its tries that the journal keeps (``Context.step`` calls these)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

from engine import _metrics, _tracing
from engine._records import StepTiming
from engine._registry import StepPolicy
from engine._run_state import RunState
from engine.errors import ErrorInfo

log = logging.getLogger("engine._context")
_NOTHING = contextlib.nullcontext()


async def take_budget(
    state: RunState,
    position: str,
    attempt: int,
    policy: StepPolicy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Take the step's units of its rate limit for this attempt. When the window is full the
    store reserves them for a later time: wait until then, in memory for a retry (live work),
    otherwise as a timer that suspends the run when the wait is not short, and collect them.
    The holder names the run, the position and the attempt, so a run resumed by replay collects
    its reservation instead of taking more."""
    assert policy.rate_limit is not None
    key = policy.budget_key(args, kwargs)
    holder = f"{state.run_id}/{position}/{attempt}"
    while True:
        state.check_alive()
        retry = await state.db(state.store.take_rate(policy.rate_limit, key, policy.weight, holder))
        if retry is None:
            return
        log.debug(
            "run %s: rate limit %r (key %r) has no budget until %s",
            state.run_id,
            policy.rate_limit,
            key,
            retry,
            extra={"run_id": str(state.run_id)},
        )
        if attempt > 1:  # a retry is live work: the run cannot suspend
            await state.db_time.sleep_until(retry)
        else:
            await state.block(retry)


def timing(tries: list[tuple[datetime, float, str | None]]) -> StepTiming:
    """What the journal keeps of a step's tries: the last one's start and duration, and the
    failed ones before it (their errors cut to 500 characters)."""
    started_at, ms, _error = tries[-1]
    failed = tuple(
        {"at": at.isoformat(), "ms": took, "error": (error or "")[:500]}
        for at, took, error in tries[:-1]
    )
    return StepTiming(started_at, ms, failed)


async def execute_step(
    state: RunState,
    position: str,
    name: str,
    fn: Callable[..., Any],
    policy: StepPolicy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    tries: list[tuple[datetime, float, str | None]],
) -> tuple[Any, ErrorInfo | None]:
    """Run a step body with its retry policy; returns (result, None) or (None, failure), and
    appends to ``tries`` when each try began (the database's time), how long it ran and how
    it failed: what the journal keeps of it as the entry's timing."""
    timeout = policy.timeout.total_seconds() if policy.timeout else None
    attempt = 0
    while True:
        attempt += 1
        state.check_alive()
        began, started = state.db_time.now(), time.perf_counter()
        failure: ErrorInfo | None = None
        # No span and no timeout to set up when neither is asked for: a step's own overhead.
        span = (
            _tracing.step_span(state.run_id, state.function, name, position, attempt)
            if state.traced
            else _NOTHING
        )
        with span:
            try:
                async with asyncio.timeout(timeout) if timeout is not None else _NOTHING:
                    if inspect.iscoroutinefunction(fn):
                        result = await fn(*args, **kwargs)
                    else:
                        result = await state.in_thread(fn, args, kwargs)
                        if inspect.isawaitable(result):
                            result = await result
            except Exception as exc:
                if isinstance(exc, TimeoutError) and timeout is not None:
                    exc = TimeoutError(f"step {name!r} timed out after {timeout}s")
                failure = ErrorInfo.from_exception(exc, traceback.format_exc())
        took = time.perf_counter() - started
        ms = round(took * 1000, 3)
        outcome = {"function": state.function, "outcome": "ok" if failure is None else "failed"}
        _metrics.step_duration.record(took, outcome)
        tries.append((began, ms, None if failure is None else f"{failure.type}: {failure.message}"))
        if failure is None:
            return result, None
        if attempt > policy.retries:
            return None, failure
        delay = policy.backoff.delay(attempt, state.rng)
        log.info(
            "run %s: step %r attempt %d failed (%s: %s); retrying in %.2fs",
            state.run_id,
            name,
            attempt,
            failure.type,
            failure.message,
            delay,
            extra={"run_id": str(state.run_id)},
        )
        await state.db_time.sleep(delay)
        if policy.rate_limit is not None:
            await take_budget(state, position, attempt + 1, policy, args, kwargs)
