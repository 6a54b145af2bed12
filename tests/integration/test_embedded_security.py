"""The embedded PostgreSQL against hostile names, other local users and unusable directories.

As root, the server runs as an unprivileged user and its socket may live in /tmp, so the tests
play another local user: ``daemon`` plants links and directories, ``nobody`` (the server's own
user) tries to connect.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import durable
from durable import _binaries, _embedded, _pg
from tests.conftest import embedded_base

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
as_root = pytest.mark.skipif(os.getuid() != 0, reason="plays other users, which needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    with embedded_base("durable-security-") as path:
        yield path


@pytest.fixture
def daemon() -> pwd.struct_passwd:
    """Another local user, who must not be able to touch our server."""
    return pwd.getpwnam("daemon")


def _data_directory(dsn: str) -> Path:
    async def ask() -> Path:
        conn = await asyncpg.connect(dsn)
        try:
            return Path(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()

    return asyncio.run(ask())


def _traversable(path: Path) -> Path:
    """``path`` created with every new component 0711, so the server's user can reach it."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir()
        folder.chmod(0o711)
    return path


def _long(base: Path) -> Path:
    """A base directory whose socket path is too long for the data directory."""
    return _traversable(base / ("long-" + "b" * 80))


# -- A: no shell --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["x$(touch {marker})", "x`touch {marker}`", "it's a dir", "it's a $(touch {marker})"]
)
def test_a_data_directory_named_like_shell_code_starts_and_runs_nothing(
    base: Path, name: str
) -> None:
    drop = base / "drop"  # where the code in the name would write: the server's user may
    drop.mkdir()
    drop.chmod(0o1777)
    marker = drop / "pwned"
    control = _embedded.control_for(_traversable(base / name.format(marker=marker)))
    try:
        server: _embedded.Server | None = _embedded.ensure_running(control)
    except durable.EmbeddedPostgresError as exc:
        server, failure = None, exc
    assert not marker.exists(), "a shell ran part of the directory's name"
    assert server is not None, failure
    assert _data_directory(server.dsn) == server.data_dir.resolve()


