"""A process using the embedded server keeps it running: the keeper restarts a killed server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import durable
from durable import _embedded, _pg
from tests.conftest import embedded_base
from tests.helpers import until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def base() -> Iterator[Path]:
    with embedded_base("durable-keeper-") as path:
        yield path


def _long(base: Path) -> Path:
    """A base whose socket cannot live in the data directory (a directory in /tmp instead)."""
    path = base / ("long-" + "k" * 80)
    path.mkdir()
    path.chmod(0o711)
    return path


def _said(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


async def _data_directory(dsn: str) -> Path:
    conn = await asyncpg.connect(dsn)
    try:
        return Path(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()


async def _start(where: Path) -> tuple[_pg.Control, _embedded.Server]:
    control = await asyncio.to_thread(_embedded.control_for, where)
    server = await asyncio.to_thread(_embedded.ensure_running, control, user_pid=os.getpid())
    return control, server


def _postmasters(data_dir: Path) -> list[int]:
    """The live postmasters of ``data_dir``: ``postgres -D <data_dir>``, not zombies."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"postgres") and args[1:3] == [b"-D", str(data_dir).encode()]:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize(
    ("socket", "watching"),
    [("in the data dir", "pidfd"), ("in /tmp", "pidfd"), ("in the data dir", "polling")],
)
async def test_a_killed_server_is_restarted_once_at_the_same_dsn(
    base: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    socket: str,
    watching: str,
) -> None:
    if watching == "polling":  # as on a kernel without pidfds
        monkeypatch.delattr(os, "pidfd_open")
    caplog.set_level(logging.WARNING, logger="durable._embedded")
    control, server = await _start(_long(base) if socket == "in /tmp" else base)
    keeper = asyncio.create_task(_embedded.Keeper(control, poll_seconds=0.1).watch(server))
    try:
        os.kill(server.pid, signal.SIGKILL)
        await until(lambda: _said(caplog, "running again"), timeout=90, what="the server back")
        assert _said(caplog, "exited") == [
            f"the embedded PostgreSQL (pid {server.pid}, data dir {server.data_dir}) exited; "
            f"restarting it"
        ]
        back = await asyncio.to_thread(control.running_pid)
        assert back is not None
        assert back != server.pid
        assert _postmasters(server.data_dir) == [back]
        assert await _data_directory(server.dsn) == server.data_dir.resolve()  # the same DSN
        assert not keeper.done()
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await asyncio.to_thread(_embedded.release, control, os.getpid())


async def test_two_keepers_of_one_server_bring_back_one_server(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="durable._embedded")
    control, server = await _start(base)
    keepers = [
        asyncio.create_task(_embedded.Keeper(control).watch(server)),
        asyncio.create_task(
            _embedded.Keeper(await asyncio.to_thread(_embedded.control_for, base)).watch(server)
        ),
    ]
    try:
        os.kill(server.pid, signal.SIGKILL)
        await until(lambda: len(_said(caplog, "running again")) == 2, timeout=90)
        assert len(_said(caplog, "exited")) == 2  # one each
        pids = {message.split("pid ")[1].split(",")[0] for message in _said(caplog, "again")}
        assert len(pids) == 1, "each keeper started a server of its own"
        assert len(_postmasters(server.data_dir)) == 1
        assert await _data_directory(server.dsn) == server.data_dir.resolve()
    finally:
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        await asyncio.to_thread(_embedded.release, control, os.getpid())


async def test_a_server_whose_data_directory_was_removed_is_not_started_empty(
    base: Path,
) -> None:
    """Starting would initdb a new, empty cluster at the same address, and the app would go on
    against a database that lost every run: the keeper refuses instead."""
    control, server = await _start(base)
    keeper = asyncio.create_task(_embedded.Keeper(control).watch(server))
    await asyncio.to_thread(shutil.rmtree, server.data_dir)  # removed under the server,
    os.kill(server.pid, signal.SIGKILL)  # which then dies
    with pytest.raises(durable.EmbeddedPostgresError, match="is gone") as error:
        await asyncio.wait_for(keeper, 90)
    assert str(server.data_dir) in str(error.value)
    assert not server.data_dir.exists()


async def test_a_server_that_cannot_come_back_ends_the_keeper_with_a_one_line_error(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="durable._embedded")
    control, server = await _start(base)
    keeper = asyncio.create_task(_embedded.Keeper(control).watch(server))
    (server.data_dir / "PG_VERSION").write_text("9\n")  # the restart will refuse this cluster
    os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(durable.EmbeddedPostgresError, match="could not be restarted") as error:
        await asyncio.wait_for(keeper, 90)
    assert str(server.data_dir) in str(error.value)
    assert "\n" not in str(error.value)
    assert len(_said(caplog, "exited")) == 1


async def test_keep_watches_the_server_this_process_acquired_until_cancelled(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="durable._embedded")
    _control, server = await _start(base)
    keeping = asyncio.create_task(_embedded.keep(server))
    os.kill(server.pid, signal.SIGKILL)
    await until(lambda: _said(caplog, "running again"), timeout=90, what="the server back")
    assert await _data_directory(server.dsn) == server.data_dir.resolve()
    keeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await keeping
