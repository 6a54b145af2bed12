"""The README runs as written: its Python blocks, in order, as one program (the quickstart
finishes a run, the later blocks build on it, and the test functions it shows pass), and every
command its shell blocks show is one the CLI and the scripts accept."""

from __future__ import annotations

import asyncio
import inspect
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from durable import _cli

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(blocks("python")) >= 2
    assert any("asyncio.run(main())" in b for b in blocks("python")), "the quickstart moved"
    assert len(blocks("bash")) >= 5


def test_the_python_blocks_run_in_order_and_the_quickstart_finishes_its_run(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DURABLE_DATABASE_URL", database_url)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for index, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "result: {'upgraded': True}" in printed, printed
    assert "email 'welcome' to a@b.c" in printed
    assert re.search(r"#2 event upgraded .*'plan': 'pro'", printed), printed
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    for test in tests:  # the tests the README shows users, run as pytest would run them
        result = test()
        if inspect.isawaitable(result):
            asyncio.run(_awaited(result))


async def _awaited(awaitable: Any) -> None:
    await awaitable


def _commands(prefix: str) -> list[list[str]]:
    """Every command line in the shell blocks that runs ``prefix``, split as the shell would
    (comments dropped, leading VAR=value assignments skipped)."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words and words[0] == prefix:
                found.append(words)
    return found


def test_every_durable_command_in_the_readme_is_one_the_cli_accepts() -> None:
    commands = [c for words in _commands("durable") for c in _synopsis(words[1:])]
    assert len(commands) >= 10
    for args in commands:
        try:
            _cli._parser().parse_args(args)
        except SystemExit as refused:  # argparse's way to refuse
            pytest.fail(f"README command 'durable {' '.join(args)}' exits {refused.code}")


def _synopsis(words: list[str]) -> list[list[str]]:
    """The commands a synopsis line stands for: ``a|b`` is each of them, ``[--opt value]``
    both without and with the option."""
    plain: list[list[str]] = [[]]
    for word in words:
        choices = word.split("|") if "|" in word and not word.startswith("[") else [word]
        plain = [[*done, choice] for done in plain for choice in choices]
    without = [[w for w in c if not _in_brackets(c, w)] for c in plain]
    with_all = [[w.strip("[]") for w in c] for c in plain]
    return [*without, *with_all]


def _in_brackets(words: list[str], word: str) -> bool:
    depth = 0
    for each in words:
        depth += each.count("[")
        inside = depth > 0
        depth -= each.count("]")
        if each is word:
            return inside
    return False


def test_every_script_the_readme_runs_exists_and_is_executable() -> None:
    scripts = {words[0] for block in blocks("bash") for words in _script_lines(block)}
    assert {"scripts/demo", "scripts/test", "scripts/bench"} <= scripts
    for script in scripts:
        path = ROOT / script
        assert path.is_file(), script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"


def _script_lines(block: str) -> list[list[str]]:
    found = []
    for line in block.splitlines():
        words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        if words and words[0].startswith("scripts/"):
            found.append(words)
    return found
