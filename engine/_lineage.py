"""Deterministic journal positions for concurrent code.

A single counter shared by all the branches of an ``asyncio.gather`` would hand out positions in
completion order, which differs between the first execution and a replay. Instead every asyncio
task created inside a run gets a lineage from its parent, in creation order (which deterministic
code repeats exactly), and positions count calls within one task: "3" is the fourth call of the
run's own task, "1:0" the first call of its second child task, "1.0:2" the third call of that
child's first child. A task factory installed on the loop hands out the lineages.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, Protocol


class TaskOwner(Protocol):
    def track(self, task: asyncio.Task[Any]) -> None: ...


class Node:
    """One task's place in its run: its lineage and its call and child counters."""

    __slots__ = ("calls", "children", "lineage", "owner")

    def __init__(self, owner: TaskOwner, lineage: str = "") -> None:
        self.owner = owner
        self.lineage = lineage
        self.calls = 0
        self.children = 0

    def next_position(self) -> str:
        position = self.peek_position()
        self.calls += 1
        return position

    def peek_position(self) -> str:
        """The position the task's next call will take, without taking it."""
        n = self.calls
        return f"{self.lineage}:{n}" if self.lineage else str(n)

    def child(self) -> Node:
        k = self.children
        self.children += 1
        return Node(self.owner, f"{self.lineage}.{k}" if self.lineage else str(k))


_node: contextvars.ContextVar[Node | None] = contextvars.ContextVar("durable_node", default=None)


def current() -> Node | None:
    """The node of the running task, when it belongs to a run."""
    return _node.get()


def root_context(owner: TaskOwner) -> contextvars.Context:
    """A context for a run's own task."""
    context = contextvars.copy_context()
    context.run(_node.set, Node(owner))
    return context


def detach() -> contextvars.Token[Node | None]:
    """Until ``reattach`` is given the token, tasks the current task creates (a driver's, a
    step body's) take no lineage, so live I/O cannot shift the positions that replay must
    reproduce (``RunState.live`` holds the two calls)."""
    return _node.set(None)


def reattach(token: contextvars.Token[Node | None]) -> None:
    _node.reset(token)


def detached_context() -> contextvars.Context:
    """A context for engine tasks that must not take a lineage from the run around them."""
    context = contextvars.copy_context()
    context.run(_node.set, None)
    return context


_Coro = Coroutine[Any, Any, Any] | Generator[Any, None, Any]


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Install the lineage task factory on ``loop``, keeping any factory already there."""
    previous = loop.get_task_factory()
    if getattr(previous, "durable_lineage", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: _Coro, **kwargs: Any) -> asyncio.Future[Any]:
        node = _node.get() if kwargs.get("context") is None else None
        if node is not None:
            context = contextvars.copy_context()
            context.run(_node.set, node.child())
            kwargs["context"] = context
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if node is not None and isinstance(task, asyncio.Task):
            node.owner.track(task)
        return task

    factory.durable_lineage = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)
