"""Break the engine on purpose, one way at a time, and check that the tests notice.

    scripts/mutants [NAME ...]          (all mutations when no name is given)

Each mutation is applied to a scratch copy of the tree (tracked files, and untracked ones that
are not ignored); its tests then run on the copy against $DURABLE_TEST_DATABASE_URL (or the
embedded server). A mutation is "caught" when at least one of its tests fails, and the failing
tests are listed.

Each mutation names the fewest tests that catch it, each one failing by a wide margin rather
than by chance, so that the whole run takes about a minute: the broad fault suite would take
several, and many of its tests catch a mutation only by running into their timeouts. Before any
mutation, the tests of the chosen mutations run once on an unmutated copy: a test that fails
there would make every verdict meaningless. When you change a mutation or its tests, check that
it is still caught on its own (scripts/mutants NAME).

Exit status: 0 when every mutation is caught, 1 when one survives (or its tests could not run),
2 when the tests fail without any mutation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRASHES = "tests/acceptance/test_crashes.py"
FAULTS = "tests/acceptance/test_faults.py"
FENCING = "tests/acceptance/test_fencing.py"
FLOW = "tests/acceptance/test_flow_control.py"
# Every SQL function is defined once, in this file: one edit breaks it wherever it is used.
FUNCTIONS = "engine/sql/functions.sql"
VERSIONS = "tests/integration/test_versions.py"
VERSIONS_CONTRACT = "tests/contract/test_versions_contract.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    edits: list[tuple[str, str, str]]  # (file, text, replacement)
    tests: list[str]


MUTATIONS = [
    Mutation(
        "skip-fencing",
        "every write believes it still holds the claim (held_segment finds the run at any attempt)",
        [
            (
                FUNCTIONS,
                "     WHERE r.id = p_run AND r.attempt = p_attempt AND r.status = 'running'\n"
                "       FOR SHARE;\n    RETURN v_segment;",
                "     WHERE r.id = p_run\n       FOR SHARE;\n    RETURN v_segment;",
            )
        ],
        # One zombie write per function that held_segment fences (sleep, event, child start
        # and join); each catches it alone. Steps are fenced inside append_entries instead.
        [FENCING],
    ),
    Mutation(
        "no-new-attempt",
        "a claim keeps the attempt number, so the old holder's fencing token stays valid",
        [(FUNCTIONS, "attempt = r.attempt + 1,", "attempt = r.attempt,")],
        [f"{CRASHES}::test_a_stopped_worker_past_its_lease_cannot_append_after_a_takeover"],
    ),
    Mutation(
        "claim-held-runs",
        "a claim takes runs whose lease has not expired (a live worker's runs)",
        [(FUNCTIONS, "AND r.available_at <= v_now", "")],
        # Three workers with free slots take each other's runs: hundreds of steps run again.
        [f"{FAULTS}::test_runs_under_random_sigkills_complete_exactly_once_with_the_right_result"],
    ),
    Mutation(
        "ignore-concurrency-limits",
        "a claim always finds a free slot for a concurrency key",
        [(FUNCTIONS, ">= p_limit THEN\n        RETURN false;", ">= 0 THEN\n        NULL;")],
        [f"{FLOW}::test_a_global_limit_holds_across_three_worker_processes"],
    ),
    Mutation(
        "early-rate-reservation",
        "a waiter's units are reserved half a period too early",
        [
            (
                FUNCTIONS,
                "v_grant.granted_at + v_limit.period);",
                "v_grant.granted_at + v_limit.period / 2);",
            )
        ],
        [f"{FLOW}::test_a_rate_limit_of_ten_per_second_is_never_exceeded_in_any_one_second_window"],
    ),
    Mutation(
        "ack-before-commit",
        "a step returns as soon as its entry is queued, before the statement commits",
        [("engine/_group_commit.py", "return await future\n", 'return "written"\n')],
        # The first write's caller must still wait while its statement is held. Deterministic,
        # where the tests with worker processes catch this only when a kill or a run's end
        # happens to meet a statement in flight.
        [
            "tests/unit/test_group_commit.py::test_writes_made_during_a_commit_share_the_next_statement"
        ],
    ),
    Mutation(
        "rerun-journaled-step",
        "replay runs a journaled step's body again instead of returning its result",
        [
            (
                "engine/_context.py",
                'entry = state.recorded(position, "step", name)',
                'entry = state.recorded(position, "step", name) and None',
            )
        ],
        # A replayed step is written again and refused, so the run never ends: a simulation on
        # Postgres gives up after 1000 attempts in seconds, where a test with worker processes
        # waits for its timeout.
        [
            "tests/integration/test_testing_on_postgres.py::"
            "test_a_simulation_on_postgres_sleeps_a_week_on_the_virtual_clock"
        ],
    ),
    Mutation(
        "ignore-pinning",
        "any worker claims a pinned run, whatever version of the code it started on",
        [(FUNCTIONS, "SELECT NOT p_pinned OR cardinality", "SELECT true OR cardinality")],
        [f"{VERSIONS_CONTRACT}::test_a_pinned_run_is_claimed_only_at_the_version_it_started_on"],
    ),
    Mutation(
        "patch-always-new",
        "a run that went past a patch point before the patch existed takes the new branch",
        [
            (
                "engine/_patches.py",
                "return False  # the run went past",
                "return True  # the run went past",
            )
        ],
        [f"{VERSIONS}::test_old_runs_take_the_old_branch_and_new_runs_the_new_one"],
    ),
]


def tracked_copy(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def apply(mutation: Mutation, tree: Path) -> None:
    for name, before, after in mutation.edits:
        path = tree / name
        text = path.read_text()
        if before not in text:
            raise SystemExit(f"{mutation.name}: {before!r} not found in {name}")
        path.write_text(text.replace(before, after))


def pytest(tests: list[str], tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )


def failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)


def tail(result: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def control(tests: list[str]) -> bool:
    """The tests pass on an unmutated copy: otherwise a failure proves nothing about a mutation."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="durable-mutant-control-") as scratch:
        tree = Path(scratch)
        tracked_copy(tree)
        result = pytest(tests, tree)
    print(f"control: {len(tests)} tests, unmutated ({time.monotonic() - started:.0f}s)")
    if result.returncode == 0:
        return True
    print("    the tests fail without any mutation:")
    for test in failures(result):
        print(f"    failed: {test}")
    print(tail(result))
    return False


def run(mutation: Mutation) -> bool:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"durable-mutant-{mutation.name}-") as scratch:
        tree = Path(scratch)
        tracked_copy(tree)
        apply(mutation, tree)
        result = pytest(mutation.tests, tree)
    # 1: tests ran and some failed. 0 or 5 (nothing collected): the mutation went unnoticed.
    # Anything else (a test id that does not exist, an internal error) proves nothing either.
    verdict = {1: "caught", 0: "SURVIVED", 5: "SURVIVED"}.get(
        result.returncode, f"NOT TESTED (pytest exit status {result.returncode})"
    )
    print(f"{mutation.name}: {verdict} ({mutation.what}) ({time.monotonic() - started:.0f}s)")
    for test in failures(result):
        print(f"    failed: {test}")
    if verdict.startswith("NOT TESTED"):
        print(tail(result))
    return verdict == "caught"


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    if names and len(chosen) != len(names):
        known = ", ".join(m.name for m in MUTATIONS)
        raise SystemExit(f"unknown mutation in {names}; known: {known}")
    if not control(list(dict.fromkeys(t for m in chosen for t in m.tests))):
        return 2
    survived = [m.name for m in chosen if not run(m)]
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
