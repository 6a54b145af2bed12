"""The server ``durable.testing`` simulates on, for the whole session: this session's.

A ``Simulation`` given no URL creates its databases on ``$DURABLE_TEST_DATABASE_URL``'s server,
else on the embedded PostgreSQL of ``$DURABLE_DATA_DIR`` (or the user's default one). The
suite's conftest removes both from the environment, so this fixture sets the first to the
session's server (``$DURABLE_TEST_DATABASE_URL`` as given, or the private embedded one) from the
first integration test on until the session ends: the tests that run later (``tests/unit``,
``examples``) simulate there too, and none starts a server of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from durable.testing import _databases


@pytest.fixture(scope="session", autouse=True)
def simulations_on_the_session_server(server_url: str) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_databases.ENVIRONMENT, server_url)
        yield server_url
