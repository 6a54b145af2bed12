"""Pure pieces of the engine: codec, positions, policies, function specs, queries."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import durable
from engine import _codec, _lineage
from engine._queries import migrations, queries
from engine._registry import FunctionSpec, policy_of


class Item(BaseModel):
    sku: str
    qty: int


def test_a_model_result_is_rehydrated_as_that_model() -> None:
    data = _codec.dump(Item, Item(sku="a", qty=2), "step x")
    assert data == {"sku": "a", "qty": 2}
    assert _codec.load(Item, data) == Item(sku="a", qty=2)
    assert _codec.load(list[Item], [data]) == [Item(sku="a", qty=2)]


def test_an_unserializable_value_names_what_and_the_type() -> None:
    class Handle:
        pass

    with pytest.raises(durable.SerializationError, match=r"run r, step 's'.*Handle"):
        _codec.dump(Any, Handle(), "run r, step 's'")


def test_the_return_annotation_decides_the_type() -> None:
    async def make() -> Item:
        return Item(sku="b", qty=1)

    assert _codec.return_type(make) is Item
    assert _codec.return_type(lambda: 1) is Any


class _Owner:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.append(task)


async def test_positions_follow_task_lineage_not_completion_order() -> None:
    loop = asyncio.get_running_loop()
    _lineage.install(loop)
    owner = _Owner()
    seen: dict[str, list[str]] = {}

    async def branch(name: str, delay: float) -> None:
        node = _lineage.current()
        assert node is not None
        seen[name] = [node.next_position()]
        await asyncio.sleep(delay)
        seen[name].append(node.next_position())

    async def root() -> None:
        node = _lineage.current()
        assert node is not None
        seen["root"] = [node.next_position()]
        await asyncio.gather(branch("slow", 0.02), branch("fast", 0))
        seen["root"].append(node.next_position())

    await loop.create_task(root(), context=_lineage.root_context(owner))
    assert seen == {"root": ["0", "1"], "slow": ["0:0", "0:1"], "fast": ["1:0", "1:1"]}
    assert len(owner.tasks) == 2


async def test_tasks_created_while_detached_take_no_lineage() -> None:
    loop = asyncio.get_running_loop()
    _lineage.install(loop)
    owner = _Owner()

    async def root() -> None:
        token = _lineage.detach()
        try:
            await asyncio.gather(asyncio.sleep(0))
        finally:
            _lineage.reattach(token)
        node = _lineage.current()
        assert node is not None
        assert node.child().lineage == "0"

    await loop.create_task(root(), context=_lineage.root_context(owner))
    assert owner.tasks == []


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    backoff = durable.Backoff(
        initial=timedelta(seconds=1), factor=2, maximum=timedelta(seconds=5), jitter=0.1
    )
    rng = random.Random(7)
    delays = [backoff.delay(n, rng) for n in range(1, 6)]
    for delay, base in zip(delays, [1, 2, 4, 5, 5], strict=True):
        assert base * 0.9 <= delay <= base * 1.1


def test_the_step_decorator_attaches_a_policy_and_keeps_the_function() -> None:
    @durable.step(retries=3, timeout=2)
    async def send(to: str) -> str:
        return to

    assert policy_of(send).retries == 3
    assert policy_of(send).timeout == timedelta(seconds=2)
    assert asyncio.run(send("x")) == "x"
    with pytest.raises(durable.ConfigurationError):
        durable.step(retries=-1)


def test_a_durable_function_takes_ctx_and_at_most_one_input() -> None:
    async def two(ctx: durable.Context, a: int, b: int) -> None: ...

    def sync(ctx: durable.Context) -> None: ...

    with pytest.raises(durable.ConfigurationError, match="at most one input"):
        FunctionSpec.describe(two, None)
    with pytest.raises(durable.ConfigurationError, match="not an async function"):
        FunctionSpec.describe(sync, None)  # type: ignore[arg-type]

    async def good(ctx: durable.Context, item: Item) -> Item:
        return item

    spec = FunctionSpec.describe(good, None)
    assert spec.input_type is Item
    assert spec.return_type is Item
    assert spec.name.endswith(
        "test_a_durable_function_takes_ctx_and_at_most_one_input.<locals>.good"
    )


def test_every_query_the_store_uses_exists_and_migrations_are_numbered() -> None:
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "engine" / "_store.py").read_text()
    used = set(re.findall(r'self\._q\["(\w+)"\]', source))
    assert used <= set(queries())
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))
