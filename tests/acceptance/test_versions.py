"""Deploys under runs in flight, with worker processes on real Postgres: each deploy kills the
old workers and starts workers on the new code (tests.acceptance.versioned_app, whose
$VARIANT is the code and its version)."""

from __future__ import annotations

import functools
import re
import uuid
from typing import Any

import pytest

import durable
from tests.acceptance.conftest import Workers
from tests.helpers import status_is, until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

APP = "tests.acceptance.versioned_app:app"


def deploy(workers: Workers, variant: str, processes: int = 2) -> None:
    """Kill every worker running, then start ``processes`` workers of ``variant``."""
    workers.stop_all()
    for _ in range(processes):
        workers.start(app=APP, VARIANT=variant)


async def _journaled(handle: durable.RunHandle[Any], name: str) -> bool:
    return any(e.name == name for e in await handle.journal())


async def _suspended_after(handle: durable.RunHandle[Any], name: str | None) -> bool:
    if await handle.status() != "suspended":
        return False
    return name is None or await _journaled(handle, name)


async def _start_at_points(
    app: durable.App, tag: str, per_point: int = 2
) -> dict[str, list[durable.RunHandle[Any]]]:
    """Runs of "approval" suspended at each of its waits: "before" the changed steps (on
    "filed"), "between" them (on "decision", right after the patch point) and "after" them
    (on "archive", past "notify")."""
    points: dict[str, list[durable.RunHandle[Any]]] = {}
    for point, events in (
        ("before", ()),
        ("between", ("filed",)),
        ("after", ("filed", "decision")),
    ):
        points[point] = []
        for i in range(per_point):
            key = f"{tag}-{point}-{i}"
            handle = await app.start("approval", key)
            for event in events:
                await app.send_event(event, "yes", key=key)
            points[point].append(handle)
    for point, last in (("before", None), ("between", "submit"), ("after", "notify")):
        for handle in points[point]:
            await until(
                functools.partial(_suspended_after, handle, last),
                timeout=60,
                what=f"a run waiting {point} the changed steps",
            )
    return points


def _key(info: durable.RunInfo) -> str:
    return str(info.input)


async def test_runs_suspended_anywhere_on_v1_finish_on_v2_with_a_patched_step(
    workers: Workers, database_url: str
) -> None:
    deploy(workers, "v1")
    async with durable.App(database_url) as app:
        old = await _start_at_points(app, "old")
        deploy(workers, "v2")
        new = [await app.start("approval", f"new-{i}") for i in range(2)]
        runs = [*old["before"], *old["between"], *old["after"], *new]
        for handle in runs:
            key = _key(await handle.info())
            for event in ("filed", "decision", "archive"):
                await app.send_event(event, "yes", key=key)
        results = {_key(await h.info()): await h.result(timeout=60) for h in runs}
        infos = {_key(await h.info()): await h.info() for h in runs}
    # Runs that passed the patch point on v1 take the old branch; a run that reaches it live
    # on v2 (an old run still before it, or a new run) takes the new one.
    with_risk = ["submit", "risk-check", "notify", "archive", "yes"]
    without = ["submit", "notify", "archive", "yes"]
    for key, result in results.items():
        expected = without if "between" in key or "after" in key else with_risk
        assert result == expected, key
    # Nothing paused, nothing ran twice: one line per step of each run.
    for key, result in results.items():
        for step in result[:-1]:
            assert workers.count(f"{key}:{step}") == 1, (key, step)
        assert workers.count(f"{key}:risk-check") == (1 if "risk-check" in result else 0)
    for key, info in infos.items():
        assert info.versions[-1] == "v2"
        assert info.version == ("v2" if key.startswith("new") else "v1"), key


async def test_a_rename_fails_the_check_and_a_fixed_deploy_resumes_what_the_bad_one_paused(
    workers: Workers, database_url: str
) -> None:
    deploy(workers, "v1")
    async with durable.App(database_url) as app:
        points = await _start_at_points(app, "r")
        workers.stop_all()
        journals = {h.run_id: await h.journal() for hs in points.values() for h in hs}

        # The check, before any worker of the new code starts.
        bad = workers.cli("check", APP, VARIANT="v2-rename")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        affected = {str(h.run_id) for h in points["after"]}
        listed = set(re.findall(r"[0-9a-f]{8}-[0-9a-f-]{27}", bad.stdout))
        assert listed == affected, bad.stdout
        assert "at position 3, the journal has step 'notify', the code asks for step " in (
            bad.stdout
        )
        assert "(2 runs)" in bad.stdout
        good = workers.cli("check", APP, VARIANT="v2-rename-patched")
        assert good.returncode == 0, good.stdout + good.stderr
        assert "checked 6 runs (6 suspended)" in good.stdout
        assert "every run replays on this code" in good.stdout
        # The checks read only.
        for handle in (h for hs in points.values() for h in hs):
            assert await handle.journal() == journals[handle.run_id]
            assert await handle.status() == "suspended"

        # Deployed anyway: the runs past "notify" pause when they replay.
        deploy(workers, "v2-rename")
        for handle in points["after"]:
            await app.send_event("archive", None, key=_key(await handle.info()))
        for handle in points["after"]:
            await until(functools.partial(status_is, handle, "paused"), timeout=60)
        # The fix: its workers try the paused runs again, with no command.
        deploy(workers, "v2-rename-patched")
        results = [await h.result(timeout=60) for h in points["after"]]
        infos = [await h.info() for h in points["after"]]
    assert results == [["submit", "notify", "archive", "yes"]] * 2
    for info in infos:
        key = _key(info)
        assert workers.lines(f"{key}:notify") == ["v1"]
        assert workers.lines(f"{key}:archive") == ["v2-rename-patched"]
        assert workers.count(f"{key}:send-notice") == 0
        assert [v for v in dict.fromkeys(info.versions)] == ["v1", "v2-rename", "v2-rename-patched"]


