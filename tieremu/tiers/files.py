"""File tiers: KV blocks stored in a directory on a storage device, read and written with O_DIRECT where the
filesystem allows it, so their speed is the device's and not the page cache's.

A BlockFile is one sparse file of fixed-size slots. Buffers passed in must be page aligned and a multiple of the
page size (KV blocks are, by construction), which is what O_DIRECT needs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path

from tieremu.errors import ConfigError, TieremuError
from tieremu.safefile import UnsafeFileError, create_exclusive

ALIGN = 4096


class FileTierError(TieremuError):
    """A file tier's directory cannot hold blocks, or a block read or write came up short."""


class BlockFile:
    """`slots` slots of `slot_bytes` each in one file under `directory`, removed on close."""

    def __init__(self, directory: Path, slot_bytes: int, slots: int, name: str = "kv") -> None:
        if slot_bytes % ALIGN:
            raise ConfigError(f"file tier slots must be a multiple of {ALIGN} bytes, got {slot_bytes}")
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileTierError(f"file tier directory {directory}: {exc.strerror}") from None
        # An unpredictable name, created exclusively without following links: the directory may be shared,
        # and a planted symlink must never make a root process write through it.
        self.path = directory / f"tieremu-{name}-{os.getpid()}-{secrets.token_hex(4)}.blocks"
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.direct = True
        self._fd = -1
        try:
            self._fd = create_exclusive(self.path, os.O_RDWR | os.O_DIRECT)
        except UnsafeFileError as exc:
            raise FileTierError(f"file tier {exc}") from None
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT: fall back, and say so
                raise FileTierError(f"file tier {self.path}: {exc.strerror}") from None
            self.direct = False
            try:
                self._fd = create_exclusive(self.path, os.O_RDWR)
            except UnsafeFileError as exc2:
                raise FileTierError(f"file tier {exc2}") from None
            except OSError as exc2:
                raise FileTierError(f"file tier {self.path}: {exc2.strerror}") from None
        try:
            os.ftruncate(self._fd, slot_bytes * slots)
        except OSError as exc:
            self.close()
            raise FileTierError(f"file tier {self.path}: cannot size it to {slot_bytes * slots} bytes "
                                f"({exc.strerror})") from None

    def write(self, slot: int, addr: int) -> None:
        """Write slot from the aligned buffer at addr."""
        done = os.pwritev(self._fd, [self._view(addr)], self._offset(slot))
        if done != self.slot_bytes:
            raise FileTierError(f"{self.path}: short write of slot {slot} ({done} of {self.slot_bytes} bytes)")

    def read(self, slot: int, addr: int) -> None:
        """Read slot into the aligned buffer at addr."""
        done = os.preadv(self._fd, [self._view(addr)], self._offset(slot))
        if done != self.slot_bytes:
            raise FileTierError(f"{self.path}: short read of slot {slot} ({done} of {self.slot_bytes} bytes)")

    def read_span(self, slot: int, offset: int, length: int, addr: int) -> None:
        """Read `length` bytes at `offset` within slot into the aligned buffer at addr (offset and length page
        multiples, as O_DIRECT needs): a part of a block, such as one layer's K and V."""
        done = os.preadv(self._fd, [self._span_view(addr, offset, length)], self._offset(slot) + offset)
        if done != length:
            raise FileTierError(f"{self.path}: short read of slot {slot} +{offset} ({done} of {length} bytes)")

    def write_span(self, slot: int, offset: int, length: int, addr: int) -> None:
        """Write `length` bytes at `offset` within slot from the aligned buffer at addr (page multiples)."""
        done = os.pwritev(self._fd, [self._span_view(addr, offset, length)], self._offset(slot) + offset)
        if done != length:
            raise FileTierError(f"{self.path}: short write of slot {slot} +{offset} ({done} of {length} bytes)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise FileTierError(f"{self.path}: slot {slot} out of range 0..{self.slots - 1}")
        return slot * self.slot_bytes

    def _span_view(self, addr: int, offset: int, length: int) -> memoryview:
        if offset % ALIGN or length % ALIGN or length <= 0 or offset + length > self.slot_bytes:
            raise FileTierError(f"{self.path}: span +{offset} of {length} bytes is not {ALIGN}-aligned within a "
                                f"{self.slot_bytes}-byte slot")
        if addr % ALIGN:
            raise FileTierError(f"buffer at {addr:#x} is not {ALIGN}-byte aligned, as O_DIRECT needs")
        return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")

    def _view(self, addr: int) -> memoryview:
        if addr % ALIGN:
            raise FileTierError(f"buffer at {addr:#x} is not {ALIGN}-byte aligned, as O_DIRECT needs")
        return memoryview((ctypes.c_char * self.slot_bytes).from_address(addr)).cast("B")
