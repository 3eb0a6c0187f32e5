"""Arenas: where a tier's KV blocks are stored. One per tier, fixed-size slots, one block per slot.

A NUMA arena is one region from the tier allocator with the tier's memory policy, viewed as a tensor of
blocks. A block that moves to another NUMA node by page migration keeps its slot (and so its address) in the
arena it was born in; the pool tracks the tier it is on now. So that any arena can hold every block the pool
may own, a NUMA arena reserves address space for the pool's total capacity but only faults pages in for slots
in use: the reservation costs no memory.

A file arena is a sparse file of slots in the tier's directory (O_DIRECT where possible); its blocks are read
into a NUMA slot before anyone computes on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tieremu.errors import KVError
from tieremu.kv.layout import KVLayout
from tieremu.numa import syscalls
from tieremu.numa.pages import PAGE_SIZE, MigrationResult, page_addresses
from tieremu.tiers.files import BlockFile
from tieremu.tiers.region import allocate
from tieremu.tiers.resolve import ResolvedTier


class NumaArena:
    def __init__(self, tier: ResolvedTier, layout: KVLayout, slots: int) -> None:
        self.tier = tier
        self.layout = layout
        self.slots = slots
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
        return slot

    def give_back(self, slot: int) -> None:
        """Free a slot. Its pages are dropped if they had been migrated away, so the next block born here
        faults fresh pages on this tier's nodes instead of reusing pages on another node."""
        if slot in self._strays:
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


class FileArena:
    def __init__(self, tier: ResolvedTier, layout: KVLayout, slots: int) -> None:
        if tier.spec.path is None:
            raise KVError(f"file tier {tier.name!r} has no path")
        self.tier = tier
        self.layout = layout
        self.slots = slots
        self.file = BlockFile(tier.spec.path, layout.block_bytes, slots, name=f"kv-{tier.name}")
        self._free = list(range(slots - 1, -1, -1))

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


Arena = NumaArena | FileArena