def _in_flight(listing: str, version: str) -> str:
    """What ``durable versions`` says is in flight for ``version`` of pinned_flow."""
    section = listing.split("pinned_flow", 1)[1]
    match = re.search(rf"^\s+{re.escape(version)}\s.*in flight: ([^;]+);", section, re.M)
    assert match, listing
    return match.group(1)


async def test_pinned_runs_stay_on_their_version_while_v1_and_v2_run_side_by_side(
    workers: Workers, database_url: str
) -> None:
    workers.start(app=APP, VARIANT="v1")
    async with durable.App(database_url) as app:
        old = [await app.start("pinned_flow", f"old-{i}") for i in range(10)]
        for handle in old:
            await until(functools.partial(status_is, handle, "suspended"), timeout=60)
        workers.start(app=APP, VARIANT="v2")  # beside v1, which keeps running
        before = workers.cli("versions", APP, VARIANT="v2")
        assert before.returncode == 0, before.stderr
        assert _in_flight(before.stdout, "v1") == "10 suspended"
        new = [await app.start("pinned_flow", f"new-{i}") for i in range(10)]
        for handle in [*old, *new]:
            await app.send_event("go", None, key=_key(await handle.info()))
        results = [await h.result(timeout=60) for h in [*old, *new]]
        infos = [await h.info() for h in [*old, *new]]
        after = workers.cli("versions", APP, VARIANT="v2")
    assert results[:10] == ["v1"] * 10
    for info, result in zip(infos, results, strict=True):
        key = _key(info)
        # Each run's every attempt and every step ran on the version it started on.
        assert set(info.versions) == {result}, key
        assert workers.lines(f"{key}:begin") == [result]
        assert workers.lines(f"{key}:end") == [result]
    assert _in_flight(after.stdout, "v1") == "none"
    assert "pinned_flow v1" in after.stdout.split("safe to retire")[0].split("\n")[-1]


def _created(output: str) -> list[uuid.UUID]:
    return [uuid.UUID(m) for m in re.findall(r"as run ([0-9a-f-]{36})", output)]


async def test_fork_from_step_3_runs_steps_3_to_5_and_retry_runs_from_the_failed_step(
    workers: Workers, database_url: str
) -> None:
    deploy(workers, "v1")
    async with durable.App(database_url) as app:
        done = await app.start("five", "ok")
        assert await done.result(timeout=60) == [10, 20, 30, 40, 50]
        forked = workers.cli("runs", "fork", str(done.run_id), "--from-step", "step-3")
        assert forked.returncode == 0, forked.stderr
        [fork_id] = _created(forked.stdout)
        assert await app.get_run(fork_id).result(timeout=60) == [10, 20, 30, 40, 50]
        shown = workers.cli("runs", "show", str(fork_id))

        failed = await app.start("five", "bug-1")
        with pytest.raises(durable.RunFailed, match="step 4 has a bug"):
            await failed.result(timeout=60)
        deploy(workers, "v2")  # the bug is fixed
        retried = workers.cli("runs", "retry", str(failed.run_id))
        assert retried.returncode == 0, retried.stderr
        [retry_id] = _created(retried.stdout)
        assert await app.get_run(retry_id).result(timeout=60) == [10, 20, 30, 40, 50]
        assert await failed.status() == "failed"  # the original is untouched
    assert [workers.count(f"ok:step-{i}") for i in range(1, 6)] == [1, 1, 2, 2, 2]
    assert f"forked from: run {done.run_id}, its journal up to position 2" in shown.stdout
    assert [workers.lines(f"bug-1:step-{i}") for i in range(1, 6)] == [
        ["v1"],
        ["v1"],
        ["v1"],
        ["v1", "v2"],
        ["v2"],
    ]


async def test_a_bulk_retry_of_100_failed_runs_counts_them_first_and_completes_all(
    workers: Workers, database_url: str
) -> None:
    deploy(workers, "v1")
    async with durable.App(database_url) as app:
        runs = [await app.start("five", f"bug-{i}") for i in range(100)]
        for handle in runs:
            await until(functools.partial(status_is, handle, "failed"), timeout=120)
        deploy(workers, "v2")
        dry = workers.cli("runs", "retry", "--status", "failed", "--function", "five", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.strip() == "100 failed runs of 'five' not retried yet"
        bulk = workers.cli(
            "runs", "retry", "--status", "failed", "--function", "five", "--since", "1h"
        )
        assert bulk.returncode == 0, bulk.stderr
        first = bulk.stdout.splitlines()[0]
        assert first == "100 failed runs of 'five' created in the last 1h not retried yet"
        created = _created(bulk.stdout)
        assert len(created) == 100
        results = [await app.get_run(run_id).result(timeout=120) for run_id in created]
    assert results == [[10, 20, 30, 40, 50]] * 100
    for i in range(100):
        assert workers.lines(f"bug-{i}:step-4") == ["v1", "v2"]
        assert workers.count(f"bug-{i}:step-3") == 1
