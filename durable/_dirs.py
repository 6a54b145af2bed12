"""Directories and files of the embedded server, made without trusting what is already there.

As root, the server's files belong to an unprivileged user, its socket may live in /tmp and the
base directory is wherever ``DURABLE_DATA_DIR`` says. A name that another local user managed to
plant (a symbolic link, a directory of theirs) must never make us chown, chmod, write or read
something else. So:

- The base directory and its ancestors must not be writable by other users (``ssh`` checks
  ``~/.ssh`` the same way): then nobody else can plant a name beside the data directory. A
  sticky ancestor (``/tmp``) is fine, since only an entry's owner can replace it.
- A private directory is created with ``mkdir``, which never follows a link, and changed through
  a descriptor opened with ``O_NOFOLLOW``. One that already exists is used only if it is a real
  directory belonging to the server's user (or to us, who may hand it over).
- A file written into a directory that another user owns (the data directory belongs to the
  server's user) is created under a random name with ``O_EXCL`` and renamed into place: the
  rename replaces a planted link instead of following it. Files are read with ``O_NOFOLLOW``
  and ``O_NONBLOCK`` (a planted FIFO must not hang us), and only if they are regular files.

Every ``OSError`` about the base directory becomes an ``EmbeddedPostgresError`` naming the path,
which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from engine.errors import EmbeddedPostgresError

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_LIMIT = 1 << 20


def user_name(uid: int) -> str:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def _group_name(gid: int) -> str:
    with contextlib.suppress(KeyError):
        return grp.getgrgid(gid).gr_name
    return f"gid {gid}"


def _others_can_change(st: os.stat_result, *, sticky_ok: bool) -> str | None:
    """Why another user could replace what is in this directory, or None if nobody can.

    A group-writable directory is accepted when its group is our primary group (the usual
    per-user group), so a umask of 002 does not lock users out."""
    if st.st_uid not in (0, os.getuid()):
        return f"it belongs to {user_name(st.st_uid)}"
    if sticky_ok and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return "every user can write to it"
    if st.st_mode & stat.S_IWGRP and st.st_gid != os.getgid():
        return f"group {_group_name(st.st_gid)} can write to it"
    return None


def check_base(base: Path) -> None:
    """Refuse ``base`` if another user could plant names in it or swap it for something else:
    it, its ancestors and any symbolic link on the way must belong to root or to us, and none
    of them may be writable by others (but a sticky ancestor may)."""
    _check(base, base)


def _check(base: Path, upto: Path) -> None:
    """Check ``upto`` (``base`` or the ancestor of it that exists) as ``check_base`` does;
    ``upto`` itself may be sticky only if it is an ancestor (we will create ``base`` in it)."""
    for step in [*reversed(upto.parents), upto]:
        st = os.lstat(step)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.getuid()):
            _refuse(base, step, f"it is a symbolic link of {user_name(st.st_uid)}'s")
    real = upto.resolve()
    for folder in [real, *real.parents]:
        sticky_ok = folder != real or upto != base
        reason = _others_can_change(os.stat(folder), sticky_ok=sticky_ok)
        if reason is not None:
            _refuse(base, folder, reason)


def check_shared_parent(parent: Path) -> None:
    """Refuse ``parent`` (a temporary directory) for a directory of ours if another user could
    move our entry away and put theirs in its place."""
    real = parent.resolve()
    for folder in [real, *real.parents]:
        reason = _others_can_change(os.stat(folder), sticky_ok=True)
        if reason is not None:
            raise EmbeddedPostgresError(
                f"refusing to put the embedded PostgreSQL's socket in {parent}: another user "
                f"could replace what is in {folder} ({reason}); set TMPDIR elsewhere"
            )


def _refuse(base: Path, folder: Path, reason: str) -> NoReturn:
    where = "it" if folder == base.resolve() else f"its ancestor {folder}"
    raise EmbeddedPostgresError(
        f"refusing to keep the embedded PostgreSQL's data in {base}: another user could "
        f"change {where} ({reason}). Use a directory only you (or root) can write to, e.g. "
        f"`chmod go-w {folder}`, or set DURABLE_DATA_DIR elsewhere."
    )


def make_base(base: Path, mode: int) -> None:
    """Create ``base`` (with ``mode`` if we create it) after checking where it goes, and check
    it. Every failure is an ``EmbeddedPostgresError`` naming ``base``."""
    with explained(base):
        existing = next(p for p in [base, *base.parents] if os.path.lexists(p))
        _check(base, existing)
        if existing != base:
            base.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                os.mkdir(base, mode)
                os.chmod(base, mode)  # exactly: the umask must not take the server user's x
        check_base(base)
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(base))


@contextlib.contextmanager
def explained(base: Path) -> Iterator[None]:
    """Turn an ``OSError`` met while using ``base`` into a one-line ``EmbeddedPostgresError``."""
    try:
        yield
    except OSError as exc:
        place = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(base) else ""
        raise EmbeddedPostgresError(
            f"cannot use {base} for the embedded PostgreSQL's data: "
            f"{exc.strerror or exc}{place}. Set DURABLE_DATA_DIR to a directory you can "
            f"write to, or set DURABLE_DATABASE_URL."
        ) from exc


# -- private directories ---------------------------------------------------------------------


def private_dir(path: Path, uid: int, gid: int) -> None:
    """Make ``path`` a directory that only ``uid`` can use (owned by it, mode 0700), creating
    it if needed. Refuse a link, a file, or a directory that belongs to someone else."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = _open_dir(path)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (uid, os.getuid()):
            raise EmbeddedPostgresError(
                f"{path} belongs to {user_name(st.st_uid)}, not to {user_name(uid)} who runs "
                f"the embedded PostgreSQL; refusing to use it. Move it away or set "
                f"DURABLE_DATA_DIR."
            )
        if st.st_uid != uid or st.st_gid != gid:
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def reusable_private_dir(path: Path, uid: int, gid: int) -> bool:
    """Whether ``path`` is, or could now be made, a private directory of ``uid``'s: it exists as
    one, or nothing is there and we created it. Something else there means no."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    else:
        private_dir(path, uid, gid)
        return True
    try:
        fd = _open_dir(path)
    except EmbeddedPostgresError:
        return False
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700


def new_private_dir(parent: Path, prefix: str, uid: int, gid: int) -> Path:
    """A new private directory of ``uid``'s under ``parent``, with an unpredictable name."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    private_dir(path, uid, gid)
    return path


