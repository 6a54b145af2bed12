"""The test fixtures' embedded servers leave nothing behind: not after a pass, a failure or a
Ctrl-C. Each case runs pytest on a small test file, with TMPDIR pointed at a fresh directory
that must be empty afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

# Every fixture that starts an embedded server: the session's (through database_url), the
# embedded tests' base directory, and the fault suite's server of its own.
SMALL_TEST = """
import asyncio
import faulthandler
import os
import signal
from pathlib import Path

import asyncpg

from durable import _embedded
from tests.acceptance.test_faults import own_server
from tests.integration.test_embedded import base  # noqa: F401 (the fixture)

# Ctrl-C as in a terminal, whatever this process inherited: a shell that starts a job in the
# background without job control starts it with SIGINT ignored, and so every process below it.
signal.signal(signal.SIGINT, signal.default_int_handler)
# Where every thread is, if it hangs: to a file of its own (pytest captures fd 2).
faulthandler.register(signal.SIGUSR1, open(os.environ["SMALL_TEST_STACKS"], "w"), all_threads=True)


async def test_every_embedded_fixture(database_url: str, base: Path) -> None:
    control = await asyncio.to_thread(_embedded.control_for, base)
    await asyncio.to_thread(_embedded.ensure_running, control)
    async with own_server() as (dsn, _control):
        for url in (database_url, dsn):
            conn = await asyncpg.connect(url)
            await conn.close()
        assert os.environ["SMALL_TEST_ENDS"] != "failing", "failing on purpose"
        if os.environ["SMALL_TEST_ENDS"] == "interrupted":
            Path(os.environ["SMALL_TEST_MARKER"]).write_text("every server is running")
            await asyncio.Event().wait()  # until Ctrl-C
"""


@pytest.fixture
def tmpdir_for_run() -> Iterator[Path]:
    """A fresh directory for the run's TMPDIR (0711: the server's user must traverse it)."""
    path = Path(tempfile.mkdtemp(prefix="cleanup-check-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(tmp_path: Path, tmpdir: Path, ends: str) -> subprocess.Popen[str]:
    test_file = tmp_path / "test_small.py"
    test_file.write_text(SMALL_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
    env |= {
        "TMPDIR": str(tmpdir),
        "PYTHONPATH": str(ROOT),
        "SMALL_TEST_ENDS": ends,
        "SMALL_TEST_MARKER": str(tmp_path / "marker"),
        "SMALL_TEST_STACKS": str(tmp_path / "stacks"),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(marker: Path, run: subprocess.Popen[str], timeout: float = 120) -> None:
    """Return once the small test wrote ``marker``; fail if the run ends or times out first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert run.poll() is None, f"the run ended before the marker: {run.communicate()[0]}"
        assert time.monotonic() < deadline, "the small test never wrote its marker"
        time.sleep(0.02)


def _servers_in(folder: Path) -> list[int]:
    """Server processes (postmasters and their children) working in ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(folder.resolve()):
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize(("ends", "status"), [("passing", 0), ("failing", 1), ("interrupted", 2)])
def test_the_embedded_fixtures_leave_nothing_in_tmpdir(
    tmp_path: Path, tmpdir_for_run: Path, ends: str, status: int
) -> None:
    run = _run(tmp_path, tmpdir_for_run, ends)
    try:
        if ends == "interrupted":
            _wait_for(tmp_path / "marker", run)
            run.send_signal(signal.SIGINT)  # what Ctrl-C sends to pytest
        try:
            output, _ = run.communicate(timeout=90)  # within the test's own timeout
        except subprocess.TimeoutExpired:
            alive = run.poll() is None
            tree = subprocess.run(
                ["ps", "-eo", "pid,ppid,stat,args"], capture_output=True, text=True, check=False
            ).stdout
            run.send_signal(signal.SIGUSR1)  # its threads' stacks, to the stacks file
            time.sleep(2)
            run.kill()
            output, _ = run.communicate()
            stacks = tmp_path / "stacks"
            state = "still ran" if alive else "had exited"
            dump = stacks.read_text() if stacks.exists() else ""
            message = (
                f"the {ends} run did not end in 90 s (its process {state}); it printed:\n"
                f"{output}\nits stacks:\n{dump}\nprocesses:\n{tree}"
            )
            raise AssertionError(message) from None
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == status, output
    assert _servers_in(tmpdir_for_run) == [], output
    assert sorted(p.name for p in tmpdir_for_run.iterdir()) == [], output
