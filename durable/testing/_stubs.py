"""Stand-ins for step bodies in a simulation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def failing(
    error: BaseException, *, times: int | None = None, then: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """A step body that raises ``error`` on its first ``times`` calls (every call when None),
    then calls ``then`` (returns None when there is none)::

        Simulation(app, stubs={"charge": failing(CardDeclined("no funds"), times=2,
                                                 then=lambda *a: "ch_1")})
    """
    calls = 0

    def body(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if times is None or calls <= times:
            # The same instance every time: without a fresh traceback, each raise would add
            # its frames to the last one's, and a retried step's journaled error would grow.
            raise error.with_traceback(None)
        return None if then is None else then(*args, **kwargs)

    return body
