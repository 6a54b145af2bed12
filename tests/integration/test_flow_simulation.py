"""A simulation honours every declaration of the app: rate limits, concurrency keys and their
strategies, priorities, execution and start timeouts, delays and children, because the
database's own functions apply them. Each test runs on the default server of
``durable.testing`` (see tests/integration/conftest.py: the session's embedded PostgreSQL, or
$DURABLE_TEST_DATABASE_URL's server)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import durable
from durable.testing import CrashCheckFailed, Outcome, Simulation, crash_at_every_point

pytestmark = pytest.mark.postgres

app = durable.App("postgresql://unused")
app.rate_limit("api", limit=2, period=timedelta(seconds=1))
app.rate_limit("child starts", limit=2, period=timedelta(minutes=1))
HOUR = timedelta(hours=1)


@durable.step(rate_limit="api")
def call_api(n: int) -> int:
    return 10 * n


@app.function(name="five_calls")
async def five_calls(ctx: durable.Context) -> list[int]:
    return [await ctx.step(f"call {i}", call_api, i) for i in range(5)]


def record(label: str) -> str:
    return label


@app.function(name="exclusive", concurrency=durable.Concurrency(2, hold_while_suspended=True))
async def exclusive(ctx: durable.Context, n: int) -> int:
    await ctx.step("enter", record, f"enter {n}")
    await ctx.sleep(HOUR)
    await ctx.step("leave", record, f"leave {n}")
    return n


@app.function(name="latest_only", concurrency=durable.Concurrency(1, strategy="cancel_in_progress"))
async def latest_only(ctx: durable.Context, n: int) -> int:
    await ctx.sleep(HOUR)
    return n


claimed: list[str] = []


def note(label: str) -> str:
    claimed.append(label)
    return label


@app.function(name="routine")
async def routine(ctx: durable.Context, label: str) -> str:
    return await ctx.step("note", note, label)


@app.function(name="urgent", priority=10)
async def urgent(ctx: durable.Context, label: str) -> str:
    return await ctx.step("note", note, label)


@app.function(name="slow", timeout=timedelta(minutes=30))
async def slow(ctx: durable.Context) -> str:
    await ctx.sleep(HOUR)
    return "finished"


@app.function(
    name="hurried",
    concurrency=durable.Concurrency(1, hold_while_suspended=True),
    start_timeout=timedelta(minutes=10),
)
async def hurried(ctx: durable.Context, n: int) -> int:
    await ctx.sleep(HOUR)
    return n


@app.function(name="square", rate_limit="child starts")
async def square(ctx: durable.Context, n: int) -> int:
    return await ctx.step("square", lambda: n * n)


@app.function(name="sum_of_squares")
async def sum_of_squares(ctx: durable.Context, n: int) -> int:
    return sum(await asyncio.gather(*(ctx.run(square, i) for i in range(n))))


def broken() -> None:
    raise RuntimeError("always")


@app.function(name="always_fails")
async def always_fails(ctx: durable.Context) -> None:
    await ctx.step("broken", broken)


def times(outcome: Outcome) -> list[timedelta]:
    """When each journal entry was written, from the run's first entry."""
    start = outcome.journal[0].created_at
    return [e.created_at - start for e in outcome.journal]


async def test_rate_limited_steps_complete_with_the_time_the_limit_imposes() -> None:
    outcome = await Simulation(app).run(five_calls)
    assert (outcome.status, outcome.result) == ("completed", [0, 10, 20, 30, 40])
    second = timedelta(seconds=1)
    assert times(outcome) == [0 * second, 0 * second, second, second, 2 * second]
    assert outcome.elapsed == 2 * second


async def test_a_rate_limited_function_survives_a_crash_at_every_point() -> None:
    report = await crash_at_every_point(app, five_calls)
    assert report.baseline.result == [0, 10, 20, 30, 40]
    # Three per step, and one more "before" for each of the two steps that waited for budget
    # (checked before the wait, and again when the run resumed).
    assert len(report.points) == 5 * 3 + 2


app.rate_limit("scarce", limit=1, period=timedelta(seconds=10))
flaky_calls: list[int] = []


@durable.step(rate_limit="scarce", retries=1, backoff=durable.Backoff(initial=timedelta(0)))
def flaky_call() -> str:
    flaky_calls.append(1)
    if len(flaky_calls) == 1:
        raise ConnectionError("the first call fails")
    return "ok"


