"""The command line as a careless or hostile user meets it: no password is ever printed, every
error is one line and an exit status of 1 or 2 (never a traceback), large payloads come from a
file or standard input, and a bad value stores nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
SECRET = "S3cret"


def durable_cli(
    *args: str | bytes, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``durable ARGS`` as a user would, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "durable", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The single line a failed command printed on standard error."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def with_password(url: str, *, in_query: bool = False) -> str:
    """``url`` carrying a password the server does not ask for (trust or peer)."""
    parts = urlsplit(url)
    if in_query:
        query = f"{parts.query}&password={SECRET}" if parts.query else f"password={SECRET}"
        return urlunsplit(parts._replace(query=query))
    user, _at, hosts = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{SECRET}@{hosts}"))


@pytest.mark.parametrize("in_query", [False, True], ids=["user-part", "query"])
def test_migrate_never_prints_the_password(database_url: str, in_query: bool) -> None:
    done = durable_cli("--database-url", with_password(database_url, in_query=in_query), "migrate")
    assert done.returncode == 0, done.stderr
    assert "schema up to date in" in done.stdout
    assert SECRET not in done.stdout + done.stderr
    assert "***" in done.stdout


def test_an_unreachable_database_is_one_line_after_the_timeout_without_the_password() -> None:
    url = f"postgresql://u:{SECRET}@127.0.0.1:1/x?password={SECRET}"
    done = durable_cli("--database-url", url, "--connect-timeout", "1", "runs", "list")
    line = one_line_error(done, 2)
    assert "unreachable after" in line
    assert SECRET not in done.stdout + done.stderr


def test_a_url_of_another_scheme_is_refused_without_echoing_its_password() -> None:
    url = f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:5432/test"
    line = one_line_error(durable_cli("--database-url", url, "runs", "list"), 2)
    assert "postgresql://" in line
    assert SECRET not in line


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "list", "--limit", "-1"],
        ["runs", "list", "--limit", str(10**30)],
        ["worker", "tests.acceptance.workflows:app", "--log-level", "LOUD"],
        ["worker", "tests.acceptance.workflows:app", "--concurrency", "0"],
        ["worker", "tests.acceptance.workflows:app", "--concurrency", "-5"],
        ["runs", "frobnicate"],
        ["runs", "fork", str(uuid.UUID(int=1))],
        ["runs", "fork", str(uuid.UUID(int=1)), "--from-step", "a", "--from-position", "1"],
        ["runs", "retry", "--status", "failed", "--since", "5x"],
        ["runs", "retry", "--status", "completed"],
        ["check"],
        ["check", "tests.acceptance.versioned_app:app", "--include-completed", "-1"],
        [],
    ],
    ids=" ".join,
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str]) -> None:
    line = one_line_error(durable_cli(*args), 2)
    assert line.startswith("durable"), line
    assert ": error: " in line, line


def test_resuming_an_unknown_run_says_there_is_no_such_run(database_url: str) -> None:
    unknown = str(uuid.uuid4())
    line = one_line_error(durable_cli("--database-url", database_url, "runs", "resume", unknown), 1)
    assert line == f"durable: no run with id {unknown}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["runs", "retry"], "durable: give a RUN_ID, or --status to retry every run of a status"),
        (
            ["runs", "retry", str(uuid.UUID(int=1)), "--status", "failed"],
            "durable: give a RUN_ID or --status (with --function, --since), not both",
        ),
        (["runs", "retry", "not-a-uuid"], "durable: not a run id (a UUID): 'not-a-uuid'"),
        (["check", "no_such_module:app"], "durable: cannot import 'no_such_module'"),
        (["check", "tests.acceptance.versioned_app"], "durable: expected module:attribute"),
        (
            ["runs", "fork", str(uuid.UUID(int=1)), "--from-step", "a", "--input", "{"],
            "durable: --input is not valid JSON",
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_a_bad_versioning_command_is_one_line_and_exit_2(
    database_url: str, args: list[str], expected: str
) -> None:
    line = one_line_error(durable_cli("--database-url", database_url, *args), 2)
    assert line.startswith(expected), line


def test_forking_or_retrying_an_unknown_run_says_there_is_no_such_run(database_url: str) -> None:
    unknown = str(uuid.uuid4())
    for args in (["fork", unknown, "--from-step", "a"], ["retry", unknown]):
        line = one_line_error(durable_cli("--database-url", database_url, "runs", *args), 1)
        assert line == f"durable: no run with id {unknown}"


def test_versions_and_a_dry_run_retry_of_an_empty_database_say_so(database_url: str) -> None:
    done = durable_cli("--database-url", database_url, "versions")
    assert (done.returncode, done.stdout) == (0, "no runs\n"), done.stderr
    done = durable_cli("--database-url", database_url, "runs", "retry", "--status", "failed")
    assert (done.returncode, done.stdout) == (0, "0 failed runs not retried yet\n"), done.stderr


@pytest.mark.parametrize(
    "args",
    [
        [b"events", b"send", b"name\xff\xfe"],
        [b"events", b"send", b"name", b"--key", b"key\xc3"],
        [b"events", b"send", b"name", b"--payload", b'{"text": "\xff"}'],
        [b"events", b"send", b"name", b"--payload", b"NaN"],
        [b"events", b"send", b"name", b"--payload", b"[Infinity]"],
        [b"events", b"send", b"e" * 300],
    ],
    ids=lambda args: repr(b" ".join(args[2:])),
)
def test_a_bad_event_from_the_command_line_is_one_line_and_stores_nothing(
    database_url: str, db_events: list[int], args: list[bytes]
) -> None:
    line = one_line_error(durable_cli("--database-url", database_url, *args), 2)
    assert line.startswith("durable: "), line
    assert db_events == [], "nothing was stored before"
    assert events_in(database_url) == [], "a refused event was stored"


def test_a_large_payload_comes_from_a_file_or_from_standard_input(
    database_url: str, tmp_path: Path
) -> None:
    payload = {"lines": ["x" * 100] * 3000}  # 300 kB: over the kernel's 128 kB per argument
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    from_file = durable_cli(
        "--database-url", database_url, "events", "send", "big", "--payload", f"@{path}"
    )
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = durable_cli(
        "--database-url",
        database_url,
        "events",
        "send",
        "big",
        "--payload",
        "-",
        stdin=json.dumps(payload).encode(),
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert [json.loads(p) for p in payloads_of(database_url, "big")] == [payload, payload]
    missing = durable_cli(
        "--database-url", database_url, "events", "send", "big", "--payload", "@/no/such.json"
    )
    assert "cannot read it" in one_line_error(missing, 2)


@pytest.fixture
def db_events(database_url: str) -> list[int]:
    return events_in(database_url)


def events_in(url: str) -> list[int]:
    return [r[0] for r in _fetch(url, "SELECT id FROM durable.events")]


def payloads_of(url: str, name: str) -> list[str]:
    rows = _fetch(url, "SELECT payload::text FROM durable.events WHERE name = $1 ORDER BY id", name)
    return [r[0] for r in rows]


def _fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())
