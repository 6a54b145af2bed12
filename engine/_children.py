"""Child runs: ``Context.start`` and ``Context.run`` start a run of another durable function
from inside a run, and ``ChildRun.result`` waits for it durably.

A child's id is derived from its parent and the journal position that starts it, and the start
is journaled in the same transaction as the child is stored, so a parent re-executed after a
crash finds its children instead of starting them twice. Waiting for a child registers a wait
and suspends the parent; the child's end wakes it, and its outcome is journaled (``join``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

from engine import _codec, _tracing
from engine._records import FINAL_STATUSES
from engine._registry import FunctionSpec
from engine._run_state import RunState
from engine.errors import ConfigurationError, ErrorInfo, RunCancelled, RunFailed

T = TypeVar("T")


class ChildRun(Generic[T]):
    """A child run started with ``ctx.start``; ``await child.result()`` waits for it durably
    (the parent is suspended meanwhile and holds no worker slot)."""

    def __init__(self, state: RunState, run_id: uuid.UUID, spec: FunctionSpec) -> None:
        self._state = state
        self.run_id = run_id
        self.function = spec.name
        self._return_type = spec.return_type

    def __repr__(self) -> str:
        return f"ChildRun({self.function!r}, {self.run_id})"

    async def result(self) -> T:
        """The child's result. Raises RunFailed when it failed and RunCancelled when it was
        cancelled, identically on replay."""
        state = self._state
        position = state.next_position()
        entry = state.recorded(position, "join", self.function)
        value = entry.value if entry is not None else await self._join(position)
        status, error = value["status"], value.get("error")
        if status == "completed":
            loaded: T = _codec.load(self._return_type, value.get("result"))
            return loaded
        info = ErrorInfo.from_json(error)
        if status == "cancelled":
            raise RunCancelled(str(self.run_id), info)
        raise RunFailed(str(self.run_id), info)

    async def _join(self, position: str) -> dict[str, Any]:
        state = self._state
        await state.checkpoint("before", position, "join", self.function)
        while True:
            state.check_alive()
            snapshot = await state.child_snapshot()
            known = snapshot.status.get(self.run_id)
            if (
                known is not None
                and known not in FINAL_STATUSES
                and position in snapshot.waiting_at
            ):
                await state.block(None)
                continue
            found = await state.db(
                state.store.await_child(
                    state.run_id, state.attempt, position, self.function, self.run_id
                )
            )
            state.fence(found.outcome != "fenced")
            if found.outcome == "done":
                value = {
                    "run_id": str(self.run_id),
                    "status": found.status,
                    "result": found.result,
                    "error": found.error,
                }
                state.remember(position, "join", self.function, value, None)
                await state.checkpoint("journaled", position, "join", self.function)
                return value
            snapshot.waiting_at.add(position)
            await state.block(None)


def spec_of(state: RunState, fn: Callable[..., Awaitable[Any]] | str) -> FunctionSpec:
    """The registered function ``fn`` (a function or its name), or ConfigurationError."""
    if isinstance(fn, str):
        spec = state.functions.get(fn)
    else:
        spec = next((s for s in state.functions.values() if s.fn is fn), None)
    if spec is None:
        raise ConfigurationError(
            f"{getattr(fn, '__qualname__', fn)!r} is not a durable function of this app; "
            f"register it with @app.function() to start it as a child run"
        )
    return spec


async def start_child(
    state: RunState,
    spec: FunctionSpec,
    input: Any,
    *,
    priority: int | None,
    delay: timedelta | None,
) -> ChildRun[Any]:
    position = state.next_position()
    entry = state.recorded(position, "start", spec.name)
    if entry is not None:
        return ChildRun(state, uuid.UUID(entry.value["run_id"]), spec)
    await state.checkpoint("before", position, "start", spec.name)
    what = f"run {state.run_id}: child {spec.name!r} at position {position}"
    if spec.takes_input:
        data = _codec.validate_input(spec.input_type, input, what, state.max_payload_bytes)
    elif input is not None:
        raise ConfigurationError(f"{what}: {spec.name!r} takes no input")
    else:
        data = None
    child_id = uuid.uuid5(state.run_id, position)
    new = spec.new_run(
        data,
        run_id=child_id,
        trace_context=_tracing.current_carrier(),
        priority=priority,
        delay=delay,
        parent_id=state.run_id,
    )
    written = await state.db(state.store.start_child(state.run_id, state.attempt, position, new))
    state.fence(written)
    state.remember(position, "start", spec.name, {"run_id": str(child_id)}, None)
    await state.checkpoint("journaled", position, "start", spec.name)
    return ChildRun(state, child_id, spec)
