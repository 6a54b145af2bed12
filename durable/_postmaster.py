"""The postmaster process: started without a shell, waited for, watched and stopped by signal.

``pg_ctl start`` builds a ``/bin/sh -c`` command line out of the data directory, the log file and
the server options, so a data directory named ``x$(id)`` ran ``id``. Here no command goes
through a shell. A tiny launcher (``python -I -S -c``) starts ``postgres`` from an argument
vector in a new session and exits at once: the postmaster is then the child of init, never of
the process that started it, so it outlives that process and never lingers as its zombie. The
postmaster writes to a log file opened for it in advance. Readiness is what ``pg_ctl -w``
checks: the status line of ``postmaster.pid`` says ``ready``; an early exit is reported with the
end of the log. Stopping is SIGINT (PostgreSQL's fast shutdown) to a postmaster already proven
ours, waited for through a pidfd when the kernel has them.

Nothing here decides which data directory is ours: ``durable._pg`` passes the paths, and only
signals a pid that ``is_our_postmaster`` vouched for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from durable import _dirs
from engine.errors import EmbeddedPostgresError

# The launcher's whole program. Its arguments: uid, gid (-1 keeps the launcher's own, for a
# non-root user), the log's descriptor, then the postmaster's argument vector.
_LAUNCHER = """\
import os, subprocess, sys
uid, gid, log = (int(arg) for arg in sys.argv[1:4])
switch = uid >= 0
child = subprocess.Popen(
    sys.argv[4:], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
    start_new_session=True, user=uid if switch else None, group=gid if switch else None,
    extra_groups=[] if switch else None,
)
sys.stdout.write(str(child.pid))
sys.stdout.flush()
os._exit(0)
"""

_STATUS_LINE = 7  # postmaster.pid, line 8: "starting", "ready", "stopping" (PostgreSQL >= 10)
_POLL_SECONDS = 0.05


def launch(argv: list[str], *, log_fd: int, env: dict[str, str], uid: int, gid: int) -> int:
    """Start ``argv`` (a postmaster) detached, as ``uid``/``gid`` (-1: as we are), writing to
    ``log_fd``; return its pid. The launcher runs as us: only the postmaster changes user."""
    launcher = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(uid), str(gid), str(log_fd), *argv],
        pass_fds=(log_fd,),
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        start_new_session=True,  # a Ctrl-C at the terminal must not kill it half-way
        check=False,
    )
    if launcher.returncode != 0 or not launcher.stdout.isdigit():
        raise EmbeddedPostgresError(
            f"could not start {argv[0]}: {one_line(launcher.stderr) or launcher.returncode}"
        )
    return int(launcher.stdout)


def wait_ready(data_dir: Path, pid: int, log: Path, timeout: float) -> None:
    """Return once postmaster ``pid`` says it is ready in ``data_dir/postmaster.pid``; raise
    with the end of ``log`` if it exits first or is still not ready after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with _exit_signal(pid) as pidfd:
        while True:
            lines = pidfile_lines(data_dir)
            ready = len(lines) > _STATUS_LINE and lines[_STATUS_LINE].strip() == "ready"
            if ready and lines[0].strip() == str(pid):
                return
            if not running(pid):
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited while starting for {data_dir}: {log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not become ready within {timeout:.0f} s for {data_dir}; "
                    f"see {log}"
                )
            _wait_exit(pid, pidfd, _POLL_SECONDS)


