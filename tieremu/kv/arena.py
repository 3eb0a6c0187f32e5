"""Arenas: where a tier's KV blocks are stored. One per tier, fixed-size slots, one block per slot.

A NUMA arena is one region from the tier allocator with the tier's memory policy, viewed as a tensor of
blocks. A block that moves to another NUMA node by page migration keeps its slot (and so its address) in the
arena it was born in; the pool tracks the tier it is on now. So that any arena can hold every block the pool
may own, a NUMA arena reserves address space for the pool's total capacity but only faults pages in for slots
in use: the reservation costs no memory. A kernel-managed arena (the kernel's own tiering as a baseline) places a
new block's pages under the tier's policy, then hands them to the default policy, so that the kernel may promote
them on NUMA hint faults and demote them on reclaim (a bound page is never promoted).

A file arena is a sparse file of slots in the tier's directory (O_DIRECT where possible). Its blocks stay in the
file: a read of one layer of a block preads that layer's K and V (the page-aligned span holding them) into a
one-block bounce buffer in host memory and copies them out; a write of tokens reads that span, changes it and
writes it back. Every such I/O is real, timed and counted (`FileIO`): a file tier's speed is the device's (or the
page cache's, where the filesystem refuses O_DIRECT: `direct` says which), never a model.

A device arena is one torch tensor of slots on a torch device: a real cuda tier's HBM. Device memory has no pages
the kernel places, so blocks reach it and leave it only by copy, and it holds only its own tier's capacity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tieremu.errors import KVError
from tieremu.kv.layout import KVLayout
from tieremu.numa import syscalls
from tieremu.numa.pages import PAGE_SIZE, MigrationResult, page_addresses
from tieremu.numa.syscalls import Policy
from tieremu.tiers.files import BlockFile
from tieremu.tiers.region import Region, allocate
from tieremu.tiers.resolve import ResolvedTier


class NumaArena:
    def __init__(self, tier: ResolvedTier, layout: KVLayout, slots: int, *, kernel_managed: bool = False) -> None:
        self.tier = tier
        self.layout = layout
        self.slots = slots
        self.kernel_managed = kernel_managed
        self.region = allocate(slots * layout.block_bytes, tier.nodes, tier.spec.policy,
                               populate=False, check_free=False)
        self.blocks: torch.Tensor = self.region.tensor(layout.dtype, (slots, *layout.block_shape))
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._strays: set[int] = set()  # slots whose pages were migrated off this arena's nodes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free slot with its pages faulted in under the tier's policy."""
        if not self._free:
            raise KVError(f"arena of tier {self.tier.name!r} has no free slot (all {self.slots} hold blocks)")
        slot = self._free.pop()
        try:
            self.region.populate(*self._span(slot))
        except BaseException:
            self._free.append(slot)  # the node is full: the slot stays free for later
            raise
        if self.kernel_managed:
            self.region.rebind(Policy.DEFAULT, (), *self._span(slot))  # the pages stay; the kernel may move them
        return slot

    def give_back(self, slot: int) -> None:
        """Free a slot. Its pages are dropped if they had been migrated away, so the next block born here
        faults fresh pages on this tier's nodes instead of reusing pages on another node."""
        if slot in self._strays or self.kernel_managed:  # the kernel may have moved a managed slot's pages
            start, length = self._span(slot)
            self.region.discard(start, length)
            self.region.rebind(self.tier.spec.policy, self.tier.nodes, start, length)
            self._strays.discard(slot)
        self._free.append(slot)

    def addr(self, slot: int) -> int:
        return self.region.addr + slot * self.layout.block_bytes

    def addrs(self, slots: np.ndarray) -> np.ndarray:
        """addr() of many slots at once (int64)."""
        return self.region.addr + slots.astype(np.int64) * self.layout.block_bytes

    def migrate(self, slot: int, node: int) -> MigrationResult:
        """Move a slot's pages to node (the block keeps its address); later faults there go to node too."""
        result = self.region.migrate(node, *self._span(slot), rebind=True)
        if node in self.tier.nodes:
            self._strays.discard(slot)
        else:
            self._strays.add(slot)
        return result

    def page_nodes(self, slots: Sequence[int]) -> np.ndarray:
        """Node of every page of the given slots (or -errno), asked of the kernel without touching them."""
        if not slots:
            return np.empty(0, dtype=np.int32)
        per = self.layout.block_bytes // PAGE_SIZE
        addrs = np.concatenate([page_addresses(self.addr(s), self.layout.block_bytes) for s in slots])
        assert len(addrs) == per * len(slots)
        return syscalls.query_pages(addrs)

    def close(self) -> None:
        del self.blocks
        self.region.close()

    def _span(self, slot: int) -> tuple[int, int]:
        return slot * self.layout.block_bytes, self.layout.block_bytes


