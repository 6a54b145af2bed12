"""Bad input, fuzzed with hypothesis at every public entry point (``start``, ``start_many``,
``send_event``, ``ctx.sleep``, ``wait_for_event``, the CLI): each outcome is success or a
``DurableError`` (the CLI: exit 1 or 2 and one line on standard error), a refused call stores
nothing, and no run is lost or corrupted by another's bad input."""

from __future__ import annotations

import asyncio
import inspect
import math
import operator
import uuid
from collections.abc import Awaitable
from datetime import UTC
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import durable
from durable import _cli
from durable.testing import Simulation
from engine import errors
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMIT = 4096
T = TypeVar("T")
DURABLE_ERRORS = {
    name
    for name, obj in vars(errors).items()
    if inspect.isclass(obj) and issubclass(obj, errors.DurableError)
}


class Order(BaseModel):
    order_id: str
    cents: int


class Opaque:
    """Not JSON, and not anything pydantic can turn into JSON."""


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


# Text as careless and hostile callers send it: any character (lone surrogates, as left by
# bytes that are not UTF-8, and NUL included), and long runs of one character.
texts = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=30),
    st.builds(
        operator.mul, st.sampled_from(["k", "é", "\x00", "\udcff"]), st.integers(200, 12_000)
    ),
)
numbers = (
    st.integers()
    | st.floats()
    | st.integers(min_value=2**63)
    | st.builds(pow, st.just(10), st.integers(4000, 6000))
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
anything = (
    json_values
    | st.builds(Opaque)
    | st.binary(max_size=20)
    | st.sets(st.integers(), max_size=3)
    | st.text(min_size=LIMIT, max_size=LIMIT + 50)
    | st.complex_numbers()
    | st.builds(nested, st.integers(200, 3000))
)
durations = st.timedeltas() | st.floats() | st.integers(-(10**12), 10**12)


def make(database_url: str) -> tuple[durable.App, Any, Any]:
    app = make_app(database_url, max_payload_bytes=LIMIT)

    @app.function(name="take_order")
    async def take_order(ctx: durable.Context, order: Order) -> int:
        return await ctx.step("price", lambda: order.cents)

    @app.function(name="echo")
    async def echo(ctx: durable.Context, value: Any) -> Any:
        return await ctx.step("echo", lambda: value)

    return app, take_order, echo


async def outcome(call: Awaitable[T]) -> T | durable.DurableError:
    """What ``call`` returned, or the DurableError it raised (any other error propagates)."""
    try:
        return await call
    except durable.DurableError as refused:
        return refused


async def stored(db: asyncpg.Connection) -> tuple[int, int]:
    """How many runs and events the database holds."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM durable.runs), (SELECT count(*) FROM durable.events)"
    )
    assert row is not None
    return row[0], row[1]


@FUZZ
@given(
    value=anything,
    key=st.none() | texts,
    priority=st.none() | st.integers(),
    delay=st.none() | durations,
    start_at=st.none() | st.datetimes() | st.datetimes(timezones=st.just(UTC)),
)
async def test_any_start_either_stores_a_run_or_is_refused_and_stores_nothing(
    database_url: str,
    db: asyncpg.Connection,
    value: Any,
    key: str | None,
    priority: int | None,
    delay: Any,
    start_at: Any,
) -> None:
    app, take_order, echo = make(database_url)
    when = {"delay": delay} if start_at is None else {"start_at": start_at}
    async with app:
        for fn in (take_order, echo):
            before = await stored(db)
            started = await outcome(
                app.start(fn, value, idempotency_key=key, priority=priority, **when)
            )
            if isinstance(started, durable.DurableError):
                assert isinstance(started, durable.InvalidInput), started
                assert str(started).startswith(f"start {fn.__name__!r}"), started
                assert await stored(db) == before, "a refused start stored something"
            else:
                assert (await started.info()).status == "pending"


@FUZZ
@given(
    values=st.lists(anything, max_size=4),
    keys=st.none() | st.lists(st.none() | texts, max_size=4),
    priority=st.none() | st.integers(),
)
async def test_any_start_many_stores_every_run_or_none(
    database_url: str,
    db: asyncpg.Connection,
    values: list[Any],
    keys: list[str | None] | None,
    priority: int | None,
) -> None:
    app, _take, echo = make(database_url)
    async with app:
        before = await stored(db)
        started = await outcome(
            app.start_many(echo, values, idempotency_keys=keys, priority=priority)
        )
        if isinstance(started, durable.DurableError):
            assert isinstance(started, durable.InvalidInput), started
            assert await stored(db) == before, "a refused start_many stored something"
        else:
            assert len(started) == len(values)


@FUZZ
@given(name=texts, key=st.none() | texts, payload=anything)
async def test_any_event_is_either_stored_or_refused_and_stores_nothing(
    database_url: str, db: asyncpg.Connection, name: str, key: str | None, payload: Any
) -> None:
    app, _take, _echo = make(database_url)
    async with app:
        before = await stored(db)
        sent = await outcome(app.send_event(name, payload, key=key))
        if isinstance(sent, durable.DurableError):
            assert isinstance(sent, durable.InvalidInput), sent
            assert str(sent).startswith(("event ", "send_event: ")), sent
            assert await stored(db) == before, "a refused event was stored"
        else:
            assert sent > 0


WAITS: dict[str, Any] = {}
waits_app = durable.App()


@waits_app.function(name="waits")
async def waits(ctx: durable.Context) -> str:
    """Makes the call the test drew (from WAITS) and reports how it went."""
    await WAITS["call"](ctx)
    return "returned"


@FUZZ
@given(
    call=st.one_of(
        durations.map(lambda d: lambda ctx: ctx.sleep(d)),
        st.datetimes().map(lambda t: lambda ctx: ctx.sleep_until(t)),
        st.tuples(texts, st.none() | texts, st.none() | durations).map(
            lambda a: lambda ctx: ctx.wait_for_event(a[0], key=a[1], timeout=a[2])
        ),
    )
)
async def test_any_sleep_or_wait_either_runs_or_fails_the_run_with_a_durable_error(
    database_url: str, call: Any
) -> None:
    WAITS["call"] = call
    async with Simulation(waits_app, database_url=database_url) as simulation:
        ended = await simulation.run(waits)
    if ended.status == "failed":
        assert ended.error is not None
        assert ended.error.type in DURABLE_ERRORS, ended.error
    elif ended.status != "suspended":  # waiting for an event that never comes
        assert (ended.status, ended.result) == ("completed", "returned")


async def test_oversized_values_are_refused_with_the_limit_named(database_url: str) -> None:
    app, take_order, echo = make(database_url)

    @app.function(name="big_result")
    async def big_result(ctx: durable.Context) -> str:
        return await ctx.step("grow", lambda: "x" * (2 * LIMIT))

    async with app:
        with pytest.raises(durable.PayloadTooLarge, match=f"limit of {LIMIT} bytes"):
            await app.start(echo, "x" * LIMIT)
        with pytest.raises(durable.PayloadTooLarge, match="event 'e'"):
            await app.send_event("e", ["y" * LIMIT])
        good = await app.start(take_order, Order(order_id="o1", cents=5))
        big = await app.start(big_result)
        async with running_worker(app):
            assert await good.result(timeout=30) == 5
            with pytest.raises(durable.RunFailed) as failed:
                await big.result(timeout=30)
    assert failed.value.error.type == "PayloadTooLarge"
    assert "step 'grow'" in failed.value.error.message


async def test_runs_with_bad_results_fail_alone_while_the_others_finish(database_url: str) -> None:
    app, take_order, _echo = make(database_url)

    @app.function(name="unstorable")
    async def unstorable(ctx: durable.Context, kind: str) -> object:
        values = {"opaque": Opaque(), "nan": math.nan, "nul": "a\x00b"}
        return await ctx.step("make", lambda: values[kind])

    @app.function(name="nul_name")
    async def nul_name(ctx: durable.Context) -> str:
        return await ctx.step("a\x00b", lambda: "the database refuses this step's name")

    async with app:
        bad = [await app.start(unstorable, kind) for kind in ("opaque", "nan", "nul")]
        bad.append(await app.start(nul_name))
        good = [await app.start(take_order, Order(order_id=f"o{i}", cents=i)) for i in range(10)]
        async with running_worker(app):
            assert [await g.result(timeout=30) for g in good] == list(range(10))
            outcomes = []
            for handle in bad:
                try:
                    outcomes.append(await handle.result(timeout=30))
                except durable.RunFailed as failed:
                    outcomes.append(failed.error.type)
    assert outcomes[0] == "SerializationError"
    assert outcomes[1] == "SerializationError"  # NaN is not JSON: refused, not stored as null
    assert outcomes[2] == "SerializationError"
    assert outcomes[3] == "InvalidInput"  # refused before Postgres sees it, failed once


async def test_unknown_run_ids_and_functions_are_clear_errors(database_url: str) -> None:
    app, _take, _echo = make(database_url)

    async def not_registered(ctx: durable.Context) -> None:
        return None

    async with app:
        with pytest.raises(durable.RunNotFound):
            await app.get_run(uuid.uuid4()).info()
        with pytest.raises(durable.RunNotFound):
            await app.get_run(uuid.uuid4()).result(timeout=1)
        with pytest.raises(durable.InvalidInput, match="not a run id"):
            app.get_run("run-42")
        with pytest.raises(durable.ConfigurationError, match="not registered"):
            await app.start(not_registered)


@settings(max_examples=40, deadline=None)
@given(
    url=st.one_of(
        st.text(max_size=40).filter(lambda u: not u.startswith(("postgresql://", "postgres://"))),
        st.sampled_from(
            [
                "postgresql://user@localhost:notaport/db",
                "postgresql://[::1/db",
                "postgresql://user@host:99999/db",
                "postgresql://%zz@localhost/db",
                "postgresql://localhost/db?sslmode=bogus",
            ]
        ),
    )
)
async def test_malformed_database_urls_are_configuration_errors(url: str) -> None:
    app = durable.App(url, connect_timeout=1)
    with pytest.raises((durable.ConfigurationError, durable.DatabaseUnavailable)):
        await app.connect()


CLI_HEADS = [
    ["events", "send"],
    ["runs", "show"],
    ["runs", "resume"],
    ["runs", "export"],
    ["runs", "cancel"],
    ["runs", "list"],
    ["runs", "list", "--limit"],
    ["runs", "list", "--status"],
    ["schedules", "list"],
    ["migrate"],
]
PARSE_ONLY_HEADS = [
    ["worker"],
    ["worker", "m:app", "--concurrency"],
    ["worker", "m:app", "--log-level"],
    ["db"],
    [],
]
cli_words = texts.filter(lambda w: len(w) < 200) | st.sampled_from(
    ["--payload", "--key", "--limit", "--reason", "-o", "-1", "0", "NaN", "Infinity", "@", "-"]
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(head=st.sampled_from(CLI_HEADS), tail=st.lists(cli_words, max_size=4))
async def test_the_cli_answers_any_arguments_with_one_line_not_a_traceback(
    database_url: str, head: list[str], tail: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--database-url", database_url, "--connect-timeout", "10", *head, *tail]
    code = await asyncio.to_thread(_exit_code, argv)
    _out, err = capsys.readouterr()
    assert code in (0, 1, 2), (code, err)
    if code:
        assert len(err.strip().splitlines()) == 1, err


@FUZZ
@given(head=st.sampled_from(PARSE_ONLY_HEADS), tail=st.lists(cli_words, max_size=4))
def test_parsing_any_arguments_succeeds_or_exits_2_with_one_line(
    head: list[str], tail: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = _exit_code([*head, *tail], parse_only=True)
    _out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code:
        assert len(err.strip().splitlines()) == 1, err


def _exit_code(argv: list[str], parse_only: bool = False) -> int | str | None:
    """The CLI's exit status; argparse's own usage errors exit through SystemExit."""
    try:
        if parse_only:
            _cli._parser().parse_args(argv)
            return 0
        return _cli.main(argv)
    except SystemExit as exit:
        return exit.code
