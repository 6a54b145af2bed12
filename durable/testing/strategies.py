"""Hypothesis strategies for what a real deployment varies (needs ``hypothesis`` installed).

Each draws an argument of ``Simulation.run``; hypothesis shrinks a failing draw to the smallest
one (fewest crashes, earliest checkpoints, fewest events), and ``Outcome.explain()`` says it in
words::

    @given(crashes=crash_schedules(), events=event_orders("approved", key="r1",
                                                          payloads=st.booleans(),
                                                          within=timedelta(days=2)))
    async def test_approval_survives(crashes, events):
        outcome = await Simulation(app).run(approval, request, crashes=crashes, events=events)
        assert outcome.status == "completed", outcome.explain()
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import strategies as st

from durable.testing._simulation import Send


def crash_schedules(
    *, max_crashes: int = 3, max_checkpoint: int = 60
) -> st.SearchStrategy[list[int]]:
    """Sets of checkpoint indexes to crash at (see ``Simulation.run(crashes=...)``). An index
    past the end of the run is simply never reached."""
    # A plain list, made a set by the map: Hypothesis shrinks it to the fewest crashes, where
    # a unique=True list often stops at one more (measured: [0, 6] in 3 finds of 10).
    return st.lists(st.integers(min_value=0, max_value=max_checkpoint), max_size=max_crashes).map(
        lambda crashes: sorted(set(crashes))
    )


def event_orders(
    name: str,
    *,
    key: str | None = None,
    payloads: st.SearchStrategy[Any] | None = None,
    within: timedelta = timedelta(hours=1),
    max_events: int = 3,
) -> st.SearchStrategy[list[Send]]:
    """Events ``name`` (with ``key``) sent at moments drawn from [0, ``within``]: before the
    run reaches its wait, while it waits, after the wait's timeout (choose ``within`` longer
    than the timeout), none at all, or the same payload twice."""
    payload = payloads if payloads is not None else st.none()
    step = max(1, int(within.total_seconds()))
    one = st.builds(
        lambda at, value: Send(name, value, key=key, at=timedelta(seconds=at)),
        st.integers(min_value=0, max_value=step),
        payload,
    )
    drawn = st.lists(one, max_size=max_events)
    duplicated = one.map(lambda send: [send, send])
    return st.one_of(drawn, duplicated)


def timer_lateness(
    *, max_late: timedelta = timedelta(minutes=5), max_timers: int = 5
) -> st.SearchStrategy[list[timedelta]]:
    """How late each timer is picked up (``Simulation.run(lateness=...)``), as when workers are
    busy or down: timers still fire in order, never early."""
    late = st.integers(min_value=0, max_value=max(0, int(max_late.total_seconds())))
    return st.lists(late.map(lambda s: timedelta(seconds=s)), max_size=max_timers)


def completion_orders() -> st.SearchStrategy[int]:
    """Seeds for ``Simulation.run(shuffle=...)``: the order in which parallel branches
    (``asyncio.gather`` of steps) start and finish."""
    return st.integers(min_value=0, max_value=2**32 - 1)
