"""The version of a function's code: a digest of its syntax, so that an unchanged function keeps
its version across deploys, or the app's ``version`` when it names one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

import durable
from engine._registry import CodeVersions, code_version
from engine.errors import ConfigurationError


def _define(source: str) -> durable.App:
    namespace: dict[str, object] = {"durable": durable}
    exec(compile(source, "<deploy>", "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, durable.App)
    return app


V1 = """
app = durable.App()

@app.function(name="flow")
async def flow(ctx, n):
    return await ctx.step("a", lambda: n)
"""


FLOW = """
import durable

async def flow(ctx: durable.Context, n: int) -> int:
    return await ctx.step("a", lambda: n)
"""

COMMENTED = """
import durable

async def flow(ctx: durable.Context, n: int) -> int:
    # A comment and a blank line change nothing that runs.

    return await ctx.step("a", lambda: n)
"""


def _deployed(source: str, folder: Path, name: str) -> Any:
    """``flow`` from ``source`` written to a module file and imported (a deploy of that file)."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flow


def test_a_function_keeps_its_version_when_only_comments_and_layout_change(
    tmp_path: Path,
) -> None:
    first = code_version(_deployed(FLOW, tmp_path, "first"))
    assert first == code_version(_deployed(FLOW, tmp_path, "again"))
    assert first == code_version(_deployed(COMMENTED, tmp_path, "commented"))
    assert len(first) == 12


def test_a_changed_body_is_another_version(tmp_path: Path) -> None:
    renamed = FLOW.replace('"a"', '"b"')
    assert code_version(_deployed(FLOW, tmp_path, "first")) != code_version(
        _deployed(renamed, tmp_path, "renamed")
    )


def test_a_function_without_readable_source_is_versioned_by_its_bytecode() -> None:
    first, again = _define(V1), _define(V1)
    assert first.functions["flow"].version == again.functions["flow"].version
    changed = _define(V1.replace('"a"', '"b"'))
    assert changed.functions["flow"].version != first.functions["flow"].version


def test_the_app_version_names_every_function() -> None:
    app = durable.App(version="2026.11.29")

    @app.function(name="flow")
    async def flow(ctx: durable.Context) -> None:
        return None

    assert app.functions["flow"].version == "2026.11.29"


@pytest.mark.parametrize("version", ["", "x" * 300, "bad\nversion"])
def test_a_bad_app_version_is_a_configuration_error(version: str) -> None:
    with pytest.raises(ConfigurationError, match="version"):
        durable.App(version=version)


def test_versioning_is_replay_or_pinned() -> None:
    app = durable.App()
    with pytest.raises(ConfigurationError, match="versioning must be 'replay' or 'pinned'"):
        app.function(versioning="sticky")  # type: ignore[arg-type]


def test_an_eager_start_tells_its_claim_the_entry_of_its_own_function_alone() -> None:
    code = CodeVersions(["a", "b", "c"], ["v1", "v2", "v3"], ["b"])
    assert code.of_one("b") == CodeVersions(["b"], ["v2"], ["b"])
    assert code.of_one("c") == CodeVersions(["c"], ["v3"], [])
    assert code.of_one("z") == CodeVersions([], [], [])
