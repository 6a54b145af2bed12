"""A bad duration or wait inside a run is InvalidInput naming the call, the same way on replay
(issue 10, item 12): simulated, with a crash injected at every point."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable.testing import Simulation, crash_at_every_point

pytestmark = pytest.mark.postgres

app = durable.App()


def _waits(call: Any) -> Any:
    async def fn(ctx: durable.Context) -> str:
        try:
            await call(ctx)
        except durable.InvalidInput as refused:
            return str(refused)
        return "accepted"

    return fn


BAD_WAITS = {
    "sleep-nan": (lambda ctx: ctx.sleep(float("nan")), "ctx.sleep: the duration"),
    "sleep-inf": (lambda ctx: ctx.sleep(float("inf")), "ctx.sleep: the duration"),
    "sleep-max": (lambda ctx: ctx.sleep(timedelta.max), "ctx.sleep: the duration"),
    "sleep-str": (lambda ctx: ctx.sleep("5"), "ctx.sleep: the duration"),
    "until-max": (lambda ctx: ctx.sleep_until(datetime.max), "ctx.sleep_until: the time"),
    "until-max-aware": (
        lambda ctx: ctx.sleep_until(datetime.max.replace(tzinfo=UTC)),
        "ctx.sleep_until: the time",
    ),
    "wait-inf": (
        lambda ctx: ctx.wait_for_event("x", timeout=float("inf")),
        "wait_for_event: the timeout",
    ),
    "wait-nan": (
        lambda ctx: ctx.wait_for_event("x", timeout=float("nan")),
        "wait_for_event: the timeout",
    ),
    "wait-name": (lambda ctx: ctx.wait_for_event("x" * 300), "wait_for_event: the event name"),
    "wait-key": (
        lambda ctx: ctx.wait_for_event("x", key="\udcff"),
        "wait_for_event: the event key",
    ),
}
WAITING = {name: app.function(name=name)(_waits(call)) for name, (call, _m) in BAD_WAITS.items()}


@pytest.mark.parametrize("name", list(BAD_WAITS))
async def test_a_bad_duration_or_wait_is_invalid_input_naming_the_call_on_replay_too(
    name: str,
) -> None:
    """The function catches the refusal, then crashes are injected at every point: the replayed
    runs see the same refusal at the same place (crash_at_every_point compares them)."""
    outcome = await Simulation(app).run(WAITING[name])
    assert outcome.status == "completed"
    assert outcome.result.startswith(BAD_WAITS[name][1]), outcome.result
    await crash_at_every_point(app, WAITING[name])