def test_a_postmaster_that_exits_while_starting_is_reported_with_its_log(base: Path) -> None:
    control = _embedded.control_for(base)
    _embedded.ensure_running(control)
    control.stop()
    with (control.layout.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\nshared_buffers = 'plenty'\n")
    started = time.monotonic()
    with pytest.raises(durable.EmbeddedPostgresError, match="exited while starting") as error:
        _embedded.ensure_running(control)
    assert "shared_buffers" in str(error.value), "the log's tail is not in the message"
    assert "\n" not in str(error.value)
    assert time.monotonic() - started < 60, "the early exit was not noticed"


def test_the_server_gets_none_of_our_environment_but_the_locale_and_path(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DURABLE_TEST_SECRET", "hunter2")  # readable in /proc by its user
    server = _embedded.ensure_running(_embedded.control_for(base))
    environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert names <= {"PATH", "TZ", "LD_LIBRARY_PATH", "LC_ALL"}
    assert b"LC_ALL=C" in environ


# -- B: links and directories planted by another user --------------------------------------------


@as_root
def test_a_link_planted_where_the_socket_directory_used_to_be_changes_nothing(
    base: Path, daemon: pwd.struct_passwd
) -> None:
    where = _long(base)
    data_dir = _embedded.control_for(where).layout.data_dir
    target = base / "daemons-own"
    target.mkdir(mode=0o755)
    os.chown(target, daemon.pw_uid, daemon.pw_gid)
    # The name older versions derived from the data directory: anyone could compute it.
    predictable = Path("/tmp") / f"durable-{_binaries.digest(str(data_dir.resolve()))}"
    predictable.symlink_to(target)
    os.lchown(predictable, daemon.pw_uid, daemon.pw_gid)
    try:
        server = _embedded.ensure_running(_embedded.control_for(where))
        assert server.socket_dir != predictable
        assert _data_directory(server.dsn) == server.data_dir.resolve()
    finally:
        predictable.unlink()
    after = target.stat()
    assert (after.st_uid, oct(after.st_mode & 0o7777)) == (daemon.pw_uid, "0o755")


@as_root
@pytest.mark.parametrize("planted", ["link", "directory"])
def test_a_socket_directory_replaced_while_the_server_was_stopped_is_not_used(
    base: Path, daemon: pwd.struct_passwd, planted: str
) -> None:
    control = _embedded.control_for(_long(base))
    first = _embedded.ensure_running(control)
    control.stop()
    assert not first.socket_dir.exists(), "the socket directory outlived the server"
    target = base / "daemons-own"
    target.mkdir(mode=0o755)
    os.chown(target, daemon.pw_uid, daemon.pw_gid)
    if planted == "link":
        first.socket_dir.symlink_to(target)
    else:
        first.socket_dir.mkdir(mode=0o755)
    os.chown(first.socket_dir, daemon.pw_uid, daemon.pw_gid, follow_symlinks=False)
    try:
        second = _embedded.ensure_running(control)
        assert second.socket_dir != first.socket_dir
        assert _data_directory(second.dsn) == second.data_dir.resolve()
        control.stop()
        assert not second.socket_dir.exists()
        for path in (first.socket_dir, target):
            after = path.lstat()
            assert after.st_uid == daemon.pw_uid, f"{path} changed hands"
        assert oct(target.stat().st_mode & 0o7777) == "0o755"
    finally:
        if first.socket_dir.is_symlink():
            first.socket_dir.unlink()
        else:
            first.socket_dir.rmdir()


@as_root
def test_a_data_directory_that_is_a_link_is_refused_and_its_target_left_alone(
    base: Path, daemon: pwd.struct_passwd
) -> None:
    control = _embedded.control_for(base)
    target = base / "daemons-own"
    target.mkdir(mode=0o755)
    os.chown(target, daemon.pw_uid, daemon.pw_gid)
    control.layout.data_dir.symlink_to(target)
    with pytest.raises(durable.EmbeddedPostgresError, match="symbolic link"):
        _embedded.ensure_running(control)
    after = target.stat()
    assert (after.st_uid, oct(after.st_mode & 0o7777)) == (daemon.pw_uid, "0o755")


@as_root
@pytest.mark.parametrize("how", ["mode 0777", "mode 1777", "owned by daemon", "under daemon's"])
def test_a_base_directory_another_user_could_change_is_refused(
    base: Path, daemon: pwd.struct_passwd, how: str
) -> None:
    where = _traversable(base / "shared" / "durable")
    if how == "mode 0777":
        where.chmod(0o777)
    elif how == "mode 1777":
        where.chmod(0o1777)
    elif how == "owned by daemon":
        os.chown(where, daemon.pw_uid, daemon.pw_gid)
    else:
        os.chown(where.parent, daemon.pw_uid, daemon.pw_gid)
    with pytest.raises(durable.EmbeddedPostgresError, match="another user could change") as error:
        _embedded.ensure_running(_embedded.control_for(where))
    assert str(where) in str(error.value)
    assert not (where / f"pgdata-{_binaries.find_binaries().major}").exists()


def test_the_socket_directory_in_tmp_is_removed_when_the_server_stops(base: Path) -> None:
    control = _embedded.control_for(_long(base))
    server = _embedded.ensure_running(control)
    assert not server.socket_dir.is_relative_to(base)
    control.stop()
    assert not server.socket_dir.exists()


# -- C: only the user who started the server ------------------------------------------------------


def _psql_as_server_user(
    control: _pg.Control, socket_dir: Path
) -> subprocess.CompletedProcess[str]:
    """psql run by the server's own user (nobody, as root), connecting as the superuser."""
    who = control.who
    command = ["-X", "-h", str(socket_dir), "-p", str(_pg.PORT), "-U", "postgres", "-d", "durable"]
    return subprocess.run(
        [str(control.bin_dir / "psql"), *command, "-c", "SELECT 1"],
        user=who.uid,
        group=who.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether the server answered and refused (not: the socket was out of reach)."""
    return result.returncode != 0 and "Peer authentication failed" in result.stderr


@as_root
def test_a_process_of_the_server_user_cannot_connect_while_root_can(base: Path) -> None:
    control = _embedded.control_for(base)
    server = _embedded.ensure_running(control)
    assert control.who.name != "root"
    result = _psql_as_server_user(control, server.socket_dir)
    assert _refused(result), result
    assert _data_directory(server.dsn) == server.data_dir.resolve()


_TRUST = "local all all trust\n"  # what initdb -A trust wrote, in older versions


@as_root
def test_a_data_directory_that_trusted_every_local_user_is_locked_down_at_start(
    base: Path,
) -> None:
    control = _embedded.control_for(base)
    _embedded.ensure_running(control)
    control.stop()
    (control.layout.data_dir / "pg_hba.conf").write_text(_TRUST)
    server = _embedded.ensure_running(control)
    result = _psql_as_server_user(control, server.socket_dir)
    assert _refused(result), result


@as_root
def test_a_running_server_that_trusts_every_local_user_is_locked_down_on_attach(
    base: Path,
) -> None:
    control = _embedded.control_for(base)
    server = _embedded.ensure_running(control)
    (control.layout.data_dir / "pg_hba.conf").write_text(_TRUST)
    os.kill(server.pid, signal.SIGHUP)  # now it is like a server an older version started
    attached = _embedded.ensure_running(control)
    assert attached.pid == server.pid
    # The postmaster reloads on SIGHUP a moment later: wait for the refusal.
    deadline = time.monotonic() + 30
    result = _psql_as_server_user(control, server.socket_dir)
    while not _refused(result) and time.monotonic() < deadline:
        result = _psql_as_server_user(control, server.socket_dir)
    assert _refused(result), result
    assert _data_directory(server.dsn) == server.data_dir.resolve()


# -- F: unusable directories -------------------------------------------------------------------


def _unusable(base: Path, kind: str) -> Path:
    if kind == "a file":
        path = base / "a-file"
        path.write_text("")
        return path
    if kind == "under a file":
        (base / "a-file").write_text("")
        return base / "a-file" / "durable"
    if kind == "read-only":
        return Path("/sys")  # nobody, root included, may create anything there
    return Path("/proc/durable-nowhere/durable")  # a parent that cannot be created


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "uncreatable parent"])
def test_an_unusable_data_directory_is_named_in_a_one_line_error(base: Path, kind: str) -> None:
    path = _unusable(base, kind)
    with pytest.raises(durable.EmbeddedPostgresError) as error:
        _embedded.ensure_running(_embedded.control_for(path))
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)
    for command in ("start", "stop"):
        cli = subprocess.run(
            [sys.executable, "-m", "durable", "db", command],
            env={**os.environ, "DURABLE_DATA_DIR": str(path), "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cli.returncode == 2, cli  # a DurableError
        assert "Traceback" not in cli.stderr
        assert str(path) in cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
