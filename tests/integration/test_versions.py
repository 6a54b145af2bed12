"""Code that changes under runs in flight, on real Postgres: patches, versions, pinning, the
automatic retry of paused runs, forks and retries. Each deploy is two apps on one database:
the old one's worker stops, the new one's starts."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta

import pytest

import durable
from engine.errors import InvalidInput, NonDeterminismError
from tests.helpers import make_app, running_worker, status_is, until

pytestmark = pytest.mark.postgres


def _approval_v1(app: durable.App, ran: Counter[str]) -> None:
    async def work(name: str, run: str) -> str:
        ran[f"{run}:{name}"] += 1
        return name

    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> list[str]:
        done = [await ctx.step("submit", work, "submit", run)]
        decision = await ctx.wait_for_event("decision", key=run)
        done.append(await ctx.step("notify", work, "notify", run))
        return [*done, decision]


def _approval_v2(app: durable.App, ran: Counter[str]) -> None:
    """v1 with a step added behind a patch, before the wait."""

    async def work(name: str, run: str) -> str:
        ran[f"{run}:{name}"] += 1
        return name

    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> list[str]:
        done = [await ctx.step("submit", work, "submit", run)]
        if await ctx.patched("risk-check"):
            done.append(await ctx.step("risk-check", work, "risk-check", run))
        decision = await ctx.wait_for_event("decision", key=run)
        done.append(await ctx.step("notify", work, "notify", run))
        return [*done, decision]


def _approval_v3(app: durable.App, ran: Counter[str]) -> None:
    """v2 once its old branch is deleted."""

    async def work(name: str, run: str) -> str:
        ran[f"{run}:{name}"] += 1
        return name

    @app.function(name="approval")
    async def approval(ctx: durable.Context, run: str) -> list[str]:
        done = [await ctx.step("submit", work, "submit", run)]
        await ctx.deprecate_patch("risk-check")
        done.append(await ctx.step("risk-check", work, "risk-check", run))
        decision = await ctx.wait_for_event("decision", key=run)
        done.append(await ctx.step("notify", work, "notify", run))
        return [*done, decision]


def _journal_of(entries: list[durable.JournalEntry]) -> list[tuple[str, str, str]]:
    return [(e.position, e.kind, e.name) for e in entries]


async def test_old_runs_take_the_old_branch_and_new_runs_the_new_one(database_url: str) -> None:
    ran: Counter[str] = Counter()
    v1, v2 = make_app(database_url), make_app(database_url)
    _approval_v1(v1, ran)
    _approval_v2(v2, ran)
    async with v1, v2:
        async with running_worker(v1):
            old = await v1.start("approval", "old")
            await until(lambda: status_is(old, "suspended"), what="old run waiting")
        async with running_worker(v2):
            new = await v2.start("approval", "new")
            await until(lambda: status_is(new, "suspended"), what="new run waiting")
            for key in ("old", "new"):
                await v2.send_event("decision", "yes", key=key)
            assert await old.result(timeout=20) == ["submit", "notify", "yes"]
            assert await new.result(timeout=20) == ["submit", "risk-check", "notify", "yes"]
        old_journal, new_journal = await old.journal(), await new.journal()
        old_info = await old.info()
    # The old run passed the patch point (its wait was registered right after it) on v1.
    assert sorted(_journal_of(old_journal)) == [
        ("0", "step", "submit"),
        ("1", "event", "decision"),
        ("2", "step", "notify"),
    ]
    # The marker takes no position: the new run's step in the new branch takes the next one.
    assert sorted(_journal_of(new_journal)) == [
        ("0", "step", "submit"),
        ("1", "step", "risk-check"),
        ("1~risk-check", "patch", "risk-check"),
        ("2", "event", "decision"),
        ("3", "step", "notify"),
    ]
    assert all(n == 1 for n in ran.values()), ran
    assert old_info.versions[0] == v1.functions["approval"].version
    assert old_info.versions[-1] == v2.functions["approval"].version
    assert old_info.version != v2.functions["approval"].version


async def test_a_patch_with_empty_branches_shifts_no_position(database_url: str) -> None:
    app = make_app(database_url)

    @app.function(name="plain")
    async def plain(ctx: durable.Context) -> bool:
        await ctx.step("a", lambda: 1)
        took = await ctx.patched("nothing-yet")
        await ctx.step("b", lambda: 2)
        return took

    async with app, running_worker(app):
        run = await app.start(plain)
        assert await run.result(timeout=20) is True
        journal = await run.journal()
    assert [(e.position, e.name) for e in journal if e.kind == "step"] == [("0", "a"), ("1", "b")]


async def test_a_run_that_reaches_the_patch_live_after_the_deploy_takes_the_new_branch(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    v1, v2 = make_app(database_url), make_app(database_url)

    async def work(name: str, run: str) -> str:
        ran[f"{run}:{name}"] += 1
        return name

    @v1.function(name="late")
    async def late_v1(ctx: durable.Context, run: str) -> list[str]:
        await ctx.wait_for_event("go", key=run)
        return [await ctx.step("a", work, "a", run)]

    @v2.function(name="late")
    async def late_v2(ctx: durable.Context, run: str) -> list[str]:
        await ctx.wait_for_event("go", key=run)
        if await ctx.patched("extra"):
            return [
                await ctx.step("extra", work, "extra", run),
                await ctx.step("a", work, "a", run),
            ]
        return [await ctx.step("a", work, "a", run)]

    async with v1, v2:
        async with running_worker(v1):
            run = await v1.start("late", "r")
            await until(lambda: status_is(run, "suspended"), what="waiting before the patch")
        async with running_worker(v2):
            await v2.send_event("go", None, key="r")
            assert await run.result(timeout=20) == ["extra", "a"]


async def test_deprecate_patch_replays_new_branch_runs_and_pauses_a_run_needing_the_old(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    v1, v2, v3 = make_app(database_url), make_app(database_url), make_app(database_url)
    _approval_v1(v1, ran)
    _approval_v2(v2, ran)
    _approval_v3(v3, ran)
    async with v1, v2, v3:
        async with running_worker(v1):
            old = await v1.start("approval", "old")
            await until(lambda: status_is(old, "suspended"), what="old run waiting")
        async with running_worker(v2):
            patched = await v2.start("approval", "patched")
            await until(lambda: status_is(patched, "suspended"), what="patched run waiting")
        async with running_worker(v3):
            await v3.send_event("decision", "ok", key="patched")
            assert await patched.result(timeout=20) == ["submit", "risk-check", "notify", "ok"]
            await v3.send_event("decision", "ok", key="old")
            await until(lambda: status_is(old, "paused"), what="the old run paused")
            info = await old.info()
    assert info.error is not None
    assert info.error.type == "NonDeterminismError"
    assert "risk-check" in info.error.message
    assert "old branch was deleted" in info.error.message
    assert ran["old:notify"] == 0, "the old run must not go on as if it had run the new branch"


async def test_every_attempt_records_its_version_and_app_version_names_it(
    database_url: str,
) -> None:
    app = make_app(database_url, version="release-7")

    @app.function(name="napper")
    async def napper(ctx: durable.Context) -> None:
        await ctx.sleep(timedelta(milliseconds=300))

    assert app.functions["napper"].version == "release-7"
    async with app, running_worker(app):
        run = await app.start(napper)
        await run.result(timeout=20)
        info = await run.info()
        versions = await app.versions()
    assert info.versions == ("release-7",) * info.attempt
    assert info.attempt >= 2  # the sleep suspended the run: a second attempt woke it
    assert [(v.function, v.version, v.status, v.runs) for v in versions] == [
        ("napper", "release-7", "completed", 1)
    ]


def _renamed(app: durable.App, ran: Counter[str], *, patch: bool) -> None:
    """v1 with "notify" renamed "send-notice": without a patch (a bad deploy) or behind one."""

    async def work(name: str, run: str) -> str:
        ran[f"{run}:{name}"] += 1
        return name

    if patch:

        @app.function(name="approval")
        async def approval(ctx: durable.Context, run: str) -> list[str]:
            done = [await ctx.step("submit", work, "submit", run)]
            decision = await ctx.wait_for_event("decision", key=run)
            if await ctx.patched("rename-notify"):
                done.append(await ctx.step("send-notice", work, "send-notice", run))
            else:
                done.append(await ctx.step("notify", work, "notify", run))
            return [*done, decision]

    else:

        @app.function(name="approval")
        async def approval_renamed(ctx: durable.Context, run: str) -> list[str]:
            done = [await ctx.step("submit", work, "submit", run)]
            decision = await ctx.wait_for_event("decision", key=run)
            done.append(await ctx.step("send-notice", work, "send-notice", run))
            return [*done, decision]


async def test_a_run_paused_by_a_bad_deploy_completes_once_a_fixed_worker_starts(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    v1, bad, fixed = make_app(database_url), make_app(database_url), make_app(database_url)
    _approval_v1(v1, ran)
    _renamed(bad, ran, patch=False)
    _renamed(fixed, ran, patch=True)

    @bad.function(name="probe")
    async def probe(ctx: durable.Context) -> None:
        return None

    async with v1, bad, fixed:
        async with running_worker(v1):
            run = await v1.start("approval", "p")
            await v1.send_event("decision", "yes", key="p")
            await run.result(timeout=20)
        # A fork of the whole journal replays all of it: "notify" at position 2.
        replayed = await run.fork()
        async with running_worker(bad):
            await until(lambda: status_is(replayed, "paused"), what="paused by the bad deploy")
        async with running_worker(bad):
            # The same version starting again does not try it again: by the time this worker
            # has run a probe, it has passed its start.
            await (await bad.start("probe")).result(timeout=20)
            assert await replayed.status() == "paused"
        async with running_worker(fixed):
            assert await replayed.result(timeout=20) == ["submit", "notify", "yes"]
        info = await replayed.info()
    assert info.versions[-1] == fixed.functions["approval"].version
    assert ran["p:notify"] == 1, "the fork replayed the journaled step, it did not run it again"


async def test_a_pinned_run_is_claimed_only_by_workers_of_the_version_it_started_on(
    database_url: str,
) -> None:
    ran: list[tuple[str, str]] = []
    # One source for both: the versions differ only by name (else they would be one version).
    v1, v2 = make_app(database_url, version="v1"), make_app(database_url, version="v2")

    def define(app: durable.App, label: str) -> None:
        async def note(run: str) -> None:
            ran.append((run, label))

        @app.function(name="pinned", versioning="pinned")
        async def pinned(ctx: durable.Context, run: str) -> str:
            await ctx.wait_for_event("go", key=run)
            await ctx.step("note", note, run)
            return label

        @app.function(name="probe")
        async def probe(ctx: durable.Context) -> str:
            return label

    define(v1, "v1")
    define(v2, "v2")
    async with v1, v2:
        async with running_worker(v1):
            old = await v1.start("pinned", "old")
            await until(lambda: status_is(old, "suspended"), what="pinned run waiting")
        async with running_worker(v2):
            await v2.send_event("go", None, key="old")
            # The v2 worker claims what it may: a run started after the event is done...
            assert await (await v2.start("probe")).result(timeout=20) == "v2"
            new = await v2.start("pinned", "new")
            await v2.send_event("go", None, key="new")
            assert await new.result(timeout=20) == "v2"
            # ...and the pinned v1 run, due since the event, is still not claimed.
            info = await old.info()
            assert info.status == "suspended"
            assert info.attempt == 1
        async with running_worker(v1):
            assert await old.result(timeout=20) == "v1"
        old_info = await old.info()
    assert ran == [("new", "v2"), ("old", "v1")]
    assert old_info.pinned
    assert set(old_info.versions) == {"v1"}


def _five_steps(app: durable.App, ran: Counter[str], broken: set[int]) -> None:
    async def numbered(run: str, i: int) -> int:
        ran[f"{run}:{i}"] += 1
        if i in broken:
            raise RuntimeError(f"step {i} is broken")
        return i * 10

    @app.function(name="five")
    async def five(ctx: durable.Context, run: str) -> list[int]:
        return [await ctx.step(f"step-{i}", numbered, run, i) for i in range(1, 6)]


async def test_a_fork_from_step_3_runs_steps_3_to_5_and_leaves_the_original_alone(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    app = make_app(database_url)
    _five_steps(app, ran, set())
    async with app, running_worker(app):
        run = await app.start("five", "r")
        assert await run.result(timeout=20) == [10, 20, 30, 40, 50]
        before = await run.journal()
        fork = await run.fork(from_step="step-3")
        assert await fork.result(timeout=20) == [10, 20, 30, 40, 50]
        fork_info, fork_journal = await fork.info(), await fork.journal()
        after = await run.journal()
    assert [ran[f"r:{i}"] for i in range(1, 6)] == [1, 1, 2, 2, 2]
    assert after == before
    assert fork_info.forked_from == run.run_id
    assert fork_info.fork_position == "2"
    assert [(e.name, e.attempt) for e in fork_journal][:2] == [("step-1", 0), ("step-2", 0)]
    assert [e.name for e in fork_journal] == [f"step-{i}" for i in range(1, 6)]


async def test_a_fork_takes_a_position_or_a_new_input_and_refuses_unknown_points(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    app = make_app(database_url)
    _five_steps(app, ran, set())
    async with app, running_worker(app):
        run = await app.start("five", "r")
        await run.result(timeout=20)
        fork = await run.fork(from_position="4", input="other")
        assert await fork.result(timeout=20) == [10, 20, 30, 40, 50]
        assert (await fork.info()).input == "other"
        with pytest.raises(InvalidInput, match="no step 'ship'"):
            await run.fork(from_step="ship")
        with pytest.raises(InvalidInput, match="position '9'"):
            await run.fork(from_position="9")
        with pytest.raises(InvalidInput, match="not both"):
            await run.fork(from_step="step-1", from_position="0")
        with pytest.raises(durable.RunNotFound):
            await app.get_run(uuid.uuid4()).fork()
    assert ran["other:5"] == 1
    assert ran["other:1"] == 0


async def test_a_retry_runs_a_failed_run_again_from_its_failed_step(database_url: str) -> None:
    ran: Counter[str] = Counter()
    broken = {4}
    app = make_app(database_url)
    _five_steps(app, ran, broken)
    async with app, running_worker(app):
        run = await app.start("five", "r")
        with pytest.raises(durable.RunFailed):
            await run.result(timeout=20)
        with pytest.raises(InvalidInput, match="only a failed, cancelled or timed-out run"):
            await app.retry_run((await app.start("five", "fine-later")).run_id)
        broken.clear()  # the bug is fixed
        retried = await app.retry_run(run.run_id)
        assert await retried.result(timeout=20) == [10, 20, 30, 40, 50]
        info = await retried.info()
        assert await run.status() == "failed"
    assert [ran[f"r:{i}"] for i in range(1, 6)] == [1, 1, 1, 2, 1]
    assert info.forked_from == run.run_id
    assert info.fork_position == "3"


async def test_select_runs_pages_through_runs_of_a_status_and_function(database_url: str) -> None:
    ran: Counter[str] = Counter()
    app = make_app(database_url)
    _five_steps(app, ran, {1})
    async with app, running_worker(app):
        runs = [await app.start("five", f"r{i}") for i in range(7)]
        for run in runs:
            with pytest.raises(durable.RunFailed):
                await run.result(timeout=20)
        found = [i.run_id async for i in app.select_runs(["failed"], function="five")]
        none = [i async for i in app.select_runs(["failed"], function="other")]
        recent = [i async for i in app.select_runs(["failed"], within=timedelta(hours=1))]
        with pytest.raises(InvalidInput, match="not a run status"):
            [i async for i in app.select_runs(["broken"])]
    assert sorted(found) == sorted(r.run_id for r in runs)
    assert none == []
    assert len(recent) == 7


async def test_runs_already_retried_are_left_out_of_a_selection_of_unforked_runs(
    database_url: str,
) -> None:
    ran: Counter[str] = Counter()
    app = make_app(database_url)
    _five_steps(app, ran, {1})
    async with app, running_worker(app):
        runs = [await app.start("five", f"r{i}") for i in range(3)]
        for run in runs:
            with pytest.raises(durable.RunFailed):
                await run.result(timeout=20)
        retry = await app.retry_run(runs[0].run_id)  # its step 1 fails again: still the bug
        with pytest.raises(durable.RunFailed):
            await retry.result(timeout=20)
        unforked = {i.run_id async for i in app.select_runs(["failed"], forked=False)}
        forked = [i.run_id async for i in app.select_runs(["failed"], forked=True)]
    assert unforked == {runs[1].run_id, runs[2].run_id, retry.run_id}
    assert forked == [runs[0].run_id]


async def test_a_non_determinism_error_still_pauses_a_run_on_unpatched_code(
    database_url: str,
) -> None:
    # The rule patches build on: a changed journaled call pauses, it does not replay wrong.
    ran: Counter[str] = Counter()
    v1, bad = make_app(database_url), make_app(database_url)
    _approval_v1(v1, ran)
    _renamed(bad, ran, patch=False)
    async with v1, bad:
        async with running_worker(v1):
            run = await v1.start("approval", "r")
            await v1.send_event("decision", "yes", key="r")
            await run.result(timeout=20)
        fork = await run.fork()
        async with running_worker(bad):
            await until(lambda: status_is(fork, "paused"), what="paused")
        error = (await fork.info()).error
    assert error is not None
    assert error.type == NonDeterminismError.__name__
    assert "'notify'" in error.message
    assert "'send-notice'" in error.message
