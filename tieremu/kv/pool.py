"""Blocks and the pool that owns them: which tier each block is on, who references it, which prefix it holds.

Like vLLM's block pool: a block is referenced by the sequences using it; a block whose last reference goes
keeps its data while it has a prefix key (a later request with the same prefix reuses it) until space is
needed, and then the least recently used such block is evicted (dropped, counted). Tier capacity is counted
in blocks per tier, wherever the block's slot is (see arena.py).

Thread safety: `BlockPool.lock` (re-entrant) guards every block's tier, arena and slot. The cache's read, write,
add and free paths hold it, the pool's own mutators take it, and a migration daemon holds it per block move, so
a block is never read through a slot it is being moved out of.

Compressed tiers: when the tier map compresses a tier, the cache's compression hook (kv/compress_store.py) is also
the pool's `codec` and a copy-move (a new slot: emulated tiers, same node) into or out of a compressed tier goes
through it. The block's full layer slices cross in compressed form: a demotion into a compressed tier reads the raw
slice out of the source and writes only the compressed bytes into the target (the compiled compress kernel running
between them); a promotion out of one reads only the compressed bytes and writes the raw, dequantized slice into the
target. A move's `bytes` are the bytes that cross between the two tiers, each slice counted at its compressed size
where either end holds it compressed (raw where neither does: a partly written slice, which stays raw); the emulated
ends are charged for what each really reads or writes (the source its held form, the target its held form); the
(de)compression time is measured and part of the move's seconds. A page migration (NUMA tiers on two nodes) moves
whole pages, compressed slices included at their slot's full size, and is counted at the block's full size.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch

from tieremu.errors import KVError
from tieremu.kv.arena import Arena, DeviceArena, FileArena, NumaArena, copy_block
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Placement, Spill
from tieremu.numa.pages import MigrationResult
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
    # Page migration only: pages that did not reach the target, by errno name (EBUSY is worth retrying, ENOMEM is
    # not), and pages that were on the target already (moved on their own, e.g. by the kernel's tiering).
    pages_failed: dict[str, int] = field(default_factory=dict)
    pages_already: int = 0
    # A move into or out of a compressed tier (see the module docstring): the block's size uncompressed (`bytes` is
    # what crossed, compressed slices at their compressed size) and the measured (de)compression time, part of
    # `seconds`.
    raw_bytes: int = 0
    compress_seconds: float = 0.0
    decompress_seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class CodecMove:
    """What a move through the compression hook carried: bytes read out of the source and written into the target
    (each in the form that end holds), the bytes that crossed between them, and the (de)compression nanoseconds."""

    read_bytes: int
    written_bytes: int
    crossed_bytes: int
    compress_ns: int = 0
    decompress_ns: int = 0


class MoveCodec(Protocol):
    """The pool's side of the compression hook (kv/compress_store.py's TierCompression)."""

    def involves(self, block: Block, target: str) -> bool:
        """Whether moving block to target changes how any of its slices is held (compressed or restored)."""
        ...

    def copy_move(self, block: Block, src: Arena, src_slot: int, dst: Arena, dst_slot: int,
                  target: str) -> CodecMove:
        """Copy block's slices from (src, src_slot) into (dst, dst_slot), each in the form the target holds it."""
        ...


