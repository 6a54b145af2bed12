"""GroupCommit: writes queue while a statement commits, and each caller learns its own fate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest

from engine._group_commit import GroupCommit
from engine._store import _isolating


class Statements:
    """A fake flush: records each statement's writes and holds it until released."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_next: BaseException | None = None

    async def flush(self, writes: Sequence[int]) -> list[str | BaseException]:
        self.sent.append(list(writes))
        await self.release.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return [ValueError(f"bad {w}") if w < 0 else f"ok {w}" for w in writes]


async def test_writes_made_during_a_commit_share_the_next_statement() -> None:
    statements = Statements()
    group: GroupCommit[int, str] = GroupCommit(statements.flush)
    first = asyncio.create_task(group.write(1))
    await asyncio.sleep(0)
    others = [asyncio.create_task(group.write(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert statements.sent == [[1]]  # the first write went out at once, the rest wait
    assert not first.done()
    statements.release.set()
    assert await first == "ok 1"
    assert [await t for t in others] == ["ok 2", "ok 3", "ok 4"]
    assert statements.sent == [[1], [2, 3, 4]]
    assert (group.statements, group.writes) == (2, 4)


async def test_writes_made_in_the_same_turn_as_the_first_go_in_its_statement() -> None:
    """The runs of one claim end in the same turn of the event loop: their ends go together,
    not the first alone and the others after its commit."""
    statements = Statements()
    statements.release.set()
    group: GroupCommit[int, str] = GroupCommit(statements.flush)
    assert await asyncio.gather(*(group.write(n) for n in (1, 2, 3))) == ["ok 1", "ok 2", "ok 3"]
    assert statements.sent == [[1, 2, 3]]


async def test_a_write_soon_after_a_statement_began_waits_out_the_spacing_with_later_ones() -> None:
    statements = Statements()
    statements.release.set()
    began: list[float] = []
    flush = statements.flush

    async def timed(writes: Sequence[int]) -> list[str | BaseException]:
        began.append(asyncio.get_running_loop().time())
        return await flush(writes)

    group: GroupCommit[int, str] = GroupCommit(timed, spacing=0.5)
    assert await group.write(1) == "ok 1"  # the first goes at once
    second = asyncio.create_task(group.write(2))
    for _ in range(5):  # turns of the event loop in which, unspaced, 2 would go alone
        await asyncio.sleep(0)
    third = asyncio.create_task(group.write(3))
    assert (await second, await third) == ("ok 2", "ok 3")
    assert statements.sent == [[1], [2, 3]]
    assert began[1] - began[0] >= 0.5


async def test_enough_waiting_writes_end_the_spacing_and_go_together() -> None:
    """A full worker's runs end with ``enough`` (a claim's worth): due runs wait for the slots
    those ends free, so once that many wait, their statement does not wait out the spacing.
    Fewer wait it out, as lone writes do."""
    statements = Statements()
    statements.release.set()
    group: GroupCommit[int, str] = GroupCommit(statements.flush, spacing=3600)
    assert await group.write(1) == "ok 1"  # the first goes at once
    waiting = [asyncio.create_task(group.write(2)), asyncio.create_task(group.write(3, enough=3))]
    for _ in range(5):  # turns of the event loop: two writes of three wait out the spacing
        await asyncio.sleep(0)
    assert statements.sent == [[1]]
    waiting.append(asyncio.create_task(group.write(4, enough=3)))
    assert list(await asyncio.wait_for(asyncio.gather(*waiting), 10)) == ["ok 2", "ok 3", "ok 4"]
    assert statements.sent == [[1], [2, 3, 4]]
    # That statement's hurry is spent: the next write waits out the spacing again.
    fifth = asyncio.create_task(group.write(5))
    for _ in range(5):
        await asyncio.sleep(0)
    assert statements.sent == [[1], [2, 3, 4]]
    assert await asyncio.wait_for(group.write(6, enough=2), 10) == "ok 6"
    assert await fifth == "ok 5"
    assert statements.sent == [[1], [2, 3, 4], [5, 6]]


async def test_enough_writes_made_while_a_statement_commits_go_when_it_ends() -> None:
    """With a statement in flight, writes that are enough wait for it (one statement at a
    time), then go at once rather than after the spacing."""
    statements = Statements()
    group: GroupCommit[int, str] = GroupCommit(statements.flush, spacing=3600)
    first = asyncio.create_task(group.write(1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert statements.sent == [[1]]  # in flight, held
    second = asyncio.create_task(group.write(2, enough=1))
    await asyncio.sleep(0)
    statements.release.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 10)) == ["ok 1", "ok 2"]
    assert statements.sent == [[1], [2]]


def test_a_loop_shutting_down_in_the_spacing_cancels_the_wait_and_takes_writes_after() -> None:
    """The wait for the spacing belongs to a task, which the loop's shutdown cancels (a timer
    would start the statement during the shutdown, in a task no one cancels or awaits). The
    writes that waited for it are cancelled, and a write made later in the shutdown (a task
    that cleans up) still goes and returns, rather than waiting for a statement that never
    comes."""
    statements = Statements()
    statements.release.set()
    group: GroupCommit[int, str] = GroupCommit(statements.flush, spacing=0.05)
    spaced = asyncio.Event()
    late: list[str] = []

    async def cleans_up_late() -> None:
        try:
            await asyncio.Event().wait()
        finally:  # past the spacing, once the shutdown has cancelled every task
            await asyncio.shield(asyncio.sleep(0.2))
            late.append(await asyncio.wait_for(group.write(3), 10))

    async def main() -> None:
        asyncio.get_running_loop().create_task(cleans_up_late())
        await group.write(1)
        asyncio.get_running_loop().create_task(group.write(2))
        await asyncio.sleep(0)  # the second write now waits out the spacing
        spaced.set()

    asyncio.run(main())
    assert spaced.is_set()
    assert statements.sent == [[1], [3]]  # the second never went: its loop was going away
    assert late == ["ok 3"]
    assert (group._next, group._in_flight, group._queue) == (None, 0, [])


async def test_a_statement_cancelled_before_it_ran_cancels_its_writes_and_not_later_ones() -> None:
    statements = Statements()
    statements.release.set()
    group: GroupCommit[int, str] = GroupCommit(statements.flush)
    first = asyncio.create_task(group.write(1))
    await asyncio.sleep(0)  # the write is queued, its statement's task made and not yet run
    [statement] = group._tasks
    statement.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(group.write(2), 10) == "ok 2"
    assert statements.sent == [[2]]


async def test_a_failed_statement_fails_its_callers_and_no_later_one() -> None:
    statements = Statements()
    statements.fail_next = ConnectionResetError("terminated")
    group: GroupCommit[int, str] = GroupCommit(statements.flush)
    lost = asyncio.create_task(group.write(1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(group.write(n)) for n in (2, 3)]
    await asyncio.sleep(0)  # both queue behind the statement that will fail
    statements.release.set()
    with pytest.raises(ConnectionResetError):
        await lost
    assert [await t for t in later] == ["ok 2", "ok 3"]
    assert statements.sent == [[1], [2, 3]]


async def test_a_write_the_statement_refuses_fails_its_caller_alone() -> None:
    statements = Statements()
    statements.release.set()
    group: GroupCommit[int, str] = GroupCommit(statements.flush)
    good, bad = group.write(5), group.write(-1)
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0] == "ok 5"
    assert isinstance(results[1], ValueError)


async def test_a_statement_whose_backend_was_terminated_fails_every_write_in_it() -> None:
    """A terminated backend reaches the client as a PostgresError, as a refused value does, but
    its statement is not sent again one write at a time: every caller in it fails, and each
    run takes the step again from its journal."""
    sent: list[list[int]] = []

    async def statement(writes: Sequence[int]) -> list[str]:
        sent.append(list(writes))
        raise asyncpg.AdminShutdownError("terminating connection due to administrator command")

    with pytest.raises(asyncpg.AdminShutdownError):
        await _isolating(statement, [1, 2, 3])
    assert sent == [[1, 2, 3]]


async def test_a_refused_value_fails_its_own_write_alone() -> None:
    async def statement(writes: Sequence[int]) -> list[str]:
        if any(w < 0 for w in writes):
            raise asyncpg.DataError("invalid input")
        return [f"ok {w}" for w in writes]

    outcomes = await _isolating(statement, [1, -2, 3])
    assert outcomes[0] == "ok 1"
    assert isinstance(outcomes[1], asyncpg.DataError)
    assert outcomes[2] == "ok 3"
