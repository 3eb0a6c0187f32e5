"""Every path this process writes, creates, renames or removes while a test listens, and libc's swap calls looked
up: an audit hook (sys.addaudithook), so no code path can write around it.

Tests import it as `from write_audit import listening, outside` (tests/ is on sys.path, see fixture_paths).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_AUDIT: list[tuple[str, str]] | None = None  # (event, path) while a test listens; the hook cannot be removed
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.truncate",
                "os.chmod", "os.chown", "os.mknod", "shutil.rmtree", "shutil.copytree", "shutil.move"}
# Where an event's paths are and which dir_fd each is relative to (shutil.rmtree unlinks by dir_fd).
_PATH_ARGS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
              "os.chown": ((0, 3),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3))}


def _paths(event: str, args: tuple[object, ...]) -> Iterator[tuple[object, int | None]]:
    for p, d in _PATH_ARGS.get(event, ((0, None), (1, None))):
        path = args[p] if p < len(args) else None
        dir_fd = args[d] if d is not None and d < len(args) else None
        if isinstance(path, (str, bytes, os.PathLike)):
            yield path, dir_fd if isinstance(dir_fd, int) else None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _AUDIT is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _AUDIT.append((event, os.fsdecode(path)))
    elif event in _PATH_EVENTS:
        for path, dir_fd in _paths(event, args):
            where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None and dir_fd >= 0 else ""
            _AUDIT.append((event, os.path.join(where, os.fsdecode(path))))
    elif event == "ctypes.dlsym" and isinstance(args[-1], str) and args[-1] in ("swapon", "swapoff"):
        _AUDIT.append((event, args[-1]))


@contextmanager
def listening() -> Iterator[list[tuple[str, str]]]:
    """The events of the block, as (event, path); listeners do not nest."""
    global _AUDIT
    _AUDIT = []
    try:
        yield _AUDIT
    finally:
        _AUDIT = None


sys.addaudithook(_audit)


def outside(events: list[tuple[str, str]], folder: Path) -> list[str]:
    """The paths written outside folder (Python's own bytecode cache aside: not the code under test)."""
    base = folder.resolve()
    return sorted({p for event, p in events if event != "ctypes.dlsym" and "__pycache__" not in p
                   and not Path(p).resolve().is_relative_to(base)})
