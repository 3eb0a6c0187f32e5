"""Page-aligned memory regions with a NUMA policy applied before first touch, viewed as torch tensors.

A Region owns a private anonymous mapping (Python's default anonymous mmap is shared and gets no huge
pages). Tensors view it through numpy without copying; every view holds a buffer export on the mapping,
so the memory stays mapped as long as any view lives and an early close raises instead of crashing.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tieremu.errors import NodeFullError, PlacementError
from tieremu.numa import pages, syscalls
from tieremu.numa.syscalls import Policy
from tieremu.numa.sysfs import format_list
from tieremu.numa.topology import discover

if TYPE_CHECKING:
    import torch

HUGE_PAGE_SIZE = 2 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14; not in Python 3.11's mmap constants

_libc = ctypes.CDLL(None, use_errno=True)


class Region:
    """A mapping of `nbytes` at page-aligned `addr` whose pages follow `policy` over `nodes`."""

    def __init__(self, mapping: mmap.mmap, offset: int, nbytes: int, policy: Policy,
                 nodes: tuple[int, ...], hugepages: bool) -> None:
        self._mapping = mapping
        self._array: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)
        self._base = int(self._array.ctypes.data) - offset  # the mapping's start, for madvise offsets
        self.nbytes = nbytes
        self.policy = policy
        self.nodes = nodes
        self.hugepages = hugepages

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise PlacementError("region is closed")
        return self._array

    @property
    def addr(self) -> int:
        return int(self.array.ctypes.data)

    def tensor(self, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
        """A zero-copy tensor over [offset, offset + numel * itemsize) of this region."""
        import torch

        count = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if offset < 0 or offset + count > self.nbytes:
            raise PlacementError(
                f"a {dtype} tensor of shape {tuple(shape)} needs {count} bytes at offset {offset}, "
                f"but the region holds {self.nbytes} bytes"
            )
        raw = torch.from_numpy(self.array[offset : offset + count])
        return raw.view(dtype).view(tuple(shape))

    def placement(self, start: int = 0, length: int | None = None) -> pages.Placement:
        start, length = self._span(start, length)
        return pages.placement(self.addr + start, length)

    def migrate(self, node: int, start: int = 0, length: int | None = None, *,
                rebind: bool = True, batch: int = syscalls.MOVE_BATCH) -> pages.MigrationResult:
        """Move [start, start+length) to node; with rebind, later faults there land on node too."""
        start, length = self._span(start, length)
        if rebind:
            syscalls.mbind(self.addr + start, length, Policy.BIND, (node,))
        result = pages.migrate(self.addr + start, length, node, batch=batch)
        if rebind and start == 0 and length == self.nbytes:
            self.policy, self.nodes = Policy.BIND, (node,)
        return result

    def populate(self, start: int = 0, length: int | None = None) -> None:
        """Fault [start, start+length) in now, in the kernel, so each page lands where the range's policy says."""
        start, length = self._span(start, length)
        _populate_range(self.addr + start, length, self.nodes)

    def discard(self, start: int = 0, length: int | None = None) -> None:
        """Give [start, start+length)'s pages back (MADV_DONTNEED): the next touch faults a zeroed page in under
        the range's policy, wherever the old pages had been moved to."""
        start, length = self._span(start, length)
        self._madvise(start, length, mmap.MADV_DONTNEED)

    def rebind(self, policy: Policy, nodes: Sequence[int], start: int = 0, length: int | None = None) -> None:
        """Set the policy of [start, start+length) for pages faulted from now on (existing pages stay put)."""
        start, length = self._span(start, length)
        syscalls.mbind(self.addr + start, length, policy, tuple(nodes))

    def _madvise(self, start: int, length: int, advice: int) -> None:
        self._mapping.madvise(advice, self.addr - self._base + start, length)

    def close(self) -> None:
        """Unmap now; fails while any tensor still views the region (the mapping would dangle)."""
        self._array = None
        try:
            self._mapping.close()
        except BufferError:
            self._array = np.frombuffer(self._mapping, dtype=np.uint8, count=self.nbytes)
            raise PlacementError("region still has live tensor views; drop them before close()") from None

    def _span(self, start: int, length: int | None) -> tuple[int, int]:
        length = self.nbytes - start if length is None else length
        if start < 0 or length < 0 or start + length > self.nbytes:
            raise PlacementError(f"range [{start}, {start + length}) is outside the region of {self.nbytes} bytes")
        return start, length

    def __repr__(self) -> str:
        return (f"Region({self.nbytes} bytes at {self.addr:#x}, {self.policy.name.lower()} "
                f"nodes {format_list(self.nodes) or '-'}{', huge pages' if self.hugepages else ''})")


