"""Checking a deploy before it happens: ``check_runs`` replays the runs in flight on the new
code, and ``upgrade_at_every_point`` deploys the new code at every journal boundary of a run."""

from __future__ import annotations

import uuid

import pytest

import durable
from durable.testing import Send, UpgradeCheckFailed, check_runs, upgrade_at_every_point
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def _v1(app: durable.App) -> None:
    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        decision: str = await ctx.wait_for_event("decision", key=run)
        await ctx.step("notify", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _renamed(app: durable.App) -> None:
    """v1 with "notify" renamed, no patch."""

    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        decision: str = await ctx.wait_for_event("decision", key=run)
        await ctx.step("send-notice", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _renamed_behind_a_patch(app: durable.App) -> None:
    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        decision: str = await ctx.wait_for_event("decision", key=run)
        if await ctx.patched("rename-notify"):
            await ctx.step("send-notice", lambda: "notified")
        else:
            await ctx.step("notify", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _with_a_step_behind_a_patch(app: durable.App) -> None:
    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        if await ctx.patched("risk-check"):
            await ctx.step("risk-check", lambda: "low")
        decision: str = await ctx.wait_for_event("decision", key=run)
        await ctx.step("notify", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _with_the_patch_deprecated(app: durable.App) -> None:
    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        await ctx.deprecate_patch("risk-check")
        await ctx.step("risk-check", lambda: "low")
        decision: str = await ctx.wait_for_event("decision", key=run)
        await ctx.step("notify", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _with_a_step_inserted(app: durable.App) -> None:
    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> str:
        await ctx.step("submit", lambda: "submitted")
        await ctx.step("risk-check", lambda: "low")
        decision: str = await ctx.wait_for_event("decision", key=run)
        await ctx.step("notify", lambda: "notified")
        await ctx.wait_for_event("archive", key=run)
        return decision


def _other_function(app: durable.App) -> None:
    @app.function(name="other")
    async def other(ctx: durable.Context) -> None:
        await ctx.wait_for_event("never")


async def _runs_in_flight(database_url: str) -> dict[str, uuid.UUID]:
    """On v1: "early" waits for the decision, "late" (past "notify") for the archive, "done"
    completed, and a run of a function the next code drops."""
    app = make_app(database_url)
    _v1(app)
    _other_function(app)
    async with app, running_worker(app):
        runs = {name: await app.start("approval", name) for name in ("early", "late", "done")}
        for name in ("late", "done"):
            await app.send_event("decision", "yes", key=name)
        await app.send_event("archive", None, key="done")
        await app.start("other")
        assert await runs["done"].result(timeout=20) == "yes"
        await until(lambda: status_is(runs["early"], "suspended"), what="early waiting")
        await until(lambda: status_is(runs["late"], "suspended"), what="late waiting")
        await until(lambda: _journaled(runs["late"], "notify"), what="late past notify")
    return {name: handle.run_id for name, handle in runs.items()}


async def _journaled(handle: durable.RunHandle[str], name: str) -> bool:
    return any(e.name == name for e in await handle.journal())


async def test_check_runs_lists_the_runs_a_rename_breaks_by_cause(database_url: str) -> None:
    runs = await _runs_in_flight(database_url)
    renamed = durable.App(database_url)
    _renamed(renamed)
    report = await check_runs(renamed, include_completed=10)
    assert not report.passed
    assert report.checked == {"suspended": 2, "completed": 1}
    assert report.skipped == {"other": 1}
    [(cause, failures)] = report.by_cause().items()
    assert cause == ("approval", "2", "step 'notify'", "step 'send-notice'")
    assert sorted(f.run_id for f in failures) == sorted([runs["late"], runs["done"]])
    text = str(report)
    assert "2 runs would fail on this code" in text
    assert str(runs["late"]) in text
    assert "position 2" in text
    assert str(runs["early"]) not in text


async def test_check_runs_passes_a_rename_behind_a_patch_and_changes_nothing(
    database_url: str,
) -> None:
    runs = await _runs_in_flight(database_url)
    async with durable.App(database_url) as app:
        before = {name: await app.get_run(run_id).journal() for name, run_id in runs.items()}
    for define in (_renamed_behind_a_patch, _with_a_step_behind_a_patch):
        fixed = durable.App(database_url)
        define(fixed)
        report = await check_runs(fixed, include_completed=10)
        assert report.passed, str(report)
        assert "every run replays on this code" in str(report)
    # Nothing was written: not one entry (no patch marker), not one status.
    async with durable.App(database_url) as app:
        for name, run_id in runs.items():
            assert await app.get_run(run_id).journal() == before[name]
        assert await app.get_run(runs["early"]).status() == "suspended"


async def test_check_runs_fails_the_runs_past_a_step_inserted_without_a_patch(
    database_url: str,
) -> None:
    # "early" has nothing journaled at position 1 (it waits there): on the new code it runs the
    # inserted step live and waits after it, which works. "late" has its event there.
    runs = await _runs_in_flight(database_url)
    inserted = durable.App(database_url)
    _with_a_step_inserted(inserted)
    report = await check_runs(inserted)
    assert [(f.run_id, f.position) for f in report.failures] == [(runs["late"], "1")]


async def test_check_runs_reports_every_run_that_needs_the_old_branch_of_a_deprecated_patch(
    database_url: str,
) -> None:
    # Both went past the patch point on v1: "late" has its event there, "early" only a wait
    # registered there (nothing journaled), which the check reads as the worker would.
    runs = await _runs_in_flight(database_url)
    deprecated = durable.App(database_url)
    _with_the_patch_deprecated(deprecated)
    report = await check_runs(deprecated)
    found = {f.run_id: f for f in report.failures}
    assert set(found) == {runs["early"], runs["late"]}
    assert found[runs["early"]].recorded == "a wait (the code before patch 'risk-check')"
    assert found[runs["late"]].recorded == "event 'decision' (the code before patch 'risk-check')"
    assert {f.position for f in found.values()} == {"1"}


async def test_upgrade_at_every_point_passes_a_step_added_behind_a_patch() -> None:
    old, new = durable.App(), durable.App()
    _v1(old)
    _with_a_step_behind_a_patch(new)
    events = [Send("decision", "yes", key="r"), Send("archive", None, key="r")]
    report = await upgrade_at_every_point(old, new, "approval", "r", events=events)
    assert len(report.points) >= 6  # every boundary of every journaled call was a deploy


async def test_upgrade_at_every_point_names_the_boundary_a_change_without_a_patch_breaks() -> None:
    old, new = durable.App(), durable.App()
    _v1(old)
    _with_a_step_inserted(new)
    events = [Send("decision", "yes", key="r"), Send("archive", None, key="r")]
    with pytest.raises(UpgradeCheckFailed) as failed:
        await upgrade_at_every_point(old, new, "approval", "r", events=events)
    message = str(failed.value)
    # Deployed before the wait, the new code runs the inserted step and then waits; deployed
    # once the event is journaled at position 1, it finds the event where its step should be.
    assert message.startswith("deploy after position 1 (event 'decision') was journaled"), message
    assert "the run ended paused" in message
    assert "NonDeterminismError" in message
