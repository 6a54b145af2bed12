"""PgBouncer in transaction pooling mode, in front of a test server, for the tests that run
through a pooler (Debian's ``pgbouncer``; ``scripts/test`` installs it when it can).

``pgbouncer(server_url)`` starts one in a temporary directory of its own, on a free port of
127.0.0.1, with ``auth_type = trust`` and a small pool (``default_pool_size``, per database),
so that clients really share server connections; it is stopped, and its directory removed,
when the block ends. Every database of the server is reachable through it by name.

A server on a Unix socket (the embedded one) is reached through a relay in this process:
the embedded server admits only the OS user who started it (peer authentication), and
PgBouncer refuses to run as root, so as root it runs as ``nobody`` and connects over TCP to
the relay, which connects to the socket as this process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_READY_SECONDS = 10.0
# Every PgBouncer started here and not yet stopped: stopped at exit too, should a block not
# reach its end (pytest ended by SIGTERM: see tests/conftest.py).
_RUNNING: set[subprocess.Popen[bytes]] = set()


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer: ``url(direct)`` is the URL of the same database through it."""

    port: int
    log: Path

    def url(self, direct: str) -> str:
        parts = urlsplit(direct)
        user = unquote(parts.username or "postgres")
        return f"postgresql://{user}@127.0.0.1:{self.port}{parts.path}"


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


@contextlib.contextmanager
def pgbouncer(server_url: str, *, pool_size: int = 5) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the server of ``server_url`` (see the module
    docstring); the test is skipped when PgBouncer is not installed."""
    program = binary()
    if program is None:
        pytest.skip("pgbouncer is not installed (scripts/test installs it as root)")
    host, port = _address(server_url)
    with contextlib.ExitStack() as stack:
        if host.startswith("/"):
            relay = stack.enter_context(_relay(f"{host}/.s.PGSQL.{port}"))
            host, port = "127.0.0.1", relay
        folder = Path(tempfile.mkdtemp(prefix="durable-pgbouncer-"))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        folder.chmod(0o755)  # read by the user PgBouncer runs as
        listen = _free_port()
        (folder / "userlist.txt").write_text('"postgres" ""\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {listen}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {folder / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 1000\n"
            # asyncpg's connection parameters PgBouncer does not track.
            "ignore_startup_parameters = extra_float_digits\n"
        )
        for name in ("userlist.txt", "pgbouncer.ini"):
            (folder / name).chmod(0o644)
        log = folder / "pgbouncer.log"
        as_nobody = ["-u", "nobody"] if os.getuid() == 0 else []
        with log.open("wb") as out:
            process = subprocess.Popen(
                [program, *as_nobody, str(folder / "pgbouncer.ini")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _RUNNING.add(process)
        stack.callback(_stop, process)
        _wait_ready(process, listen, log)
        yield PgBouncer(listen, log)


def _address(url: str) -> tuple[str, int]:
    """The host (or socket directory) and port of a postgresql:// URL."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["/var/run/postgresql"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return host, port


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited at start:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen within {_READY_SECONDS}s:\n{log.read_text()}")


@atexit.register
def _stop_the_rest() -> None:
    for process in list(_RUNNING):
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    _RUNNING.discard(process)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # immediate shutdown: clients are disconnected
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _relay(socket_path: str) -> Iterator[int]:
    """A TCP port on 127.0.0.1 whose connections are piped to ``socket_path``, served by a
    thread of this process until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pgbouncer-relay", daemon=True)
    thread.start()
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        pipes.add(task)
        try:
            try:
                upstream = await asyncio.open_unix_connection(socket_path)
            except OSError:  # the server is down (a restart): PgBouncer tries again
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            pipes.discard(task)

    async def open_server() -> asyncio.Server:
        return await asyncio.start_server(pipe, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(open_server(), loop).result()
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:

        async def shut() -> None:
            server.close()
            for task in list(pipes):
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from ``reader`` to ``writer`` until either side ends; then ``writer`` ends."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
