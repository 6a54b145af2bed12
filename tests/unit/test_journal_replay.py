"""The replay core (engine._replay): a journal replayed in memory, running nothing live, on a
store that keeps only the journal and refuses, by name, every transition of the SQL functions."""

from __future__ import annotations

import inspect
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

import durable
from engine import JournalEntry, JournalStore, Store, replay_journal

app = durable.App("postgresql://unused")
RUN = uuid.UUID(int=1)
AT = datetime(2030, 1, 1, tzinfo=UTC)
# Read from the journal, and written only by a replay's end: nothing else is kept in memory.
KEPT = {"close", "load_journal", "list_waits", "suspend", "finish"}


def fail_if_run(n: int) -> int:
    raise AssertionError("a replay ran a step live")


@app.function(name="two_steps")
async def two_steps(ctx: durable.Context, n: int) -> int:
    first = await ctx.step("first", fail_if_run, n)
    second = await ctx.step("second", fail_if_run, first)
    return first + second


def entry(position: str, name: str, value: Any) -> JournalEntry:
    return JournalEntry(position, "step", name, value, None, 1, AT)


def store_methods() -> list[str]:
    return sorted(
        name
        for name, member in vars(Store).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    )


def test_the_journal_store_has_every_method_of_the_store_contract() -> None:
    missing = [name for name in store_methods() if not hasattr(JournalStore, name)]
    assert missing == []


@pytest.mark.parametrize("method", sorted(set(store_methods()) - KEPT))
async def test_the_journal_store_refuses_every_transition_by_name(method: str) -> None:
    store = JournalStore(RUN, 2, [])
    call = getattr(store, method)
    parameters = inspect.signature(call).parameters.values()
    positional = [None for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    required = {
        p.name: None for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    }
    with pytest.raises(NotImplementedError) as refused:
        await call(*positional, **required)
    message = str(refused.value)
    assert message.startswith(f"JournalStore.{method} is not implemented")
    assert "PostgreSQL" in message


async def test_a_complete_journal_replays_to_the_same_result_without_running_a_step() -> None:
    journal = [entry("0", "first", 2), entry("1", "second", 3)]
    replayed = await replay_journal(app.functions, RUN, "two_steps", 2, journal)
    assert (replayed.status, replayed.result, replayed.consumed) == ("completed", 5, 2)
    assert (replayed.unconsumed, replayed.live_at, replayed.nondeterminism) == ([], [], None)


async def test_a_partial_journal_replays_up_to_where_live_work_would_begin() -> None:
    replayed = await replay_journal(app.functions, RUN, "two_steps", 2, [entry("0", "first", 2)])
    assert (replayed.status, replayed.consumed, replayed.live_at) == ("suspended", 1, ["1"])


async def test_a_journal_the_code_no_longer_matches_pauses_with_the_difference() -> None:
    journal = [entry("0", "renamed", 2)]
    replayed = await replay_journal(app.functions, RUN, "two_steps", 2, journal)
    assert replayed.status == "paused"
    assert replayed.nondeterminism is not None
    assert replayed.nondeterminism.position == "0"
