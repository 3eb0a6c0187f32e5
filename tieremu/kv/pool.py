"""Blocks and the pool that owns them: which tier each block is on, who references it, which prefix it holds.

Like vLLM's block pool: a block is referenced by the sequences using it; a block whose last reference goes
keeps its data while it has a prefix key (a later request with the same prefix reuses it) until space is
needed, and then the least recently used such block is evicted (dropped, counted). Tier capacity is counted
in blocks per tier, wherever the block's slot is (see arena.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from tieremu.errors import KVError
from tieremu.kv.arena import FileArena, NumaArena
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Placement, Spill
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTier, ResolvedTierMap


@dataclass(eq=False)
class Block:
    id: int
    key: int | None  # prefix hash (shared, reusable); None for a sequence's private tail block
    layer: int | None  # per-layer layout: the layer it holds; None: every layer
    tier: str  # the tier it is on now
    arena: str  # the arena whose slot holds it (another tier's after a page migration)
    slot: int
    refs: int = 0
    last_used: int = 0  # pool clock at the last read or write


@dataclass(frozen=True)
class MoveRecord:
    """One block moved between tiers, as it happened."""

    time: float  # monotonic seconds
    block: int
    source: str
    target: str
    kind: str  # migrate (page migration, address kept) | copy (new slot)
    bytes: int
    pages_moved: int
    seconds: float
    injected_seconds: float
    ok: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class BlockPool:
    def __init__(self, resolved: ResolvedTierMap, layout: KVLayout, capacities: Mapping[str, int],
                 placement: Placement | None = None, injector: DelayInjector | None = None) -> None:
        self.layout = layout
        self.tiers: dict[str, ResolvedTier] = {t.name: t for t in resolved.tiers}
        self.order = [t.name for t in resolved.tiers]
        self.capacity = dict(capacities)
        self.placement = placement or Spill()
        self.injector = injector
        self._used = dict.fromkeys(self.order, 0)
        self._memory_tiers = [t for t in self.order if not self.tiers[t].spec.is_file]
        numa_total = sum(self.capacity[t] for t in self.memory_tiers)
        self.arenas: dict[str, NumaArena | FileArena] = {}
        try:
            for name in self.order:
                tier = self.tiers[name]
                self.arenas[name] = (FileArena(tier, layout, self.capacity[name]) if tier.spec.is_file
                                     else NumaArena(tier, layout, numa_total))
        except BaseException:
            self.close()
            raise
        self.blocks: dict[int, Block] = {}
        self._by_key: dict[tuple[int, int | None], Block] = {}
        self._cached: OrderedDict[int, Block] = OrderedDict()  # unreferenced keyed blocks, least recent first
        self._next_id = 0
        self.clock = 0
        self.evictions = 0
        self.moves: list[MoveRecord] = []

    # -- occupancy (what placements and policies see) --------------------------------------------------------

    @property
    def memory_tiers(self) -> list[str]:
        return self._memory_tiers

    def used(self, tier: str) -> int:
        return self._used[tier]

    def room(self, tier: str) -> int:
        return self.capacity[tier] - self._used[tier]

    def numa_node(self, tier: str) -> int:
        return self.tiers[tier].nodes[0]

    # -- life of a block -----------------------------------------------------------------------------------

    def allocate(self, key: int | None, layer: int | None) -> Block:
        """A new block, referenced once, on the tier the placement picks (spilling down, then evicting)."""
        tier = self._tier_with_room(self.placement.choose(self, layer))
        arena = self.arenas[tier]
        block = Block(self._next_id, key, layer, tier, tier, arena.take(), refs=1, last_used=self.clock)
        self._next_id += 1
        self._used[tier] += 1
        self.blocks[block.id] = block
        if key is not None:
            self._by_key[(key, layer)] = block
        return block

    def lookup(self, key: int, layer: int | None) -> Block | None:
        """A resident block holding this prefix, referenced once more; None if there is none."""
        block = self._by_key.get((key, layer))
        if block is None:
            return None
        if block.refs == 0:
            del self._cached[block.id]
        block.refs += 1
        block.last_used = self.clock
        return block

    def release(self, block: Block) -> None:
        """Drop one reference; an unreferenced block stays cached if it holds a prefix, else it is freed."""
        if block.refs <= 0:
            raise KVError(f"block {block.id} released more often than it was referenced")
        block.refs -= 1
        if block.refs:
            return
        if block.key is not None:
            self._cached[block.id] = block
        else:
            self._free(block)

    def touch(self, block: Block) -> None:
        block.last_used = self.clock
        if block.id in self._cached:
            self._cached.move_to_end(block.id)

    def evict(self, block: Block) -> None:
        """Drop an unreferenced cached block (policies' evictions and the pool's own when every tier is full)."""
        if block.refs:
            raise KVError(f"block {block.id} is in use by {block.refs} sequence(s); it cannot be evicted")
        self._cached.pop(block.id, None)
        self._free(block)
        self.evictions += 1

    def _free(self, block: Block) -> None:
        self.arenas[block.arena].give_back(block.slot)
        self._used[block.tier] -= 1
        del self.blocks[block.id]
        if block.key is not None and self._by_key.get((block.key, block.layer)) is block:
            del self._by_key[(block.key, block.layer)]

    def _tier_with_room(self, wanted: str) -> str:
        tiers = self.memory_tiers
        if wanted not in tiers:
            raise KVError(f"placement chose tier {wanted!r}; new blocks go to memory tiers: {', '.join(tiers)}")
        for tier in tiers[tiers.index(wanted):] + tiers[:tiers.index(wanted)]:
            if self.room(tier) > 0:
                return tier
        victim = next((b for b in self._cached.values() if b.tier in tiers), None)
        if victim is None:
            in_use = ", ".join(f"{t} {self._used[t]}/{self.capacity[t]}" for t in self.order)
            raise KVError(f"KV pool full: every block is in use ({in_use} blocks); give the tiers more capacity "
                          "or run fewer or shorter sequences")
        tier = victim.tier
        self.evict(victim)
        return tier

    # -- moving blocks between tiers -------------------------------------------------------------------------

    def move(self, block: Block, target: str) -> MoveRecord:
        """Move a block to target: page migration between NUMA tiers on different nodes (the block keeps its
        address), a copy to a new slot otherwise (same node, as emulated tiers are, or a file tier). Emulated
        ends are charged their extra time and paid at once. Raises when target is full: make room first."""
        source = block.tier
        if target == source:
            return self._record(block, source, target, "none", 0, 0.0, 0.0, True, "already there")
        if self.room(target) <= 0:
            raise KVError(f"cannot move block {block.id} to tier {target!r}: it is full "
                          f"({self._used[target]}/{self.capacity[target]} blocks); demote or evict first")
        t0 = time.perf_counter()
        if self._can_migrate(block, target):
            kind, pages, ok, note = "migrate", *self._migrate(block, target)
        else:
            kind, pages, ok, note = "copy", *self._copy(block, target)
        if ok:
            self._used[source] -= 1
            self._used[target] += 1
            block.tier = target
        injected = self._charge(source, target)
        return self._record(block, source, target, kind, pages, time.perf_counter() - t0, injected, ok, note)

    def _can_migrate(self, block: Block, target: str) -> bool:
        arena, dest = self.arenas[block.arena], self.tiers[target]
        return (isinstance(arena, NumaArena) and not dest.spec.is_file
                and self.numa_node(block.tier) != self.numa_node(target))

    def _migrate(self, block: Block, target: str) -> tuple[int, bool, str]:
        arena = self.arenas[block.arena]
        assert isinstance(arena, NumaArena)
        result = arena.migrate(block.slot, self.numa_node(target))
        note = "" if result.ok else f"pages not moved: {result.failed}"
        return result.moved, result.ok, note

    def _copy(self, block: Block, target: str) -> tuple[int, bool, str]:
        src, dst = self.arenas[block.arena], self.arenas[target]
        slot = dst.take()
        if isinstance(dst, FileArena):
            assert isinstance(src, NumaArena)
            dst.store(slot, src.addr(block.slot))
        elif isinstance(src, FileArena):
            src.load(block.slot, dst.addr(slot))
        else:
            dst.blocks[slot].copy_(src.blocks[block.slot])
        src.give_back(block.slot)
        block.arena, block.slot = target, slot
        return 0, True, ""  # no page moved: the data was copied

    def _charge(self, source: str, target: str) -> float:
        if self.injector is None:
            return 0.0
        nbytes = self.layout.block_bytes
        charged = False
        for tier, kind in ((source, "read"), (target, "write")):
            if self.injector.emulates(tier):
                self.injector.transfer(tier, nbytes, kind)
                charged = True
        return self.injector.settle() / 1e9 if charged else 0.0

    def _record(self, block: Block, source: str, target: str, kind: str, pages: int, seconds: float,
                injected: float, ok: bool, note: str) -> MoveRecord:
        rec = MoveRecord(time.monotonic(), block.id, source, target, kind,
                         self.layout.block_bytes if kind != "none" else 0, pages, seconds, injected, ok, note)
        if kind != "none":
            self.moves.append(rec)
        return rec

    # -- inspection ------------------------------------------------------------------------------------------

    def on(self, tier: str) -> list[Block]:
        return [b for b in self.blocks.values() if b.tier == tier]

    def cached(self) -> Sequence[Block]:
        return list(self._cached.values())

    def close(self) -> None:
        for arena in self.arenas.values():
            arena.close()
        self.arenas = {}