def allocate(nbytes: int, nodes: Sequence[int] = (), policy: Policy = Policy.BIND, *,
             hugepages: bool = False, populate: bool = True, check_free: bool = True) -> Region:
    """Map nbytes, apply policy over nodes before any page exists, then (by default) fault every page in.

    For `bind`, the request is first checked against the nodes' free memory: a bound fault that cannot
    be served calls the OOM killer on this process, so refusing up front is the only clean error.
    """
    nodes = tuple(nodes)
    if nbytes <= 0:
        raise PlacementError(f"region size must be positive, got {nbytes}")
    if policy == Policy.BIND and check_free:
        _check_fits(nbytes, nodes)
    align = HUGE_PAGE_SIZE if hugepages else pages.PAGE_SIZE
    size = _round_up(nbytes, align)
    mapping = mmap.mmap(-1, size + (align if hugepages else 0),
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = int(np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data)
    offset = (-base) % align
    addr = base + offset
    try:
        # Decide huge pages before first touch; 4 KiB pages also avoid the THP EBUSY quirk in migration.
        mapping.madvise(mmap.MADV_HUGEPAGE if hugepages else mmap.MADV_NOHUGEPAGE, offset, size)
        if policy != Policy.DEFAULT:
            syscalls.mbind(addr, size, policy, nodes)
        region = Region(mapping, offset, size, policy, nodes, hugepages)
        if populate:
            _populate(region)
    except BaseException:
        mapping.close()
        raise
    return region


def placement_of(tensor: torch.Tensor) -> pages.Placement:
    """Per-node page counts of the memory a tensor spans (any tensor, not only ours)."""
    if tensor.device.type != "cpu":
        raise PlacementError(f"tensor is on {tensor.device}; only CPU memory has NUMA placement")
    if tensor.numel() == 0:
        return pages.Placement(pages=0, by_node={})
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(tensor.shape, tensor.stride(), strict=True))
    return pages.placement(tensor.data_ptr(), span * tensor.element_size())


def _populate(region: Region) -> None:
    """Fault every page in, in the kernel, so policy decides each page's node."""
    _populate_range(region.addr, region.nbytes, region.nodes)


def _populate_range(addr: int, length: int, nodes: tuple[int, ...]) -> None:
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_POPULATE_WRITE) == 0:
        return
    err = ctypes.get_errno()
    if err == 12:  # ENOMEM
        raise NodeFullError(f"populating {length} bytes on node {format_list(nodes)} failed: "
                            "out of memory", call="madvise(populate_write)", errno=err, nodes=nodes)
    # Older kernels lack MADV_POPULATE_WRITE (EINVAL): write one byte per page instead.
    view = (ctypes.c_char * length).from_address(addr)
    for off in range(0, length, pages.PAGE_SIZE):
        view[off] = 0


def _check_fits(nbytes: int, nodes: tuple[int, ...]) -> None:
    topo = discover("/")
    topo.require_memory_nodes(nodes, "bind")
    free = topo.free_bytes(nodes)
    if free is not None and nbytes > free:
        per_node = ", ".join(f"node {n}: {(topo.free_bytes((n,)) or 0) >> 20} MiB" for n in topo.memory_nodes)
        raise NodeFullError(
            f"cannot bind {nbytes >> 20} MiB to node {format_list(nodes)}: only {free >> 20} MiB free there; "
            f"pick a smaller size or a node with more memory (free: {per_node})",
            call="bind", errno=12, nodes=nodes,
        )


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align
