"""The one way tieremu creates files: never through a symlink, never over a device node, FIFO or directory.

tieremu often runs as root (lab profiles, page migration of other processes), in folders other users can write
(/tmp, a shared NVMe mount). So every file it creates is opened with O_NOFOLLOW, temporaries are created with
O_EXCL under an unpredictable name, and an atomic rename only ever replaces a regular file: a planted symlink
or a device node at the destination is refused with a clear error, and its target stays untouched.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tieremu.errors import TieremuError


class UnsafeFileError(TieremuError):
    """A path tieremu was to write is a symlink, a device, a FIFO or a directory, or cannot be written."""


def check_destination(path: str | os.PathLike[str]) -> None:
    """Refuse a destination that exists and is not a regular file (lstat: a symlink is refused, not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeFileError(f"{path}: cannot be checked ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path}: exists and is a {_kind(st.st_mode)}, not a regular file; tieremu writes only "
                              "regular files and leaves this one alone (remove it or choose another path)")


def create_exclusive(path: str | os.PathLike[str], flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """A new file opened with O_CREAT|O_EXCL|O_NOFOLLOW: fails if anything (a symlink included) stands there."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UnsafeFileError(f"{path}: already exists (perhaps a planted link); tieremu creates its files "
                              "exclusively and will not write through it") from None


def open_append(path: str | os.PathLike[str], mode: int = 0o644) -> BinaryIO:
    """A regular file opened for appending, created if missing; a symlink or special file there is refused."""
    check_destination(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise write_error(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device swapped in between lstat and open
        os.close(fd)
        check_destination(path)
    return os.fdopen(fd, "ab", buffering=0)


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Write a file under a fresh exclusive temporary name beside it, then rename it over `path`, which may
    only be missing or a regular file. A reader never sees half a file; a failure leaves no temporary."""
    path = Path(path)
    check_destination(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = create_exclusive(tmp, os.O_WRONLY, mode)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        check_destination(path)  # again: something may have been planted while we wrote
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, mode: int = 0o644, *, fsync: bool = False) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically and safely (see atomic_writer)."""
    with atomic_writer(path, mode, fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_error(path: str | os.PathLike[str], exc: OSError) -> UnsafeFileError:
    """An OSError of a write turned into a clear error (full disk, read-only filesystem, no permission)."""
    return UnsafeFileError(f"cannot write {path}: {exc.strerror or exc}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