def remove_private_dir(path: Path, uid: int) -> None:
    """Remove ``path`` and what is in it, if it is a real directory of ``uid``'s."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            shutil.rmtree(path)  # works through descriptors: a link inside is removed, not followed


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, _NOFOLLOW_DIR)
    except OSError as exc:
        # With O_DIRECTORY, a link to a directory fails as ENOTDIR rather than ELOOP.
        if exc.errno == errno.ELOOP or os.path.islink(path):
            reason = "it is a symbolic link, which is not followed here"
        elif exc.errno == errno.ENOTDIR:
            reason = "it is not a directory"
        else:
            reason = exc.strerror or str(exc)
        raise EmbeddedPostgresError(f"cannot use {path} as a private directory: {reason}") from exc


# -- files -------------------------------------------------------------------------------------


def write_file(path: Path, text: str, *, uid: int = -1, gid: int = -1, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically, as a new file of ``uid``/``gid`` (-1: ours)
    with ``mode``. A link at ``path`` is replaced, never followed; readers see the old or the
    new content, never a half-written file."""
    directory = os.open(path.parent, _NOFOLLOW_DIR)
    try:
        temporary = f".{path.name}.{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, mode, dir_fd=directory)
        try:
            with os.fdopen(fd, "w") as handle:
                if uid != -1 or gid != -1:
                    os.fchown(handle.fileno(), uid, gid)
                os.fchmod(handle.fileno(), mode)
                handle.write(text)
            os.rename(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
    finally:
        os.close(directory)


def read_file(path: Path, *, tail: int | None = None) -> str | None:
    """The text of regular file ``path`` (its last ``tail`` bytes if given), or None if it is
    missing, a link, not a regular file or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if tail is not None and st.st_size > tail:
            os.lseek(fd, st.st_size - tail, os.SEEK_SET)
        return os.read(fd, _READ_LIMIT).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def fresh_log(path: Path, uid: int, gid: int) -> int:
    """A new, empty log file at ``path`` for ``uid``, opened for appending; the previous log
    is kept as ``<name>.1``. Returns the descriptor (the caller closes it)."""
    directory = os.open(path.parent, _NOFOLLOW_DIR)
    try:
        with contextlib.suppress(FileNotFoundError):  # renames the entry, even if a link
            os.rename(path.name, f"{path.name}.1", src_dir_fd=directory, dst_dir_fd=directory)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path.name, flags, 0o600, dir_fd=directory)
    finally:
        os.close(directory)
    if uid != -1:
        os.fchown(fd, uid, gid)
    return fd


def touch(path: Path) -> None:
    """Create ``path`` if missing, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    os.close(os.open(path, flags, 0o600))


def open_lock(path: Path) -> int:
    """A descriptor of lock file ``path`` (created if missing, never through a link)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
