"""How an app learns that its database URL goes through a transaction pooler, and where it
LISTENs: ``listen_url`` / ``$DURABLE_LISTEN_URL``, ``pooled`` / ``$DURABLE_POOLED``."""

from __future__ import annotations

import pytest

import durable
from durable._connection import resolve_listening
from engine.errors import ConfigurationError

DIRECT = "postgresql://app@db:5432/app"


def test_an_app_given_nothing_is_direct_and_listens_on_its_database_url() -> None:
    assert resolve_listening(durable.App("postgresql://app@db/app").settings) == (False, None)


def test_a_listen_url_says_the_app_is_pooled_unless_told_otherwise() -> None:
    assert resolve_listening(durable.App(listen_url=DIRECT).settings) == (True, DIRECT)
    assert resolve_listening(durable.App(listen_url=DIRECT, pooled=False).settings) == (
        False,
        DIRECT,
    )


def test_pooled_without_a_listen_url_polls() -> None:
    assert resolve_listening(durable.App(pooled=True).settings) == (True, None)


def test_the_environment_gives_what_the_app_was_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DURABLE_LISTEN_URL", DIRECT)
    assert resolve_listening(durable.App().settings) == (True, DIRECT)
    monkeypatch.delenv("DURABLE_LISTEN_URL")
    for yes in ("1", "true", "YES", "on"):
        monkeypatch.setenv("DURABLE_POOLED", yes)
        assert resolve_listening(durable.App().settings) == (True, None)
    monkeypatch.setenv("DURABLE_POOLED", "0")
    assert resolve_listening(durable.App().settings) == (False, None)
    monkeypatch.setenv("DURABLE_POOLED", "1")
    assert resolve_listening(durable.App(pooled=False).settings) == (False, None)


def test_a_pooled_flag_that_is_neither_yes_nor_no_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DURABLE_POOLED", "transaction")
    with pytest.raises(ConfigurationError, match="DURABLE_POOLED must be 1 or 0"):
        resolve_listening(durable.App().settings)


def test_a_listen_url_that_is_not_a_postgresql_url_is_refused_when_the_app_is_built() -> None:
    with pytest.raises(ConfigurationError, match="must start with postgresql://"):
        durable.App(listen_url="mysql://db/app")
    with pytest.raises(ConfigurationError, match="pooled must be True or False"):
        durable.App(pooled="yes")  # type: ignore[arg-type]