class BlockPool:
    def __init__(self, resolved: ResolvedTierMap, layout: KVLayout, capacities: Mapping[str, int],
                 placement: Placement | None = None, injector: DelayInjector | None = None, *,
                 kernel_managed: bool = False) -> None:
        self.layout = layout
        self.kernel_managed = kernel_managed  # NUMA arenas hand their blocks' pages to the kernel's tiering
        self.tiers: dict[str, ResolvedTier] = {t.name: t for t in resolved.tiers}
        self.order = [t.name for t in resolved.tiers]
        self.capacity = dict(capacities)
        self.placement = placement or Spill()
        self.injector = injector
        self.lock = threading.RLock()
        self._used = dict.fromkeys(self.order, 0)
        self._memory_tiers = [t for t in self.order if not self.tiers[t].spec.is_file]
        # A NUMA arena may hold any block that is on a NUMA tier (page migration keeps a block in the arena of its
        # birth); blocks on a device tier are in its own arena, so they need no room in the NUMA ones. (At least
        # one slot: a region cannot be empty, and a reservation costs no memory.)
        numa_total = max(1, sum(self.capacity[t] for t in self.memory_tiers if self.tiers[t].device is None))
        self.arenas: dict[str, Arena] = {}
        try:
            for name in self.order:
                self.arenas[name] = self._arena(self.tiers[name], layout, numa_total)
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
        self.generation = 0  # bumped by every move, under the lock
        self.codec: MoveCodec | None = None  # set by the compression hook when the map compresses a tier

    def _arena(self, tier: ResolvedTier, layout: KVLayout, numa_total: int) -> Arena:
        if tier.spec.is_file:
            return FileArena(tier, layout, self.capacity[tier.name])
        if tier.device is not None:  # a real cuda tier (an emulated one has no device: a NUMA arena on its host)
            return DeviceArena(tier, layout, self.capacity[tier.name], torch.device(tier.device))
        return NumaArena(tier, layout, numa_total, kernel_managed=self.kernel_managed)

    # -- occupancy (what placements and policies see) --------------------------------------------------------

    @property
    def memory_tiers(self) -> list[str]:
        return self._memory_tiers

    def used(self, tier: str) -> int:
        return self._used[tier]

    def room(self, tier: str) -> int:
        return self.capacity[tier] - self._used[tier]

    def numa_node(self, tier: str) -> int:
        """The first node of a NUMA tier (a device or file tier has none: IndexError)."""
        return self.tiers[tier].nodes[0]

    def by_key(self, key: int, layer: int | None = None) -> Block | None:
        """The resident block holding this prefix key (of `layer`, per-layer layout), without referencing it."""
        return self._by_key.get((key, layer))

    # -- life of a block -----------------------------------------------------------------------------------

    def allocate(self, key: int | None, layer: int | None) -> Block:
        """A new block, referenced once, on the tier the placement picks (spilling down, then evicting)."""
        with self.lock:
            return self._allocate(key, layer)

    def _allocate(self, key: int | None, layer: int | None) -> Block:
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
        with self.lock:
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
        with self.lock:
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
        """Mark a block used now (the caller holds the lock: the cache's read and write paths do)."""
        block.last_used = self.clock
        if block.id in self._cached:
            self._cached.move_to_end(block.id)

    def evict(self, block: Block) -> None:
        """Drop an unreferenced cached block (policies' evictions and the pool's own when every tier is full)."""
        with self.lock:
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
        """The placement's choice if it has room, else the next tier down the map's order with room (memory tiers,
        then a file tier where the map lists one: KV spills to NVMe before anything is evicted), then any tier
        above; with every tier full, the least recently used cached prefix is evicted to make room."""
        tiers = self.order
        if wanted not in tiers:
            raise KVError(f"placement chose tier {wanted!r}; tiers: {', '.join(tiers)}")
        at = tiers.index(wanted)
        for tier in tiers[at:] + tiers[:at]:
            if self.room(tier) > 0:
                return tier
        victim = next(iter(self._cached.values()), None)
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
        address), a copy to a new slot otherwise (same node, as emulated tiers are, a file tier, or a device tier
        such as a GPU's HBM, whose memory the kernel does not place). Emulated
        ends cost their extra time, waited by the caller after the lock is released (a slow migration must not
        stall reads of other blocks). Raises when target is full: make room first."""
        with self.lock:
            record, owed = self._move(block, target)
        if owed and self.injector is not None:
            injected = self.injector.pay(owed) / 1e9
            record = replace(record, seconds=record.seconds + injected, injected_seconds=injected)
        if record.kind != "none":
            with self.lock:
                self.moves.append(record)
        return record

    def _move(self, block: Block, target: str) -> tuple[MoveRecord, dict[str, float]]:
        source = block.tier
        if target == source:
            return self._record(block, source, target, "none", 0, 0.0, 0.0, True, "already there"), {}
        if self.room(target) <= 0:
            raise KVError(f"cannot move block {block.id} to tier {target!r}: it is full "
                          f"({self._used[target]}/{self.capacity[target]} blocks); demote or evict first")
        t0 = time.perf_counter()
        failed: dict[str, int] = {}
        already = 0
        coded: CodecMove | None = None
        if self._can_migrate(block, target):
            kind = "migrate"
            result = self._migrate(block, target)
            pages, ok, failed, already = result.moved, result.ok, result.failed, result.already
            note = "" if ok else f"pages not moved: {failed}"
        else:
            kind = "copy"
            pages, ok, note, coded = self._copy(block, target)
        self.generation += 1  # a block's slot or node changed: readers' cached block tables are stale
        if ok:
            self._used[source] -= 1
            self._used[target] += 1
            block.tier = target
        full = self.layout.block_bytes
        read, written = (full, full) if coded is None else (coded.read_bytes, coded.written_bytes)
        owed = self._owed(source, target, read, written, full if coded is None else coded.crossed_bytes)
        record = self._record(block, source, target, kind, pages, time.perf_counter() - t0, 0.0, ok, note,
                              failed, already)
        if coded is not None:
            record = replace(record, bytes=coded.crossed_bytes, raw_bytes=full,
                             compress_seconds=coded.compress_ns / 1e9, decompress_seconds=coded.decompress_ns / 1e9)
        return record, owed

    def _can_migrate(self, block: Block, target: str) -> bool:
        """Only pages of NUMA memory move between nodes: both ends must be NUMA arenas (an emulated cuda tier is
        one; a real one, a file tier are not) on different nodes."""
        arena, dest = self.arenas[block.arena], self.arenas[target]
        return (isinstance(arena, NumaArena) and isinstance(dest, NumaArena)
                and self.numa_node(block.tier) != self.numa_node(target))

    def _migrate(self, block: Block, target: str) -> MigrationResult:
        arena = self.arenas[block.arena]
        assert isinstance(arena, NumaArena)
        return arena.migrate(block.slot, self.numa_node(target))

    def _copy(self, block: Block, target: str) -> tuple[int, bool, str, CodecMove | None]:
        src, dst = self.arenas[block.arena], self.arenas[target]
        slot = dst.take()
        coded: CodecMove | None = None
        try:
            if self.codec is not None and self.codec.involves(block, target):
                coded = self.codec.copy_move(block, src, block.slot, dst, slot, target)
            else:
                copy_block(src, block.slot, dst, slot)
        except BaseException:
            dst.give_back(slot)  # the block stays where it was
            raise
        src.give_back(block.slot)
        block.arena, block.slot = target, slot
        return 0, True, "", coded  # no page moved: the data was copied

    def _owed(self, source: str, target: str, read: int, written: int, crossed: int) -> dict[str, float]:
        """The emulated ends' extra time for one block: `read` bytes out of source, `written` into target (each
        end's held form: compressed bytes at a compressed end), and the host link crossed by `crossed` bytes when
        one end is an emulated GPU tier with a link model (the other end is host memory or a file)."""
        injector = self.injector
        if injector is None:
            return {}
        owed = {}
        for tier, kind, nbytes in ((source, "read", read), (target, "write", written)):
            if injector.emulates(tier):
                owed[tier] = owed.get(tier, 0.0) + injector.owe(tier, nbytes, kind)
        link = injector.link_tier
        if link is not None and (source == link) != (target == link):
            key, ns = injector.owe_link(link, crossed)
            owed[key] = ns
        return owed

    def _record(self, block: Block, source: str, target: str, kind: str, pages: int, seconds: float,
                injected: float, ok: bool, note: str, failed: dict[str, int] | None = None,
                already: int = 0) -> MoveRecord:
        nbytes = self.layout.block_bytes if kind != "none" else 0
        rec = MoveRecord(time.monotonic(), block.id, source, target, kind, nbytes, pages, seconds, injected, ok, note,
                         dict(failed or {}), already, raw_bytes=nbytes)
        return rec

    # -- inspection ------------------------------------------------------------------------------------------

    def on(self, tier: str) -> list[Block]:
        # list() first: a dict snapshot is taken without releasing the GIL, so another thread allocating or
        # freeing blocks meanwhile cannot break the iteration.
        return [b for b in list(self.blocks.values()) if b.tier == tier]

    def cached(self) -> Sequence[Block]:
        return list(self._cached.values())

    def close(self) -> None:
        for arena in self.arenas.values():
            arena.close()
        self.arenas = {}