def stop(pid: int, timeout: float) -> None:
    """Fast shutdown of postmaster ``pid`` (SIGINT: end sessions, checkpoint, exit), waited
    for. Raise if it is still running after ``timeout`` s."""
    with _exit_signal(pid) as pidfd:
        with contextlib.suppress(ProcessLookupError):
            if pidfd is None:
                os.kill(pid, signal.SIGINT)
            else:  # the descriptor names this process even if the pid were reused meanwhile
                signal.pidfd_send_signal(pidfd, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while running(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                raise EmbeddedPostgresError(
                    f"PostgreSQL (pid {pid}) did not stop within {timeout:.0f} s"
                )
            _wait_exit(pid, pidfd, min(left, 1.0))


async def exited(pid: int, data_dir: Path, poll_seconds: float) -> None:
    """Return when postmaster ``pid`` of ``data_dir`` has exited (at once if it is not there).

    The kernel says so through a pidfd, read by the event loop; without pidfds (an old kernel,
    a sandbox) or a loop that cannot watch descriptors, this polls every ``poll_seconds``.
    """
    with _exit_signal(pid) as pidfd:
        if not is_our_postmaster(pid, data_dir):  # checked after opening: no reused pid
            return
        if pidfd is not None:
            loop = asyncio.get_running_loop()
            gone = asyncio.Event()
            with contextlib.suppress(NotImplementedError):
                loop.add_reader(pidfd, gone.set)
                try:
                    await gone.wait()
                finally:
                    loop.remove_reader(pidfd)
                return
        await _polled_exit(pid, data_dir, poll_seconds)


async def _polled_exit(pid: int, data_dir: Path, poll_seconds: float) -> None:
    # Nothing to wait on but time: without a pidfd, an exit is seen only by looking.
    while is_our_postmaster(pid, data_dir):  # noqa: ASYNC110
        await asyncio.sleep(poll_seconds)


def wait_for_leftovers(data_dir: Path, timeout: float) -> None:
    """Wait (up to ``timeout`` s) until no server process of a killed postmaster still works in
    ``data_dir``. They exit on their own once they notice; until then they hold the old
    shared memory, and a new postmaster would refuse to start ("pre-existing shared memory
    block is still in use")."""
    deadline = time.monotonic() + timeout
    while _leftovers(data_dir) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)


def _leftovers(data_dir: Path) -> list[int]:
    """PostgreSQL processes whose working directory is ``data_dir`` (every server process
    changes into its data directory)."""
    target = str(data_dir.resolve())
    found = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/cwd") == target and _is_postgres(cmdline(pid)):
                found.append(pid)
    return found


# -- telling processes apart ----------------------------------------------------------------------


@contextlib.contextmanager
def _exit_signal(pid: int) -> Iterator[int | None]:
    """A pidfd for ``pid`` (readable once it exits), or None where pidfds are unavailable."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd_open here, or the process is already gone
        pidfd = None
    try:
        yield pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_exit(pid: int, pidfd: int | None, seconds: float) -> None:
    """Sleep up to ``seconds``, waking early when ``pid`` exits (if we hold its pidfd)."""
    if pidfd is None:
        time.sleep(seconds)
    else:
        select.select([pidfd], [], [], seconds)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie is not: it has exited and only waits for its
    parent (init, for a postmaster we launched) to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def pidfile_lines(data_dir: Path) -> list[str]:
    return (_dirs.read_file(data_dir / "postmaster.pid") or "").splitlines()


def pidfile_pid(data_dir: Path) -> int | None:
    return lock_file_pid(data_dir / "postmaster.pid")


def lock_file_pid(path: Path) -> int | None:
    """The pid on the first line of a PostgreSQL lock file (``postmaster.pid``, a socket's
    ``.lock``), or None."""
    try:
        return int((_dirs.read_file(path) or "").splitlines()[0].strip())
    except (ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_postgres(args: list[str]) -> bool:
    return bool(args) and Path(args[0]).name.startswith("postgres")


def is_our_postmaster(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a postmaster whose command line names ``data_dir`` (``-D``)."""
    args = cmdline(pid)
    if not _is_postgres(args):
        return False
    for flag, value in itertools.pairwise(args):
        if flag == "-D":
            with contextlib.suppress(OSError):
                return Path(value).resolve() == data_dir.resolve()
    return False


def postmasters_of(data_dir: Path) -> list[int]:
    """Every live postmaster whose command line names ``data_dir``."""
    return [pid for pid in all_pids() if is_our_postmaster(pid, data_dir)]


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(log: Path, lines: int = 3) -> str:
    """The last lines of a server log, on one line (errors are printed as one line)."""
    text = _dirs.read_file(log, tail=4000) or ""
    last = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(last) or f"no output (see {log})"


def one_line(text: str) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-3:] if line.strip())


def fetch_value(url: str, sql: str) -> object:
    """``fetchval(sql)`` on a new connection, from synchronous code: in a thread of its own so
    that it works whether or not the caller's thread runs an event loop."""

    async def ask() -> object:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    def run() -> object:
        try:
            return asyncio.run(ask())
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise EmbeddedPostgresError(f"cannot query the embedded PostgreSQL: {exc}") from exc

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="durable-pg") as pool:
        return pool.submit(run).result()
