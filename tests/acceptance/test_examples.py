"""Every example runs to its end on a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, database_url: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        env={**os.environ, "DURABLE_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_onboarding_example_nudges_only_the_user_who_did_not_upgrade(
    database_url: str,
) -> None:
    out = _run("onboarding.py", database_url)
    assert "ada: {'upgraded': True}" in out
    assert "bob: {'upgraded': False}" in out
    assert "email 'upgrade' to bob@example.com" in out
    assert "email 'upgrade' to ada" not in out


def test_the_order_example_refunds_once_when_shipping_fails(database_url: str) -> None:
    out = _run("order.py", database_url)
    assert "o-1: {'status': 'shipped'" in out
    assert "'status': 'refunded'" in out
    assert out.count("-> refund") == 1
    assert out.count("-> ship o-2") == 3  # the first attempt and two retries


def test_the_approval_example_escalates_the_silent_review(database_url: str) -> None:
    out = _run("approval.py", database_url)
    assert "doc-1: approved" in out
    assert "doc-2: escalated" in out


def test_the_approval_upgrade_example_keeps_the_waiting_run_on_the_old_branch(
    database_url: str,
) -> None:
    out = _run("approval_upgrade.py", database_url)
    assert "every run replays on this code" in out
    assert "doc-1 (started on release 1, no budget check): approved" in out
    assert "doc-2 (started on release 2, budget checked): approved" in out
    assert "doc-1 ran on: release-1, release-2" in out


def test_the_crash_demo_finishes_without_repeating_journaled_steps(database_url: str) -> None:
    out = _run("crash_demo.py", database_url)
    assert "killed worker" in out
    assert "steps 1-3 ran exactly once" in out
