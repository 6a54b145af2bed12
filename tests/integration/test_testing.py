"""durable.testing: simulation on a virtual clock, crash at every point, strategies, replay.

Simulations run on the session's server (tests/integration/conftest.py), in a database of
their own; replay needs none."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import durable
from durable.testing import (
    CrashCheckFailed,
    RecordedRun,
    Send,
    Simulation,
    crash_at_every_point,
    describe,
    failing,
    replay,
)
from durable.testing.strategies import completion_orders, crash_schedules, event_orders

pytestmark = pytest.mark.postgres

app = durable.App("postgresql://unused")
CASES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def double(n: int) -> int:
    return 2 * n


@app.function(name="pipeline")
async def pipeline(ctx: durable.Context, n: int) -> int:
    total = 0
    for i in range(n):  # a data-dependent number of steps
        total += await ctx.step(f"double {i}", double, i)
    await ctx.sleep(timedelta(days=7))
    return total


@app.function(name="parallel")
async def parallel(ctx: durable.Context, n: int) -> list[int]:
    async def branch(i: int) -> int:
        first = await ctx.step("first", double, i)
        return first + await ctx.step("second", double, first)

    return list(await asyncio.gather(*(branch(i) for i in range(n))))


@app.function(name="timers")
async def timers(ctx: durable.Context) -> list[str]:
    async def after(days: int, label: str) -> str:
        await ctx.sleep(timedelta(days=days))
        return await ctx.step(label, str, label)

    return list(
        await asyncio.gather(after(2, "two days"), after(1, "one day"), after(3, "three days"))
    )


@app.function(name="approvals")
async def approvals(ctx: durable.Context) -> list[object]:
    first = await ctx.wait_for_event("approved", key="r1", timeout=timedelta(hours=1))
    second = await ctx.wait_for_event("approved", key="r1", timeout=timedelta(hours=1))
    return [first, second]


@app.function(name="helpers")
async def helpers(ctx: durable.Context) -> list[str]:
    stamp = await ctx.now()
    token = await ctx.uuid()
    draw = await ctx.random()
    await ctx.step("use", str, token)
    return [stamp.isoformat(), str(token), f"{draw:.6f}"]


@app.function(name="guarded")
async def guarded(ctx: durable.Context) -> str:
    try:
        return await asyncio.wait_for(ctx.step("quick", str, "done"), timeout=60)
    except durable.StepFailed:
        return "failed"


def explode() -> int:
    raise ValueError("boom")


@app.function(name="caught")
async def caught(ctx: durable.Context) -> str:
    try:
        await ctx.step("explode", explode)
    except durable.StepFailed as failure:
        return await ctx.step("recover", str, failure.error.message)
    return "unreachable"


@app.function(name="clock reader")
async def clock_reader(ctx: durable.Context) -> int:
    # Deliberately wrong: reads the wall clock outside a step, so a replay asks for another step.
    await ctx.step(f"charge at {time.time_ns()}", str, "charged")
    await ctx.step("ship", str, "shipped")
    return 1


@app.function(name="dice")
async def dice(ctx: durable.Context) -> int:
    # Deliberately wrong: a random number drawn outside a step becomes the result.
    roll = random.SystemRandom().randrange(10**9)
    await ctx.step("roll", str, "rolled")
    return roll


_token_cache: dict[str, str] = {}


@app.function(name="cached")
async def cached(ctx: durable.Context) -> str:
    # Deliberately wrong: process memory decides whether a step runs. Only a crash after the
    # cache was filled, in a process that lives on, shows it.
    await ctx.step("log in", str, "ok")
    if "token" not in _token_cache:
        _token_cache["token"] = await ctx.step("fetch token", str, "t-1")
    return await ctx.step("use token", str, _token_cache["token"])


async def test_a_week_long_sleep_takes_no_time_on_the_virtual_clock() -> None:
    outcome = await Simulation(app).run(pipeline, 4)
    assert outcome.result == 0 + 2 + 4 + 6
    assert outcome.elapsed == timedelta(days=7)
    assert outcome.attempts == 2  # suspended for the week, resumed by replay


async def test_timers_fire_in_the_order_a_real_clock_fires_them() -> None:
    outcome = await Simulation(app).run(timers)
    assert outcome.result == ["two days", "one day", "three days"]
    steps = sorted((e for e in outcome.journal if e.kind == "step"), key=lambda e: e.created_at)
    start = min(e.created_at for e in outcome.journal)
    assert [(e.name, e.created_at - start) for e in steps] == [
        ("one day", timedelta(days=1)),
        ("two days", timedelta(days=2)),
        ("three days", timedelta(days=3)),
    ]
    assert outcome.attempts == 4


async def test_each_wait_receives_the_next_event_and_duplicates_count_twice() -> None:
    same = Send("approved", {"by": "ann"}, key="r1", at=timedelta(minutes=5))
    outcome = await Simulation(app).run(approvals, events=[same, same])
    assert outcome.result == [{"by": "ann"}, {"by": "ann"}]


async def test_a_wait_times_out_when_its_event_comes_too_late() -> None:
    late = Send("approved", True, key="r1", at=timedelta(minutes=90))
    outcome = await Simulation(app).run(approvals, events=[late])
    assert outcome.result == [None, True]  # too late for the first wait, in time for the second
    assert outcome.elapsed == timedelta(minutes=90)


async def test_a_stub_replaces_a_step_body_without_touching_the_function() -> None:
    outcome = await Simulation(app, stubs={"double 1": lambda i: 100}).run(pipeline, 3)
    assert outcome.result == 0 + 100 + 4
    failed = await Simulation(app, stubs={"double 0": failing(KeyError("gone"))}).run(pipeline, 1)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "StepFailed"


async def test_journaled_helpers_are_seeded_and_survive_crashes() -> None:
    first = await Simulation(app, seed=7).run(helpers)
    again = await Simulation(app, seed=7).run(helpers)
    other = await Simulation(app, seed=8).run(helpers)
    assert first.result == again.result
    assert first.result != other.result
    await crash_at_every_point(app, helpers, seed=7)


@pytest.mark.parametrize(
    ("fn", "n"),
    [
        (pipeline, 3),
        (parallel, 3),
        (timers, None),
        (guarded, None),
        (caught, None),
        (helpers, None),
    ],
)
async def test_deterministic_functions_pass_the_crash_check(fn: object, n: int | None) -> None:
    report = await crash_at_every_point(app, fn, n)  # type: ignore[arg-type]
    assert report.baseline.status == "completed"
    assert {p.moment for p in report.points} == {"before", "ran", "journaled"}


async def test_reading_the_clock_outside_a_step_is_caught_at_the_earliest_crash() -> None:
    with pytest.raises(CrashCheckFailed) as caught:
        await crash_at_every_point(app, clock_reader)
    message = str(caught.value)
    assert message.startswith("crash before position 0 (step 'charge at ")
    assert "the journal differs at position 0" in message


async def test_randomness_outside_a_step_is_caught_by_the_crash_check() -> None:
    with pytest.raises(CrashCheckFailed) as caught:
        await crash_at_every_point(app, dice)  # equal draws: a one-in-a-billion chance
    assert str(caught.value).startswith("crash before position 0 (step 'roll') ran: the run ")


async def test_a_crash_schedule_shrinks_to_the_one_crash_that_matters() -> None:
    _token_cache.clear()
    baseline = await Simulation(app).run(cached)

    def breaks(crashes: list[int]) -> bool:
        _token_cache.clear()

        async def differences() -> list[str]:
            outcome = await Simulation(app).run(cached, crashes=crashes)
            return outcome.differences(baseline)

        return bool(asyncio.run(differences()))

    # No deadline: each example is a simulation on PostgreSQL, whose time the machine's load
    # decides (hypothesis's 200 ms default failed it on a loaded machine).
    shrunk = await asyncio.to_thread(
        find,
        crash_schedules(max_checkpoint=20),
        breaks,
        settings=settings(database=None, deadline=None),
    )
    assert shrunk == [6]
    assert describe(baseline.checkpoints[6]) == "crash before position 2 (step 'use token') ran"


@CASES
@given(order=completion_orders(), n=st.integers(min_value=1, max_value=4))
async def test_parallel_steps_replay_the_same_in_any_completion_order(order: int, n: int) -> None:
    outcome = await Simulation(app).run(parallel, n, shuffle=order)
    assert outcome.result == [2 * i + 4 * i for i in range(n)]
    assert sorted(e.position for e in outcome.journal) == sorted(
        f"{b}:{s}" for b in range(n) for s in range(2)
    )


@CASES
@given(
    crashes=crash_schedules(max_checkpoint=20),
    order=completion_orders(),
    n=st.integers(min_value=1, max_value=3),
)
async def test_parallel_steps_survive_any_crash_schedule(
    crashes: list[int], order: int, n: int
) -> None:
    outcome = await Simulation(app).run(parallel, n, crashes=crashes, shuffle=order)
    assert outcome.status == "completed", outcome.explain()
    assert outcome.reruns == [], outcome.explain()
    # A crash also kills the branches' steps that were running beside the one it hit: each
    # step may run once more per crash, never more, and every journaled step ran.
    assert len(outcome.executions) == 2 * n
    assert max(outcome.executions.values()) <= 1 + len(outcome.crashes), outcome.explain()


@CASES
@given(events=event_orders("approved", key="r1", payloads=st.integers(), within=timedelta(hours=3)))
async def test_two_waits_receive_events_in_send_order(events: list[Send]) -> None:
    outcome = await Simulation(app).run(approvals, events=events)
    assert outcome.status == "completed"
    received = [payload for payload in outcome.result if payload is not None]
    sent = [send.payload for send in sorted(events, key=lambda s: s.at)]
    assert received == sent[: len(received)]


async def test_a_recorded_journal_replays_against_the_same_code() -> None:
    outcome = await Simulation(app).run(pipeline, 3)
    recorded = RecordedRun(outcome.run_id, "pipeline", 3, "completed", 6, outcome.journal)
    report = await replay(app, RecordedRun.from_json(recorded.to_json()))
    assert (report.replayed, report.status) == (4, "completed")


async def test_a_replay_stops_where_live_work_would_begin() -> None:
    outcome = await Simulation(app).run(approvals)  # no events: both waits time out
    partial = [e for e in outcome.journal if e.position == "0"]
    recorded = RecordedRun(outcome.run_id, "approvals", None, "suspended", None, partial)
    report = await replay(app, recorded)
    assert (report.replayed, report.status, report.live_at) == (1, "suspended", ["1"])


async def test_a_replay_of_drifted_code_raises_the_difference() -> None:
    outcome = await Simulation(app).run(pipeline, 3)
    recorded = RecordedRun(outcome.run_id, "pipeline", 3, "completed", 6, outcome.journal)
    drifted = durable.App("postgresql://unused")

    @drifted.function(name="pipeline")
    async def renamed(ctx: durable.Context, n: int) -> int:
        for i in range(n):
            await ctx.step(f"triple {i}", double, i)
        return 0

    with pytest.raises(durable.NonDeterminismError) as caught:
        await replay(drifted, recorded)
    assert caught.value.position == "0"
    assert "double 0" in str(caught.value)
    assert "triple 0" in str(caught.value)


async def test_a_replay_that_stops_short_of_the_journal_raises() -> None:
    outcome = await Simulation(app).run(pipeline, 3)
    recorded = RecordedRun(outcome.run_id, "pipeline", 2, "completed", 6, outcome.journal)
    with pytest.raises(durable.NonDeterminismError, match="position 2"):
        await replay(app, recorded)


@app.function(name="square_child")
async def square_child(ctx: durable.Context, n: int) -> int:
    return await ctx.step("square", lambda: n * n)


@app.function(name="fan_out_parent")
async def fan_out_parent(ctx: durable.Context, n: int) -> int:
    return sum(await asyncio.gather(*(ctx.run(square_child, i) for i in range(n))))


async def test_a_simulation_drives_child_runs_and_a_fan_out_survives_a_crash_at_every_point() -> (
    None
):
    report = await crash_at_every_point(app, fan_out_parent, 3)
    assert report.baseline.result == 0 + 1 + 4
    assert [e.kind for e in report.baseline.journal].count("start") == 3
    assert len(report.points) >= 6


async def test_a_recorded_fan_out_replays_from_its_journal_alone() -> None:
    outcome = await Simulation(app).run(fan_out_parent, 3)
    recorded = RecordedRun(
        run_id=outcome.run_id,
        function="fan_out_parent",
        input=3,
        status=outcome.status,
        result=outcome.result,
        journal=outcome.journal,
    )
    await replay(app, RecordedRun.from_json(recorded.to_json()))
