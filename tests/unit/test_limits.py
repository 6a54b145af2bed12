"""Bounds and settings, checked before anything reaches the database: nonsense settings are
refused when the app is built, bad values are InvalidInput, and a password never reaches a
message. (Bad durations inside a run: tests/integration/test_durations.py.)"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Any

import pytest

import durable
from engine import WorkerOptions, _codec, _limits
from engine._urls import redact

# -- settings (issue 10, item 7) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"lease": timedelta(seconds=-1)},
        {"lease": timedelta(0)},
        {"lease": float("nan")},
        {"poll_interval": timedelta(0)},
        {"short_wait": timedelta(seconds=-1)},
        {"pool_size": 0},
        {"pool_size": 2.5},
        {"connect_timeout": -1},
        {"connect_timeout": float("inf")},
        {"max_payload_bytes": 0},
    ],
    ids=repr,
)
def test_an_app_with_a_nonsense_setting_is_refused_when_it_is_built(options: Any) -> None:
    [(name, _value)] = options.items()
    with pytest.raises(durable.ConfigurationError, match=f"App: {name}"):
        durable.App("postgresql://u@localhost/db", **options)


@pytest.mark.parametrize("concurrency", [0, -5, 2**40, 1.5])
def test_a_worker_that_could_never_claim_is_refused(concurrency: Any) -> None:
    with pytest.raises(durable.ConfigurationError, match="worker: concurrency"):
        WorkerOptions(concurrency=concurrency)
    app = durable.App("postgresql://u@localhost/db")
    with pytest.raises(durable.ConfigurationError, match="worker: concurrency"):
        # refused before it connects: the URL above reaches nothing
        asyncio.run(app.run_worker(concurrency=concurrency))


@pytest.mark.parametrize(
    ("register", "match"),
    [
        (lambda app: app.function(timeout=timedelta(seconds=-5)), "@app.function: timeout"),
        (lambda app: app.function(timeout=timedelta(0)), "@app.function: timeout"),
        (lambda app: app.function(start_timeout=timedelta(0)), "start_timeout"),
        (lambda app: app.function(priority=2**40), "@app.function: the priority"),
        (lambda app: app.function(concurrency=0), "Concurrency: the limit"),
        (lambda app: app.function(queue="q" * 300), "the queue name"),
        (lambda app: app.rate_limit("api", 0, timedelta(seconds=1)), "the limit"),
        (lambda app: app.rate_limit("api", 5, timedelta(0)), "the period"),
        (lambda app: durable.step(timeout=float("nan")), "durable.step: timeout"),
        (lambda app: durable.step(timeout=-1), "durable.step: timeout"),
        (lambda app: durable.step(retries=-1), "retries"),
        (lambda app: durable.step(weight=0), "weight"),
        (lambda app: durable.Backoff(factor=float("nan")), "Backoff: factor"),
        (lambda app: durable.Backoff(initial=timedelta(seconds=-1)), "Backoff: initial"),
    ],
)
def test_nonsense_function_and_step_options_are_refused_at_declaration(
    register: Any, match: str
) -> None:
    app = durable.App("postgresql://u@localhost/db")
    with pytest.raises(durable.ConfigurationError, match=match):
        register(app)


def test_settings_in_range_are_kept() -> None:
    app = durable.App(
        "postgresql://u@localhost/db",
        lease=timedelta(seconds=1),
        short_wait=timedelta(0),
        connect_timeout=0.5,
    )
    assert app.settings.lease == timedelta(seconds=1)
    assert WorkerOptions(concurrency=1, shutdown_grace=timedelta(0)).concurrency == 1


# -- values (items 10 and 11) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -math.inf, {"v": float("nan")}, [1.0, [float("inf")]]],
    ids=repr,
)
def test_nan_and_infinity_are_refused_as_not_json(value: Any) -> None:
    with pytest.raises(durable.SerializationError, match="NaN"):
        _codec.dump(Any, value, "the value")


def test_lone_surrogates_and_nul_are_refused_but_emoji_and_escaped_text_pass() -> None:
    for bad in ["\ud800", {"k\udcff": 1}, ["a\x00b"]]:
        with pytest.raises(durable.SerializationError, match=r"NUL|Unicode|surrogate"):
            _codec.dump(Any, bad, "the value")
    kept = ["😀", "\\ud800 is text", "\\u0000 is text", "한국어"]
    assert _codec.dump(Any, kept, "the value") == kept


@pytest.mark.parametrize(
    ("check", "value", "match"),
    [
        (_limits.name, "e" * 256, "256 bytes of UTF-8"),
        (_limits.name, "é" * 128, "256 bytes of UTF-8"),
        (_limits.key, "k" * 1025, "the limit is 1024"),
        (_limits.key, "bad\udcffbyte", "not valid Unicode"),
        (_limits.key, "a\x00b", "NUL"),
        (_limits.key, 42, "must be a string"),
    ],
)
def test_names_and_keys_out_of_bounds_name_the_call_and_the_bound(
    check: Any, value: Any, match: str
) -> None:
    with pytest.raises(durable.InvalidInput, match=match) as refused:
        check(value, "send_event: the event key")
    assert str(refused.value).startswith("send_event: the event key")


def test_priorities_are_32_bit_integers() -> None:
    assert _limits.priority(2**31 - 1, "p") == 2**31 - 1
    for bad in (2**31, -(2**31) - 1, 2**40, True, 1.0):
        with pytest.raises(durable.InvalidInput):
            _limits.priority(bad, "start 'f': the priority")


# -- secrets (item 1) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:S3cret@127.0.0.1:5432/test",
        "postgresql://u@127.0.0.1:5432/test?password=S3cret",
        "postgresql://u@h/db?sslmode=require&sslpassword=S3cret",
        "postgresql+asyncpg://u:S3cret@127.0.0.1:5432/test",
        "postgresql://u:S3c@ret@h/db",
        "postgresql://u:S3cret@[::1/test",
        "u:S3cret@127.0.0.1/db",
    ],
)
def test_a_password_in_a_url_is_never_shown(url: str) -> None:
    shown = redact(url)
    assert "S3c" not in shown
    assert "***" in shown


def test_a_url_without_a_password_is_shown_as_it_is() -> None:
    for url in ["postgresql://u@h:5432/db", "postgresql:///durable?host=/tmp/x&port=5432"]:
        assert redact(url) == url


def test_a_bad_scheme_is_refused_without_echoing_the_password() -> None:
    app = durable.App("postgresql+asyncpg://u:S3cret@127.0.0.1:5432/test")
    with pytest.raises(durable.ConfigurationError) as refused:
        asyncio.run(app.connect())
    assert "S3cret" not in str(refused.value)
    assert "u:***@127.0.0.1" in str(refused.value)
