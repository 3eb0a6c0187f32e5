"""Reading kernel files under a configurable root, so tests can point at fixture trees.

The root holds `sys/` and `proc/` the way `/` does; it comes from the caller, else from the
TIEREMU_SYSFS_ROOT environment variable, else `/`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tieremu.errors import TopologyError

ROOT_ENV = "TIEREMU_SYSFS_ROOT"
T = TypeVar("T")


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The given root, else $TIEREMU_SYSFS_ROOT if set and not empty, else /."""
    return Path(root if root is not None else (os.environ.get(ROOT_ENV) or "/"))


def parse_list(text: str) -> tuple[int, ...]:
    """Parse the kernel's list format ("0-3,8,10-11"; empty means none)."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return tuple(ids)


def format_list(ids: tuple[int, ...] | list[int]) -> str:
    """The inverse of parse_list, for messages and for writing lists back."""
    ranges: list[str] = []
    for i in sorted(set(ids)):
        if ranges and i == int(ranges[-1].split("-")[-1]) + 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{i}"
        else:
            ranges.append(str(i))
    return ",".join(ranges)


class SysfsReader:
    """Reads files under one root; required files raise TopologyError, optional ones return None."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_root(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def text(self, rel: str) -> str | None:
        path = self.path(rel)
        try:
            return path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UnicodeDecodeError:
            raise TopologyError(f"malformed file {path}: not text") from None
        except OSError as exc:
            # Some attribute files answer EIO/EINVAL/EOPNOTSUPP when the hardware does not support them.
            if exc.errno in (5, 22, 95):
                return None
            raise TopologyError(f"cannot read {path}: {exc.strerror}") from None

    def required(self, rel: str, parse: Callable[[str], T]) -> T:
        text = self.text(rel)
        if text is None:
            raise TopologyError(f"required file {self.path(rel)} is missing (sysfs root {self.root})")
        return self._parse(rel, text, parse)

    def optional(self, rel: str, parse: Callable[[str], T]) -> T | None:
        text = self.text(rel)
        return None if text is None else self._parse(rel, text, parse)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _parse(self, rel: str, text: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(text)
        except (ValueError, IndexError) as exc:
            shown = text.strip()[:80]
            raise TopologyError(f"malformed file {self.path(rel)}: {shown!r} ({exc})") from None


def parse_bool(text: str) -> bool:
    """A sysfs boolean: true/false, 1/0 or y/n."""
    value = text.strip().lower()
    if value in ("true", "1", "y"):
        return True
    if value in ("false", "0", "n"):
        return False
    raise ValueError("expected true or false")
