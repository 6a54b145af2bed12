"""A worker on the embedded PostgreSQL outlives a kill -9 of the server: it says so once,
restarts the server (it is the SDK's own), and its runs finish; when the server cannot be
restarted, the worker exits with one line saying why."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable
from durable import _embedded, _postmaster
from tests.acceptance.conftest import Workers, counted
from tests.conftest import embedded_base
from tests.helpers import until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

EXITED = "exited; restarting it"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_embedded.Server]:
    """An embedded server of this test's own, used by this process too (so that it is not
    stopped when the worker is the last one out). Tests ask for it before ``workers``, so that
    their worker processes are gone before it is stopped and removed (a worker would restart
    it)."""
    with embedded_base("durable-death-") as base:
        control = _embedded.control_for(base)
        yield _embedded.ensure_running(control, user_pid=os.getpid())
        _embedded.release(control, os.getpid())


async def test_a_worker_restarts_a_killed_embedded_server_once_and_its_run_finishes(
    server: _embedded.Server, workers: Workers
) -> None:
    worker = workers.start(DURABLE_DATABASE_URL="", DURABLE_DATA_DIR=str(server.base))
    async with durable.App(server.dsn) as app:
        run = await app.start("five_steps", "k")
        await until(counted(workers, "k-step-4"), timeout=60, what="step 4 running")
        postmaster = _postmaster.pidfile_pid(server.data_dir)
        assert postmaster is not None
        os.kill(postmaster, signal.SIGKILL)
        await until(lambda: "running again" in workers.log_of(worker), timeout=60, what="restarted")
        workers.open_gate("k-go")
        assert await run.result(timeout=60) == [10, 20, 30, 40, 50]
    log = workers.log_of(worker)
    assert log.count(EXITED) == 1, log
    assert f"(pid {postmaster}, data dir {server.data_dir}) exited" in log
    assert "Traceback" not in log, log


async def test_a_worker_whose_embedded_server_cannot_come_back_exits_with_one_line(
    server: _embedded.Server, workers: Workers
) -> None:
    worker = workers.start(DURABLE_DATABASE_URL="", DURABLE_DATA_DIR=str(server.base))
    await until(lambda: "serving" in workers.log_of(worker), timeout=60, what="the worker up")
    # The running server never reads this again; the restart will, and refuse the cluster.
    (server.data_dir / "PG_VERSION").write_text("9\n")
    postmaster = _postmaster.pidfile_pid(server.data_dir)
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)
    status = await asyncio.to_thread(worker.wait, 60)
    assert status == 2
    last = workers.log_of(worker).strip().splitlines()[-1]
    assert last.startswith("durable: the embedded PostgreSQL"), last
    assert "could not be restarted" in last
    assert "PostgreSQL 9 cluster" in last