@app.function(name="retried_under_a_rate_limit")
async def retried_under_a_rate_limit(ctx: durable.Context) -> str:
    return await ctx.step("flaky", flaky_call)


async def test_a_retry_that_must_wait_for_rate_budget_waits_in_virtual_time() -> None:
    """A retry is live work, so its run cannot suspend: it waits in memory for its units. On
    the virtual clock that wait moves time to the reservation (it used to spin forever)."""
    flaky_calls.clear()
    outcome = await asyncio.wait_for(Simulation(app).run(retried_under_a_rate_limit), 60)
    assert (outcome.status, outcome.result) == ("completed", "ok")
    assert len(flaky_calls) == 2
    assert outcome.elapsed == timedelta(seconds=10)  # the second unit, a window later


async def test_a_function_that_always_fails_is_reported_by_the_crash_check() -> None:
    with pytest.raises(CrashCheckFailed, match="itself ended failed") as caught:
        await crash_at_every_point(app, always_fails)
    assert "RuntimeError: always" in str(caught.value)


async def test_runs_of_one_concurrency_key_never_exceed_its_limit_and_all_complete() -> None:
    async with Simulation(app) as sim:
        ids = [await sim.start(exclusive, n) for n in range(4)]
        last = await sim.run(exclusive, 4)
        outcomes = [*[await sim.outcome(run_id) for run_id in ids], last]
    assert [(o.status, o.result) for o in outcomes] == [("completed", n) for n in range(5)]
    spans = [(o.journal[0].created_at, o.journal[-1].created_at) for o in outcomes]
    moments = sorted({moment for span in spans for moment in span})
    at_once = [sum(1 for start, end in spans if start <= t < end) for t in moments]
    assert max(at_once) == 2
    assert [end - start for start, end in spans] == [HOUR] * 5
    assert max(end for _, end in spans) - min(start for start, _ in spans) == 3 * HOUR


async def test_a_newer_run_cancels_the_one_in_progress_when_the_strategy_says_so() -> None:
    async with Simulation(app) as sim:
        first = await sim.start(latest_only, 1)
        second = await sim.run(latest_only, 2)
        replaced = await sim.outcome(first)
    assert (second.status, second.result) == ("completed", 2)
    assert replaced.status == "cancelled"
    assert replaced.error is not None
    assert replaced.error.type == "RunCancelled"


async def test_the_highest_priority_is_claimed_first() -> None:
    claimed.clear()
    async with Simulation(app) as sim:
        await sim.start(routine, "routine")
        await sim.start(urgent, "urgent by declaration")
        await sim.start(routine, "raised at its start", priority=5)
        await sim.run(routine, "routine, later")
    assert claimed == ["urgent by declaration", "raised at its start", "routine", "routine, later"]


async def test_a_run_past_its_execution_timeout_fails_at_the_virtual_deadline() -> None:
    outcome = await Simulation(app).run(slow)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "RunTimedOut"
    assert outcome.elapsed == timedelta(minutes=30)


async def test_a_delayed_run_starts_after_its_delay() -> None:
    start = datetime(2031, 1, 1, tzinfo=UTC)
    outcome = await Simulation(app, start=start).run(exclusive, 7, delay=2 * HOUR)
    assert (outcome.status, outcome.result) == ("completed", 7)
    assert outcome.journal[0].created_at == start + 2 * HOUR
    assert times(outcome) == [timedelta(0), timedelta(0), HOUR]  # enter, sleep, leave
    assert outcome.elapsed == 3 * HOUR


async def test_a_run_not_started_within_its_start_timeout_expires() -> None:
    async with Simulation(app) as sim:
        first = await sim.start(hurried, 1)
        late = await sim.run(hurried, 2)
        kept = await sim.outcome(first)
    assert (kept.status, kept.result) == ("completed", 1)
    assert late.status == "failed"
    assert late.error is not None
    assert late.error.type == "RunExpired"
    assert late.elapsed == HOUR  # it expired when the slot it awaited was handed to it


async def test_children_are_driven_under_their_own_declarations() -> None:
    outcome = await Simulation(app).run(sum_of_squares, 4)
    assert (outcome.status, outcome.result) == ("completed", 0 + 1 + 4 + 9)
    assert outcome.elapsed == timedelta(minutes=1)  # two child starts per minute
    assert [e.kind for e in outcome.journal] == ["start"] * 4 + ["join"] * 4
