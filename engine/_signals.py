"""Control-flow signals that unwind a run. They are not errors.

Both derive from ``BaseException`` so that ``except Exception`` in user code cannot swallow them,
and neither can be constructed outside the engine.
"""

from __future__ import annotations

_TOKEN = object()


class _Signal(BaseException):
    def __init__(self, token: object, reason: str) -> None:
        if token is not _TOKEN:
            raise TypeError(f"{type(self).__name__} is raised by the durable engine only")
        super().__init__(reason)


class Suspend(_Signal):
    """The run is blocked on a timer or an event: drop the coroutine, resume by replay later."""


class Abandon(_Signal):
    """The worker lost its claim on the run: stop at once, write nothing more."""


def suspend() -> Suspend:
    return Suspend(_TOKEN, "run suspended")


def abandon(reason: str) -> Abandon:
    return Abandon(_TOKEN, reason)
