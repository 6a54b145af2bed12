"""Bad input, fuzzed with hypothesis at the public API and the CLI: each gets a clear error of
the documented type, and no run is lost or corrupted by another's bad input."""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import durable
from durable import _cli
from tests.helpers import make_app, running_worker

pytestmark = pytest.mark.postgres

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMIT = 4096


class Order(BaseModel):
    order_id: str
    cents: int


class Opaque:
    """Not JSON, and not anything pydantic can turn into JSON."""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
anything = (
    json_values
    | st.builds(Opaque)
    | st.binary(max_size=20)
    | st.sets(st.integers(), max_size=3)
    | st.text(min_size=LIMIT, max_size=LIMIT + 50)
    | st.complex_numbers()
)


def make(database_url: str) -> tuple[durable.App, Any, Any]:
    app = make_app(database_url, max_payload_bytes=LIMIT)

    @app.function(name="take_order")
    async def take_order(ctx: durable.Context, order: Order) -> int:
        return await ctx.step("price", lambda: order.cents)

    @app.function(name="echo")
    async def echo(ctx: durable.Context, value: Any) -> Any:
        return await ctx.step("echo", lambda: value)

    return app, take_order, echo


@FUZZ
@given(value=anything)
async def test_any_input_either_starts_a_run_or_is_refused_as_invalid(
    database_url: str, value: Any
) -> None:
    app, take_order, echo = make(database_url)
    async with app:
        for fn in (take_order, echo):
            refusal = ""
            try:
                handle = await app.start(fn, value)
            except durable.InvalidInput as refused:
                refusal = str(refused)
            else:
                assert (await handle.info()).status == "pending"
                continue
            assert refusal.startswith(f"start {fn.__name__!r}") or "NUL" in refusal, refusal


@FUZZ
@given(name=st.text(max_size=30), key=st.none() | st.text(max_size=30), payload=anything)
async def test_any_event_is_either_stored_or_refused_as_invalid(
    database_url: str, name: str, key: str | None, payload: Any
) -> None:
    app, _take, _echo = make(database_url)
    async with app:
        refusal = ""
        try:
            event_id = await app.send_event(name, payload, key=key)
        except durable.InvalidInput as refused:
            refusal = str(refused)
        else:
            assert event_id > 0
            return
    assert refusal.startswith("event ") or "NUL" in refusal, refusal


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
    assert outcomes[1] is None  # NaN is stored as JSON null, as pydantic writes it
    assert outcomes[2] == "SerializationError"
    assert outcomes[3] == "SerializationError"  # refused by Postgres, failed once, not retried


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


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.one_of(
        st.tuples(
            st.just("events"), st.just("send"), st.text(max_size=10), st.just("--payload")
        ).flatmap(lambda head: st.text(max_size=30).map(lambda p: [*head, p])),
        st.text(max_size=40).map(lambda run_id: ["runs", "show", run_id]),
        st.text(max_size=40).map(lambda run_id: ["runs", "resume", run_id]),
        st.text(max_size=40).map(lambda run_id: ["runs", "export", run_id]),
    )
)
async def test_the_cli_answers_bad_arguments_with_a_message_not_a_traceback(
    database_url: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(_exit_code, ["--database-url", database_url, *command])
    _out, err = capsys.readouterr()
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err
    if code:
        assert err.strip(), "a failure without a message"


def _exit_code(argv: list[str]) -> int | str | None:
    """The CLI's exit status; argparse's own usage errors exit through SystemExit."""
    try:
        return _cli.main(argv)
    except SystemExit as exit:
        return exit.code
