"""The lab's only way to touch the kernel: reads and checked writes of sysfs/procfs files under one root.

Writes go to the file as one `write(2)` without O_CREAT or O_TRUNC, the way sysfs expects; a missing file
is an error, never created. Every mutation is checked against `tieremu.lab.paths`. Tests subclass this
to animate fixture trees (the `_do_*` methods) and to inject failures. With a root other than / (test mode)
swapoff/swapon edit the fixture's proc/swaps instead of calling the kernel.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable
from pathlib import Path

from tieremu.errors import LabError, LabWriteError
from tieremu.lab import paths
from tieremu.lab.swapcall import SwapSyscall, fixture_swap_syscall, real_swap_syscall, swap_flags
from tieremu.numa.sysfs import SysfsReader


class KernelFS:
    def __init__(self, root: str | os.PathLike[str] | None = None, swap_syscall: SwapSyscall | None = None) -> None:
        self.reader = SysfsReader(root)
        self.root = self.reader.root
        # Test mode: a fixture root never reaches the real swapoff/swapon, whatever its proc/swaps names.
        default = real_swap_syscall if not self.test_mode else fixture_swap_syscall(self.root)
        self._swap_syscall = swap_syscall or default

    @property
    def test_mode(self) -> bool:
        """Working on a fixture tree (any root but /): no call may reach the host's kernel."""
        return self.root.resolve() != Path("/")

    # -- reads -------------------------------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise LabError(f"internal: kernel path {rel!r} must be relative to the sysfs root, without '..'")
        return self.root / rel

    def read(self, rel: str) -> str | None:
        """The file's text, or None when it does not exist (or the hardware says it has no value)."""
        self.path(rel)
        return self.reader.text(rel)

    def value(self, rel: str) -> str | None:
        text = self.read(rel)
        return None if text is None else text.strip()

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def is_dir(self, rel: str) -> bool:
        return self.path(rel).is_dir()

    def listdir(self, rel: str) -> list[str]:
        self.path(rel)
        return self.reader.listdir(rel)

    # -- mutations ---------------------------------------------------------------------------------------

    def write(self, rel: str, value: str) -> None:
        paths.check_writable(rel)
        self._guard(f"write {value!r} to", rel, lambda: self._do_write(self.path(rel), value))

    def mkdir(self, rel: str) -> None:
        paths.check_dir(rel)
        self._guard("create", rel, lambda: self._do_mkdir(self.path(rel)))

    def rmdir(self, rel: str) -> None:
        paths.check_dir(rel)
        self._guard("remove", rel, lambda: self._do_rmdir(self.path(rel)))

    def swapoff(self, device: str) -> None:
        _check_device(device)
        self._guard("swapoff", device, lambda: self._swap_syscall("off", device, 0))

    def swapon(self, device: str, priority: int | None) -> None:
        _check_device(device)
        flags = swap_flags(priority)
        self._guard("swapon", device, lambda: self._swap_syscall("on", device, flags))

    def _guard(self, what: str, rel: str, op: Callable[[], None]) -> None:
        try:
            op()
        except OSError as exc:
            code = exc.errno or 0
            name = errno_mod.errorcode.get(code, str(code))
            where = rel if rel.startswith("/") else f"{self.root / rel}"
            raise LabWriteError(f"cannot {what} {where}: {exc.strerror or exc} ({name})",
                                path=rel, errno=code) from None

    # -- the kernel side; tests override these to emulate kernel semantics on plain files -----------

    def _do_write(self, path: Path, value: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, (value + "\n").encode())
        finally:
            os.close(fd)

    def _do_mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def _do_rmdir(self, path: Path) -> None:
        os.rmdir(path)


def _check_device(device: str) -> None:
    # Swap areas are named by the absolute path /proc/swaps shows; anything else is a bug.
    if not device.startswith("/") or "\n" in device or "\0" in device:
        raise LabError(f"internal: {device!r} is not a swap area path as /proc/swaps shows it")
