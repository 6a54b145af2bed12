"""Zombie writes: a worker stopped with SIGSTOP loses its run to another worker, is resumed with
SIGCONT, and goes straight to a write. Each write here is fenced by `durable.held_segment` alone (a
sleep, an event wait, a child's start, a child's join); steps are fenced inside
`durable.append_entries`, which test_crashes.py covers.

Every test follows the same choreography. The function's body calls `hold` (workflows.py) just
before the write: it records which worker got there and waits for that worker's own gate. The
zombie reaches it and is stopped; its lease ends; a second worker (the taker) claims the run,
replays up to the same point and is held there in turn, holding the claim. Then the zombie's gate
opens and it resumes: the next thing it does is the write, at a position the taker has not
written yet, so a write that was let through would be in the journal. It must be refused.

Why the lease is ended in the database rather than waited out: a worker renews its leases every
third of a lease, so a zombie stopped for a whole lease is always overdue for a renewal when it
resumes. That renewal finds the claim gone and abandons the attempt, racing the write. The write
usually wins (the gate's poll falls due first), but when the renewal wins nothing reaches
`held_segment` and the test proves nothing. So the zombie runs with a lease of ten minutes, which
it does not renew within a test (pytest's timeout is two minutes), and the test ends that lease
while the zombie is stopped: `available_at` set to now is what an expired lease looks like to a
claim. The zombie's log then shows that a write, not a renewal, found the claim gone.

Why `hold` is in the function's body and not in a step: a zombie released inside a step would
next write that step's entry, which `append_entries` fences, and never reach the write under
test.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import asyncpg
import pytest

import durable
from tests.acceptance.conftest import Workers
from tests.helpers import until

pytestmark = [pytest.mark.postgres, pytest.mark.crash, pytest.mark.slow]

ZOMBIE_LEASE_SECONDS = "600"


def held(workers: Workers, tag: str) -> list[int]:
    """The workers (pids) that reached `hold(tag)`, in order."""
    return [int(pid) for pid in workers.lines(f"{tag}-held")]


async def take_over_from(
    zombie: subprocess.Popen[bytes],
    run: durable.RunHandle[Any],
    tag: str,
    workers: Workers,
    db: asyncpg.Connection,
) -> subprocess.Popen[bytes]:
    """With ``zombie`` running ``run`` up to ``hold(tag)``: stop it there, end its lease, let a
    second worker take the run over up to the same point, then open the zombie's gate and
    resume it, so that it goes straight to the write after `hold`. Returns the taker, held at
    its gate with the claim, once the zombie's attempt has ended; the zombie is killed then, so
    that the rest of the run is the taker's. What the zombie wrote, if anything, is in the
    database by then: its log said so."""
    await until(lambda: held(workers, tag) == [zombie.pid], timeout=30, what="zombie held")
    os.kill(zombie.pid, signal.SIGSTOP)
    await db.execute(
        "UPDATE durable.runs SET available_at = durable.clock() WHERE id = $1", run.run_id
    )
    taker = workers.start()
    await until(
        lambda: held(workers, tag) == [zombie.pid, taker.pid], timeout=30, what="taker held"
    )
    assert (await run.info()).attempt == 2
    workers.open_gate(f"{tag}-{zombie.pid}")
    os.kill(zombie.pid, signal.SIGCONT)
    await until(lambda: "lost" in workers.log_of(zombie), timeout=30, what="zombie's attempt over")
    zombie.kill()
    zombie.wait()
    return taker


def assert_fenced_by_its_write(workers: Workers, zombie: subprocess.Popen[bytes]) -> None:
    """The zombie's log says a write of its attempt (1) was refused, and no lease renewal
    ended the attempt first: the write did reach the database."""
    log = workers.log_of(zombie)
    assert "claim 1 lost; write fenced" in log, log
    assert "lease lost" not in log, f"a lease renewal ended the attempt before its write:\n{log}"


async def waits_of(db: asyncpg.Connection, run: durable.RunHandle[Any]) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM durable.waits WHERE run_id = $1", run.run_id
    )
    return count


async def test_a_zombie_past_its_lease_cannot_journal_a_sleep_after_a_takeover(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """A sleep the zombie starts after losing its run is refused (`append_sleep`): the journal
    holds only the taker's sleep, at the taker's attempt, and the run ends with the taker's
    result."""
    zombie = workers.start(TEST_LEASE_SECONDS=ZOMBIE_LEASE_SECONDS)
    async with durable.App(database_url) as app:
        run = await app.start("held_sleeper", "s")
        taker = await take_over_from(zombie, run, "s", workers, db)
        assert await run.journal() == []
        assert_fenced_by_its_write(workers, zombie)
        workers.open_gate(f"s-{taker.pid}")
        assert await run.result(timeout=60) == taker.pid
        journal = await run.journal()
        last_attempt = (await run.info()).attempt
    assert [(e.position, e.kind, e.attempt) for e in journal] == [
        ("0", "sleep", 2),
        ("1", "step", last_attempt),
    ]
    assert workers.lines("s-after") == [str(taker.pid)]


async def test_a_zombie_past_its_lease_cannot_receive_an_event_after_a_takeover(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """An event wait the zombie reaches after losing its run is refused (`await_event`): the
    event, sent before either worker waited, is journaled once, by the taker, and no wait is
    left registered."""
    zombie = workers.start(TEST_LEASE_SECONDS=ZOMBIE_LEASE_SECONDS)
    async with durable.App(database_url) as app:
        run = await app.start("held_waiter", "e")
        await app.send_event("parcel", {"n": 1}, key="e")
        taker = await take_over_from(zombie, run, "e", workers, db)
        assert await run.journal() == []
        assert await waits_of(db, run) == 0
        assert_fenced_by_its_write(workers, zombie)
        workers.open_gate(f"e-{taker.pid}")
        assert await run.result(timeout=60) == taker.pid
        journal = await run.journal()
        assert await waits_of(db, run) == 0
    assert [(e.position, e.kind, e.attempt) for e in journal] == [
        ("0", "event", 2),
        ("1", "step", 2),
    ]
    assert journal[0].value["payload"] == {"n": 1}
    assert workers.lines("e-after") == [str(taker.pid)]


async def test_a_zombie_past_its_lease_cannot_start_a_child_after_a_takeover(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """A child the zombie starts after losing its run is refused (`start_child`): no child run
    exists until the taker starts it, and then exactly one, journaled at the taker's attempt and
    run once."""
    zombie = workers.start(TEST_LEASE_SECONDS=ZOMBIE_LEASE_SECONDS)
    async with durable.App(database_url) as app:
        run = await app.start("held_starter", "c")
        taker = await take_over_from(zombie, run, "c", workers, db)
        assert await run.journal() == []
        assert await run.children() == []
        assert_fenced_by_its_write(workers, zombie)
        workers.open_gate(f"c-{taker.pid}")
        assert await run.result(timeout=60) == taker.pid
        journal = await run.journal()
        [child] = await run.children()
        assert await app.get_run(child.run_id).result(timeout=60) == taker.pid
    assert [(e.position, e.kind, e.attempt) for e in journal] == [
        ("0", "start", 2),
        ("1", "step", 2),
    ]
    assert journal[0].value == {"run_id": str(child.run_id)}
    assert workers.lines("c-kid") == [str(taker.pid)]
    assert workers.lines("c-after") == [str(taker.pid)]


async def test_a_zombie_past_its_lease_cannot_join_a_child_after_a_takeover(
    workers: Workers, database_url: str, db: asyncpg.Connection
) -> None:
    """A child's end that the zombie awaits after losing its run is not journaled
    (`await_child`): the zombie's own start of the child stays, at its attempt, and the join is
    the taker's, with the child's result."""
    zombie = workers.start(TEST_LEASE_SECONDS=ZOMBIE_LEASE_SECONDS)
    async with durable.App(database_url) as app:
        run = await app.start("held_joiner", "j")

        async def child_completed() -> bool:
            return [c.status for c in await run.children()] == ["completed"]

        # The zombie runs the child too: it must end before the zombie is stopped.
        await until(child_completed, timeout=30, what="the child completed")
        taker = await take_over_from(zombie, run, "j", workers, db)
        assert [(e.position, e.kind, e.attempt) for e in await run.journal()] == [("0", "start", 1)]
        assert await waits_of(db, run) == 0
        assert_fenced_by_its_write(workers, zombie)
        workers.open_gate(f"j-{taker.pid}")
        assert await run.result(timeout=60) == [zombie.pid, taker.pid]
        journal = await run.journal()
        children = await run.children()
    assert [(e.position, e.kind, e.attempt) for e in journal] == [
        ("0", "start", 1),
        ("1", "join", 2),
        ("2", "step", 2),
    ]
    assert len(children) == 1
    assert workers.lines("j-kid") == [str(zombie.pid)]
    assert workers.lines("j-after") == [str(taker.pid)]
