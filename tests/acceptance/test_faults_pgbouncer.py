"""The fault suite again, with every worker process behind PgBouncer in transaction pooling
mode: SIGKILLs, dropped connections, skewed clocks, a kill under group commit, and a restart
of the database server, with nothing lost, duplicated or wrong.

The scenarios are ``test_faults.py``'s own test functions, imported: only the ``workers``
fixture differs. Its workers reach the database through PgBouncer (``tests/pgbouncer.py``: five
server connections per database, shared by three workers of ten pooled connections each), in
two ways: ``listen``, with a direct ``DURABLE_LISTEN_URL`` for notifications, and ``poll``,
with ``DURABLE_POOLED=1`` and no LISTEN at all, finding work every poll interval. The test's
own client, its tallies and the connections it terminates stay direct: what is under test is
the workers; dropping every backend of the database also drops PgBouncer's server connections
under them. The restart starts a server of its own, which no fixture can put PgBouncer in front
of, so it is composed here from the suite's parts.

Each session takes one of the two ways, so that CI, which runs the suite once on each server,
takes both for the price of one: ``listen`` on the embedded PostgreSQL, which is on this
machine, so a direct URL beside the pooler is always there (as it is where the embedded server
is deployed), and ``poll`` on the server of ``$DURABLE_TEST_DATABASE_URL``, the kind of server
that may be reachable only through its pooler. (The restart, on its own embedded server, takes
the session's way too.) To take both, or to choose one, in a run of your own:

    DURABLE_TEST_PGBOUNCER_MODES=listen,poll scripts/test tests/acceptance/test_faults_pgbouncer.py

Both ways are also covered on every run, cheaply, by ``tests/integration/test_pgbouncer.py``:
an in-process worker behind the pooler with no listen URL, which polls, and one that listens
on its listen URL.

One number differs: a worker started without a concurrency (the skewed clocks' two) gets 20
slots, not 4, so that the 40-run load beside the timers is claimed at once. Due runs are
claimed oldest first, and a timer falls due after the load was started: behind the pooler a
statement costs a round trip and a hop more, and on a busy machine the load, claimed in five
waves of eight, still held every slot when the timers fell due (5.8 s later in one run, where
2 s is allowed). That measured the queue, not the timers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import Workers
from tests.acceptance.test_faults import (
    own_server,
    report,
    restart_under_load,
    test_a_step_that_returned_before_a_kill_never_runs_again,
    test_runs_survive_connections_terminated_again_and_again,
    test_runs_under_random_sigkills_complete_exactly_once_with_the_right_result,
    test_workers_with_skewed_clocks_neither_wake_timers_early_nor_steal_leases,
)
from tests.conftest import EMBEDDED, PGBOUNCER_MODES
from tests.pgbouncer import PgBouncer, pgbouncer

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

__all__ = [  # collected here again, with this module's workers
    "test_a_step_that_returned_before_a_kill_never_runs_again",
    "test_runs_survive_connections_terminated_again_and_again",
    "test_runs_under_random_sigkills_complete_exactly_once_with_the_right_result",
    "test_workers_with_skewed_clocks_neither_wake_timers_early_nor_steal_leases",
]


def modes() -> list[str]:
    """The ways through PgBouncer this session takes (see the module docstring)."""
    if PGBOUNCER_MODES is None:
        return ["listen"] if EMBEDDED else ["poll"]
    asked = [mode.strip() for mode in PGBOUNCER_MODES.split(",")]
    if not set(asked) <= {"listen", "poll"}:
        raise pytest.UsageError(
            f"DURABLE_TEST_PGBOUNCER_MODES={PGBOUNCER_MODES!r}: the modes are listen and poll, "
            "separated by commas"
        )
    return list(dict.fromkeys(asked))


MODES = modes()


class PooledWorkers(Workers):
    """Workers whose database URL goes through PgBouncer: with ``listen_url``, LISTEN goes
    there; without, they are told they are pooled, and poll."""

    def __init__(self, bouncer: PgBouncer, direct_url: str, tmp: Path, mode: str) -> None:
        super().__init__(bouncer.url(direct_url), tmp)
        self.pooling = (
            {"DURABLE_LISTEN_URL": direct_url} if mode == "listen" else {"DURABLE_POOLED": "1"}
        )

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{**self.pooling, **extra})

    def start(self, *, concurrency: int = 20, **options: Any) -> subprocess.Popen[bytes]:
        return super().start(concurrency=concurrency, **options)


@pytest.fixture(params=MODES)
def workers(
    request: pytest.FixtureRequest, bouncer: PgBouncer, database_url: str, tmp_path: Path
) -> Iterator[Workers]:
    pool = PooledWorkers(bouncer, database_url, tmp_path, request.param)
    yield pool
    pool.stop_all()


@pytest.mark.parametrize("mode", MODES)
async def test_runs_behind_pgbouncer_survive_a_restart_of_the_database_server(
    tmp_path: Path, mode: str
) -> None:
    """The server restarts under PgBouncer, which stays up: the workers' transactions fail
    or wait for it, as PgBouncer decides, and the load still ends exactly once."""
    async with own_server() as (dsn, control):
        with pgbouncer(dsn) as bouncer:
            workers = PooledWorkers(bouncer, dsn, tmp_path, mode)
            figures = await restart_under_load(dsn, control, workers)
    report(f"database restart behind pgbouncer ({mode})", {"restarts": 1, **vars(figures)})
    assert (figures.lost, figures.wrong, figures.duplicate_positions) == (0, 0, 0), figures
    assert figures.reexecutions <= 2 * 8, figures