@dataclass
class FileIO:
    """What a file arena really read and wrote through its file (page-aligned spans, timed around each call)."""

    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    writes: int = 0
    bytes_written: int = 0
    write_s: float = 0.0
    direct: bool = True  # O_DIRECT: the device's speed; False: the filesystem refused it (page cache speed)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class FileArena:
    def __init__(self, tier: ResolvedTier, layout: KVLayout, slots: int) -> None:
        if tier.spec.path is None:
            raise KVError(f"file tier {tier.name!r} has no path")
        self.tier = tier
        self.layout = layout
        self.slots = slots
        self.file = BlockFile(tier.spec.path, layout.block_bytes, slots, name=f"kv-{tier.name}")
        self._free = list(range(slots - 1, -1, -1))
        self.io = FileIO(direct=self.file.direct)
        self._bounce: Region | None = None  # one aligned block of host memory, made at the first I/O

    def _bounce_region(self) -> Region:
        if self._bounce is None:
            self._bounce = allocate(self.layout.block_bytes, policy=Policy.DEFAULT)
        return self._bounce

    def _layer_span(self, li: int) -> tuple[int, int, int]:
        """(start, length, offset of the layer's K/V within the span): the page-aligned part of a block holding
        layer `li`'s K and V, as O_DIRECT reads and writes need."""
        size = self.layout.layer_slice_bytes
        first = li * size
        start = first - first % PAGE_SIZE
        end = -(-(first + size) // PAGE_SIZE) * PAGE_SIZE
        return start, end - start, first - start

    def read_layers(self, slots: Sequence[int], li: int, out: torch.Tensor) -> None:
        """K and V of layer `li` (block index, 0 in the per-layer layout) of each slot, read through the file into
        `out` [len(slots), 2, block_tokens, kv_heads, head_dim]: one pread per block into the bounce buffer."""
        start, length, inner = self._layer_span(li)
        bounce = self._bounce_region()
        lay = self.layout
        for i, slot in enumerate(slots):
            t0 = time.perf_counter()
            self.file.read_span(int(slot), start, length, bounce.addr)
            self.io.read_s += time.perf_counter() - t0
            self.io.reads += 1
            self.io.bytes_read += length
            out[i].copy_(bounce.tensor(lay.dtype, (2, lay.block_tokens, lay.kv_heads, lay.head_dim), inner))

    def write_tokens(self, slot: int, li: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V of tokens offset.. of layer `li` into a block in the file: its layer span is read,
        changed and written back (the device's unit is a page, a token's K/V is far smaller)."""
        start, length, inner = self._layer_span(li)
        bounce = self._bounce_region()
        lay = self.layout
        t0 = time.perf_counter()
        self.file.read_span(slot, start, length, bounce.addr)
        t1 = time.perf_counter()
        view = bounce.tensor(lay.dtype, (2, lay.block_tokens, lay.kv_heads, lay.head_dim), inner)
        view[0, offset:offset + k.shape[0]].copy_(k)
        view[1, offset:offset + v.shape[0]].copy_(v)
        del view  # no tensor may view the bounce region when the arena closes
        t2 = time.perf_counter()
        self.file.write_span(slot, start, length, bounce.addr)
        self.io.read_s += t1 - t0
        self.io.write_s += time.perf_counter() - t2
        self.io.reads += 1
        self.io.writes += 1
        self.io.bytes_read += length
        self.io.bytes_written += length

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise KVError(f"file tier {self.tier.name!r} has no free slot (all {self.slots} hold blocks)")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def store(self, slot: int, addr: int) -> None:
        self.file.write(slot, addr)

    def load(self, slot: int, addr: int) -> None:
        self.file.read(slot, addr)

    def close(self) -> None:
        self.file.close()
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


class DeviceArena:
    """`slots` blocks in one tensor on `device` (cuda:N for a real cuda tier), allocated at once: device memory is
    not reserved lazily as a NUMA arena's address space is, so it holds its own tier's capacity only."""

    def __init__(self, tier: ResolvedTier, layout: KVLayout, slots: int, device: torch.device) -> None:
        self.tier = tier
        self.layout = layout
        self.slots = slots
        self.device = device
        # Zeroed, as a NUMA arena's fresh pages are: reads stop at a sequence's length, but whole blocks are
        # copied and compared, and uninitialised device memory would make that depend on the allocator's past.
        self.blocks: torch.Tensor = torch.zeros((slots, *layout.block_shape), dtype=layout.dtype, device=device)
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def host_addressable(self) -> bool:
        """Whether the CPU can read its blocks by address (only when the "device" is the CPU, as in tests)."""
        return self.device.type == "cpu"

    def take(self) -> int:
        if not self._free:
            raise KVError(f"device tier {self.tier.name!r} ({self.device}) has no free slot (all {self.slots} hold "
                          "blocks)")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def addrs(self, slots: np.ndarray) -> np.ndarray:
        """Addresses of many slots (int64); meaningful to the CPU only when host_addressable."""
        return self.blocks.data_ptr() + slots.astype(np.int64) * self.layout.block_bytes

    def close(self) -> None:
        del self.blocks


Arena = NumaArena | FileArena | DeviceArena
MemoryArena = NumaArena | DeviceArena  # arenas whose blocks are tensors a model can read


def copy_block(src: Arena, src_slot: int, dst: Arena, dst_slot: int) -> None:
    """Copy one block between arenas of any kinds. Tensors copy with torch (across devices too); a file slot is
    read or written through an address, so a device arena's side goes through a page-aligned host bounce block
    (O_DIRECT needs the alignment, and a GPU's memory has no host address)."""
    if isinstance(dst, FileArena):
        if isinstance(src, NumaArena):
            dst.store(dst_slot, src.addr(src_slot))
        elif isinstance(src, DeviceArena):
            _store_through_host(src, src_slot, dst, dst_slot)
        else:
            raise KVError("a block cannot be copied from one file tier to another directly; read it into memory")
    elif isinstance(src, FileArena):
        if isinstance(dst, NumaArena):
            src.load(src_slot, dst.addr(dst_slot))
        else:
            _load_through_host(src, src_slot, dst, dst_slot)
    else:
        dst.blocks[dst_slot].copy_(src.blocks[src_slot])


def _store_through_host(src: DeviceArena, src_slot: int, dst: FileArena, dst_slot: int) -> None:
    region = allocate(src.layout.block_bytes, policy=Policy.DEFAULT)
    try:
        # The view is a temporary: gone before close(), which refuses to unmap memory a tensor still views.
        region.tensor(src.layout.dtype, src.layout.block_shape).copy_(src.blocks[src_slot])
        dst.store(dst_slot, region.addr)
    finally:
        region.close()


def _load_through_host(src: FileArena, src_slot: int, dst: DeviceArena, dst_slot: int) -> None:
    region = allocate(dst.layout.block_bytes, policy=Policy.DEFAULT)
    try:
        src.load(src_slot, region.addr)
        dst.blocks[dst_slot].copy_(region.tensor(dst.layout.dtype, dst.layout.block_shape))
    finally:
        region.close()
