"""Break the engine on purpose, one way at a time, and check that the fault suite notices.

    scripts/mutants [NAME ...]          (all mutations when no name is given)

Each mutation is applied to a scratch copy of the tracked files; the fault suite then runs on
the copy against $DURABLE_TEST_DATABASE_URL (or the embedded server). A mutation is "caught"
when at least one test fails, and the failing tests are listed. Exit status 1 when any
mutation survives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_SUITE = ["tests/acceptance/test_faults.py", "tests/acceptance/test_crashes.py"]
SCHEMA_FILES = ["engine/sql/schema.sql", "engine/sql/migrations/0001_create_schema.sql"]
FLOW_FILES = ["engine/sql/schema.sql", "engine/sql/migrations/0007_add_flow_control.sql"]
FLOW_SUITE = "tests/acceptance/test_flow_control.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    edits: list[tuple[str, str, str]]  # (file, text, replacement)
    tests: list[str]


def everywhere(files: list[str], before: str, after: str) -> list[tuple[str, str, str]]:
    return [(name, before, after) for name in files]


MUTATIONS = [
    Mutation(
        "skip-fencing",
        "every write believes it still holds the claim (hold_claim returns true)",
        everywhere(
            SCHEMA_FILES,
            "       FOR SHARE;\n    RETURN FOUND;",
            "       FOR SHARE;\n    RETURN true;",
        ),
        FAULT_SUITE,
    ),
    Mutation(
        "no-new-attempt",
        "a claim keeps the attempt number, so the old holder's fencing token stays valid",
        everywhere(
            [*FLOW_FILES, "engine/sql/migrations/0002_read_time_from_clock.sql"],
            "attempt = r.attempt + 1,",
            "attempt = r.attempt,",
        ),
        FAULT_SUITE,
    ),
    Mutation(
        "claim-held-runs",
        "a claim takes runs whose lease has not expired (a live worker's runs)",
        [
            ("engine/sql/migrations/0001_create_schema.sql", "AND r.available_at <= now()", ""),
            (
                "engine/sql/migrations/0002_read_time_from_clock.sql",
                "AND r.available_at <= durable.clock()",
                "",
            ),
            *everywhere(FLOW_FILES, "AND r.available_at <= v_now", ""),
        ],
        FAULT_SUITE,
    ),
    Mutation(
        "ignore-concurrency-limits",
        "a claim always finds a free slot for a concurrency key",
        everywhere(
            FLOW_FILES, ">= p_limit THEN\n        RETURN false;", ">= 0 THEN\n        NULL;"
        ),
        [
            f"{FLOW_SUITE}::test_a_per_key_limit_of_one_never_overlaps_a_key_and_serves_keys_in_turn",
            f"{FLOW_SUITE}::test_a_global_limit_holds_across_three_worker_processes",
        ],
    ),
    Mutation(
        "early-rate-reservation",
        "a waiter's units are reserved half a period too early",
        everywhere(
            FLOW_FILES,
            "v_grant.granted_at + v_limit.period);",
            "v_grant.granted_at + v_limit.period / 2);",
        ),
        [
            f"{FLOW_SUITE}::"
            "test_a_rate_limit_of_ten_per_second_is_never_exceeded_in_any_one_second_window"
        ],
    ),
    Mutation(
        "ack-before-commit",
        "a step returns as soon as its entry is queued, before the statement commits",
        [("engine/_group_commit.py", "return await future\n", 'return "written"\n')],
        [*FAULT_SUITE, "tests/integration/test_group_commit.py"],
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
        FAULT_SUITE,
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


def run(mutation: Mutation) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"durable-mutant-{mutation.name}-") as scratch:
        tree = Path(scratch)
        tracked_copy(tree)
        apply(mutation, tree)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    verdict = "caught" if result.returncode not in (0, 5) else "SURVIVED"
    print(f"{mutation.name}: {verdict} ({mutation.what})")
    for test in failed:
        print(f"    failed: {test}")
    return verdict == "caught"


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    if names and len(chosen) != len(names):
        known = ", ".join(m.name for m in MUTATIONS)
        raise SystemExit(f"unknown mutation in {names}; known: {known}")
    survived = [m.name for m in chosen if not run(m)]
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
