"""The tiered, paged KV cache that a decode model reads: sequences, block tables, prefix reuse, reads and
writes with per-tier accounting, emulated delay and an access log.

It implements the model's KV store interface (write / read / layer_start, see tieremu.workloads.llama):
attention gets each sequence's K and V gathered from the tier arenas through its block table, so on CPU the
reads really come from each tier's memory. With the model on a GPU (`device`), reads return K and V on that
device: blocks in a device tier there (HBM) are indexed in place, blocks in host tiers are gathered into a pinned
staging buffer and copied across (staging.py), and the bytes staged are counted per source tier.

Blocks on a file tier (NVMe) stay there: a read preads each such block's layer span through the file into a bounce
buffer (arena.py) and copies it out, a write reads, changes and writes back its span; the I/O is real and timed
(`file_io()`), never modelled. A tier map whose emulated GPU tier has a host link model charges that link for
every byte read or written by the (emulated) GPU from or to the other tiers (emulation.py); blocks in the GPU tier
are read at host memory speed with nothing injected (real HBM is faster still: emulation cannot speed memory up).

The cache may be shared with a migration daemon's thread: its read, write, add, free, move and settle paths hold
the pool's re-entrant lock (`cache.lock`), which the daemon also takes per block move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from tieremu.errors import KVError
from tieremu.kv.access_log import AccessLog
from tieremu.kv.arena import DeviceArena, FileArena, FileIO, MemoryArena, NumaArena
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Placement
from tieremu.kv.pool import Block, BlockPool, MoveRecord
from tieremu.kv.staging import StagingBuffer
from tieremu.native.build import kernels
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap

if TYPE_CHECKING:
    from tieremu.kv.compress_store import TierCompression

MIB = 1 << 20
CPU = torch.device("cpu")

# How a read reaches an arena's blocks from the cache's device (decided once per arena).
LOCAL = "local"  # on the device already: indexed in place
STAGED = "staged"  # in host memory, the device elsewhere: gathered into the staging buffer and copied across
REMOTE = "remote"  # on another device (a GPU tier read by a CPU model): gathered there and copied over
FILE = "file"  # in a file tier's file: read through the file into host memory (then copied across for a GPU)


@dataclass
class SequenceState:
    id: int
    keys: list[int]  # prefix keys of the prompt's full blocks
    tables: list[list[Block]]  # per layer (all-layers layout: one list shared by every layer)
    lengths: list[int]  # tokens written per layer
    reused_tokens: int = 0
    index: dict[int, TableIndex] = field(default_factory=dict)  # per layer


@dataclass(frozen=True)
class ArenaGroup:
    """The blocks of one table that sit in one arena: read together (one index_select per arena)."""

    arena: str
    where: torch.Tensor  # int64 positions in the table
    slots: torch.Tensor  # int64 slots in the arena
    per_tier: tuple[tuple[str, int], ...]  # blocks per tier (page migration leaves blocks of several in one arena)


@dataclass(frozen=True)
class TableIndex:
    """A block table as arrays, rebuilt only when the table grows or any block moves: the per-read work of a
    decode step then costs the same for 10 blocks or 1000."""

    key: tuple[int, int]  # (blocks in the table, the pool's move generation) when built
    ids: np.ndarray  # int64 Block.id
    tiers: np.ndarray  # int16 index into the tier order
    slots: torch.Tensor  # int64 slot in the arena
    arenas: tuple[str, ...]
    block_addrs: np.ndarray  # int64 address of each block's start
    k_addrs: np.ndarray  # int64 address of each block's K for this layer
    per_tier: tuple[tuple[str, int], ...]  # blocks per tier
    groups: tuple[ArenaGroup, ...] = ()
    direct: bool = True  # every block is in host memory the CPU can read by address (the C kernel may attend)

    def for_layer_offset(self, offset: int) -> TableIndex:
        """The same table read at another layer's offset (all-layers blocks: one table serves every layer)."""
        return TableIndex(self.key, self.ids, self.tiers, self.slots, self.arenas, self.block_addrs,
                          self.block_addrs + offset, self.per_tier, self.groups, self.direct)


@dataclass(frozen=True)
class PrefixHit:
    """How much of a new sequence's prompt was already resident, and which tiers served it."""

    tokens: int
    blocks_by_tier: dict[str, int]


@dataclass(frozen=True)
class TierPlacement:
    """Where a tier's blocks really are, as the kernel reports their pages."""

    tier: str
    backing: str
    blocks: int
    pages: int
    on_tier: float  # fraction of present pages on the tier's node(s); 1.0 for file and device tiers (no pages)
    by_node: dict[int, int]


@dataclass
class TierTraffic:
    blocks_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    prefix_blocks: int = 0  # blocks a new sequence reused from this tier
    bytes_staged: int = 0  # read bytes copied host -> device through the staging buffer (a model on a GPU)


@dataclass
class KVStats:
    traffic: dict[str, TierTraffic] = field(default_factory=dict)


def prefix_keys(tokens: Sequence[int], block_tokens: int) -> list[int]:
    """One key per full block, chained so a block's key names its whole prefix (as vLLM's prefix caching)."""
    keys, parent = [], 0
    for i in range(len(tokens) // block_tokens):
        parent = hash((parent, tuple(tokens[i * block_tokens:(i + 1) * block_tokens])))
        keys.append(parent)
    return keys


class TieredKVCache:
    """`device` is where read() returns K and V (the model's device). `stage` forces host blocks through the
    staging buffer even when that device is the CPU (tests, and measuring the copy's cost without a GPU); by
    default they are staged only for a device other than the CPU. `kernel_managed`: NUMA tiers' blocks are placed
    where the placement says, then left to the kernel's own tiering (promotion and demotion move their pages; the
    pool's tier of a block is then where it was placed, and verify() says where its pages are now)."""

    def __init__(self, resolved: ResolvedTierMap, layout: KVLayout, *,
                 capacities: Mapping[str, int] | None = None, placement: Placement | None = None,
                 injector: DelayInjector | None = None, log_accesses: bool = True,
                 device: torch.device | str = CPU, stage: bool | None = None, kernel_managed: bool = False) -> None:
        self.layout = layout
        self.device = _concrete(torch.device(device))
        self.stage = self.device.type != "cpu" if stage is None else stage
        # Today's CPU path: K/V gathered from host arenas with no staging, the C kernel attending in place.
        self._in_place = self.device.type == "cpu" and not self.stage
        self._staging: StagingBuffer | None = None
        self.resolved = resolved
        self.injector = injector
        self.pool = BlockPool(resolved, layout, _capacities(resolved, layout, capacities), placement, injector,
                              kernel_managed=kernel_managed)
        self.tier_index = {name: i for i, name in enumerate(self.pool.order)}
        self.log = AccessLog() if log_accesses else None
        self.stats = KVStats({t: TierTraffic() for t in self.pool.order})
        self.seqs: dict[int, SequenceState] = {}
        self.step = 0
        self.lock = self.pool.lock
        self._routes = {name: self._route(arena) for name, arena in self.pool.arenas.items()}
        # The emulated GPU tier whose host link every other tier's bytes cross (a model "on" that GPU, run on the
        # CPU here); None without one, or when the model really runs on a GPU (its link is real).
        self._link = injector.link_tier if injector is not None and self.device.type == "cpu" else None
        # Called with the layer number at every layer_start, after the lock is released (layer-ahead prefetch).
        self.on_layer_start: Callable[[int], None] | None = None
        # Set by TierCompression.attach (kv/compress_store.py) when a tier stores blocks compressed.
        self.compression: TierCompression | None = None

    # -- sequences ---------------------------------------------------------------------------------------------

    def add_sequence(self, seq: int, tokens: Sequence[int] = (), *, keys: Sequence[int] | None = None) -> PrefixHit:
        """Register a sequence; its prompt's full blocks already resident (same prefix) are reused, and the
        returned hit says how many tokens need no prefill and which tiers held them."""
        with self.lock:
            return self._add_sequence(seq, tokens, keys)

    def _add_sequence(self, seq: int, tokens: Sequence[int], keys: Sequence[int] | None) -> PrefixHit:
        if seq in self.seqs:
            raise KVError(f"sequence {seq} already exists; free it first or use another id")
        keys = list(keys) if keys is not None else prefix_keys(list(tokens), self.layout.block_tokens)
        layers = self.layout.layers
        shared: list[Block] = []
        tables: list[list[Block]] = [shared] * layers if not self.layout.per_layer else [[] for _ in range(layers)]
        hits: dict[str, int] = {}
        for key in keys:
            found = self._lookup_all_layers(key)
            if found is None:
                break
            for layer, block in enumerate(found):
                if self.layout.per_layer or layer == 0:
                    tables[layer].append(block)
                hits[block.tier] = hits.get(block.tier, 0) + 1
                self.stats.traffic[block.tier].prefix_blocks += 1
        reused = len(tables[0]) * self.layout.block_tokens
        self.seqs[seq] = SequenceState(seq, keys, tables, [reused] * layers, reused)
        return PrefixHit(reused, hits)

    def _lookup_all_layers(self, key: int) -> list[Block] | None:
        if not self.layout.per_layer:
            block = self.pool.lookup(key, None)
            return None if block is None else [block]
        found = []
        for layer in range(self.layout.layers):
            block = self.pool.lookup(key, layer)
            if block is None:
                for b in found:  # a prefix counts only if every layer of it is resident
                    self.pool.release(b)
                return None
            found.append(block)
        return found

    def free_sequence(self, seq: int) -> None:
        with self.lock:
            state = self._seq(seq)
            seen: set[int] = set()
            for table in state.tables:
                for block in table:
                    if block.id not in seen:
                        seen.add(block.id)
                        self.pool.release(block)
            del self.seqs[seq]

    def length(self, seq: int, layer: int = 0) -> int:
        return self._seq(seq).lengths[layer]

    # -- the model's store interface ---------------------------------------------------------------------------

    def write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        with self.lock:
            self._write(seq, layer, start, k, v)

    def _write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        state = self._seq(seq)
        n = k.shape[0]
        if start != state.lengths[layer]:
            raise KVError(f"sequence {seq} layer {layer}: write at position {start}, but {state.lengths[layer]} "
                          "tokens are written; KV is appended in order")
        table, bt, li = state.tables[layer], self.layout.block_tokens, 0 if self.layout.per_layer else layer
        pos = start
        while pos < start + n:
            index, offset = divmod(pos, bt)
            if index == len(table):
                key = state.keys[index] if index < len(state.keys) else None
                table.append(self.pool.allocate(key, layer if self.layout.per_layer else None))
            block = table[index]
            if block.refs > 1:
                raise KVError(f"sequence {seq}: block {block.id} is shared by {block.refs} sequences and cannot be "
                              "written (a reused prefix is read-only)")
            take = min(bt - offset, start + n - pos)
            arena = self.pool.arenas[block.arena]
            rows = slice(pos - start, pos - start + take)
            if isinstance(arena, FileArena):
                arena.write_tokens(block.slot, li, offset, k[rows], v[rows])
            else:
                view = arena.blocks[block.slot, li]
                view[0, offset:offset + take].copy_(k[rows])
                view[1, offset:offset + take].copy_(v[rows])
            self.pool.touch(block)
            if self.compression is not None and offset + take == bt:
                self.compression.filled(block, li)  # a full slice may be held compressed (and moved so)
            written = take * self.layout.layer_token_bytes
            self.stats.traffic[block.tier].bytes_written += written
            if self.injector is not None and self.injector.emulates(block.tier):
                self.injector.transfer(block.tier, written, "write")
            if self._link is not None and block.tier != self._link and self.injector is not None:
                self.injector.cross(self._link, written)  # new KV leaves the (emulated) GPU across its link
            pos += take
        state.lengths[layer] = start + n

    def read(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The gather copies the blocks out under the lock: what it returns stays valid after a block moves.
        with self.lock:
            return self._read(seq, layer)

    def _read(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._seq(seq)
        length = state.lengths[layer]
        table = state.tables[layer]
        index = self._index(state, layer)
        arenas, slots = index.arenas, index.slots
        li = 0 if self.layout.per_layer else layer
        bt, heads, dim = self.layout.block_tokens, self.layout.kv_heads, self.layout.head_dim
        compressed = self.compression is not None and self.compression.prepare(state, layer, index)
        if not table:
            k = v = torch.empty(0, bt, heads, dim, dtype=self.layout.dtype, device=self.device)
        elif compressed:
            k, v = self.compression.read(state, layer, index)  # type: ignore[union-attr]
        elif not (self._in_place and index.direct):
            k, v = self._read_to_device(index, li)
        elif len(index.groups) == 1:
            # index_select over a strided view copies whole blocks: 6x faster than advanced indexing here.
            blocks = self._memory_arena(arenas[0]).blocks
            k = torch.index_select(blocks[:, li, 0], 0, slots)
            v = torch.index_select(blocks[:, li, 1], 0, slots)
        else:
            k = torch.empty(len(table), bt, heads, dim, dtype=self.layout.dtype)
            v = torch.empty_like(k)
            for group in index.groups:
                blocks = self._memory_arena(group.arena).blocks
                k.index_copy_(0, group.where, torch.index_select(blocks[:, li, 0], 0, group.slots))
                v.index_copy_(0, group.where, torch.index_select(blocks[:, li, 1], 0, group.slots))
        self._account_read(seq, layer, index)
        return k.reshape(-1, heads, dim)[:length], v.reshape(-1, heads, dim)[:length]

    def _read_to_device(self, index: TableIndex, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [blocks, block_tokens, kv_heads, head_dim] on self.device: blocks there indexed in place, host
        blocks staged (one gather per arena into the staging buffer, one copy across), other devices' copied."""
        lay = self.layout
        shape = (len(index.arenas), lay.block_tokens, lay.kv_heads, lay.head_dim)
        k = torch.empty(shape, dtype=lay.dtype, device=self.device)
        v = torch.empty_like(k)
        staged = [g for g in index.groups if self._routes[g.arena] == STAGED]
        if staged:
            count = sum(len(g.slots) for g in staged)
            staging = self._staging_buffer()
            host = staging.host(count)
            offset = 0
            for group in staged:
                blocks = self._memory_arena(group.arena).blocks
                n = len(group.slots)
                # K and V of the layer in one gather per arena: [n, 2, block_tokens, kv_heads, head_dim].
                torch.index_select(blocks[:, li], 0, group.slots, out=host[offset:offset + n])
                offset += n
            across = staging.to_device(count)
            where = torch.cat([g.where for g in staged]).to(self.device, non_blocking=True)
            k.index_copy_(0, where, across[:, 0])
            v.index_copy_(0, where, across[:, 1])
            for group in staged:
                for tier, blocks_of_tier in group.per_tier:
                    self.stats.traffic[tier].bytes_staged += blocks_of_tier * lay.layer_slice_bytes
        for group in index.groups:
            route = self._routes[group.arena]
            if route == STAGED:
                continue
            if route == FILE:
                self._read_file_group(group, li, k, v)
                continue
            blocks = self._memory_arena(group.arena).blocks
            where = group.where.to(self.device, non_blocking=True)
            picked = torch.index_select(blocks[:, li], 0, group.slots.to(blocks.device, non_blocking=True))
            if route == REMOTE:
                picked = picked.to(self.device)
            k.index_copy_(0, where, picked[:, 0])
            v.index_copy_(0, where, picked[:, 1])
        return k, v

    def _read_file_group(self, group: ArenaGroup, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A file tier's blocks of a table: read through the file into host memory, then across to the device."""
        lay = self.layout
        arena = self.pool.arenas[group.arena]
        assert isinstance(arena, FileArena)
        host = torch.empty((len(group.slots), 2, lay.block_tokens, lay.kv_heads, lay.head_dim), dtype=lay.dtype)
        arena.read_layers(group.slots.tolist(), li, host)
        if self.device.type != "cpu":
            host = host.to(self.device)
            for tier, count in group.per_tier:
                self.stats.traffic[tier].bytes_staged += count * lay.layer_slice_bytes
        where = group.where.to(self.device, non_blocking=True)
        k.index_copy_(0, where, host[:, 0])
        v.index_copy_(0, where, host[:, 1])

    def file_io(self) -> dict[str, FileIO]:
        """Per file tier, what really went through its file so far (reads, writes, bytes, seconds, O_DIRECT)."""
        with self.lock:
            return {name: replace(arena.io) for name, arena in self.pool.arenas.items()
                    if isinstance(arena, FileArena)}

    def _staging_buffer(self) -> StagingBuffer:
        if self._staging is None:
            lay = self.layout
            self._staging = StagingBuffer((2, lay.block_tokens, lay.kv_heads, lay.head_dim), lay.dtype, self.device)
        return self._staging

    def _route(self, arena: NumaArena | DeviceArena | FileArena) -> str:
        if isinstance(arena, FileArena):
            return FILE
        on = arena.device if isinstance(arena, DeviceArena) else CPU
        # A NUMA arena is host memory: with staging forced on a CPU "device", it is staged like on a GPU run.
        if on == self.device and not (self.stage and isinstance(arena, NumaArena)):
            return LOCAL
        return STAGED if on.type == "cpu" else REMOTE

    def attend(self, seq: int, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Decode attention of one query token [heads, head_dim] straight over the sequence's blocks in their
        arenas (a C kernel reading every K and V row where it lies: no gather copy); None when this cache
        cannot (not fp32, or head_dim not a multiple of 8), and the caller then reads and attends itself."""
        if not self._in_place or self.layout.dtype != torch.float32 or q.dtype != torch.float32 \
                or self.layout.head_dim % 8:
            return None
        # Under the lock, as read() is: the kernel reads the blocks where they lie, and the daemon's thread must
        # not move one (and reuse its slot) between the index lookup and the last row read.
        with self.lock:
            state = self._seq(seq)
            index = self._index(state, layer)
            if not index.direct:
                return None  # a block is in device memory the CPU cannot address
            if self.compression is not None and self.compression.prepare(state, layer, index):
                return None  # compressed blocks are dequantized through a staging buffer by read()
            length = state.lengths[layer]
            lay = self.layout
            q = q.contiguous()
            out = torch.empty_like(q)
            group = q.shape[0] // lay.kv_heads
            scores = torch.empty(q.shape[0] * max(1, length), dtype=torch.float32)
            kernels().paged_decode_attention(
                index.k_addrs.ctypes.data, lay.block_tokens * lay.kv_heads * lay.head_dim, length, lay.block_tokens,
                lay.kv_heads, group, lay.head_dim, q.data_ptr(), scale, out.data_ptr(), scores.data_ptr())
            self._account_read(seq, layer, index)
            return out

    def layer_start(self, layer: int) -> None:
        """Pay the emulated tiers' delay owed so far: once per layer, so the bookkeeping stays cheap. Then tell
        `on_layer_start`, if set, that the layer begins (outside the lock, so it may move blocks)."""
        if self.injector is not None:
            with self.lock:
                self.injector.settle()
        hook = self.on_layer_start
        if hook is not None:
            hook(layer)

    def end_step(self) -> None:
        """Close a forward pass: pay what is still owed and advance the clock policies see."""
        with self.lock:
            if self.injector is not None:
                self.injector.settle()
            self.step += 1
            self.pool.clock = self.step

    # -- moving blocks -----------------------------------------------------------------------------------------

    def move(self, block: Block, tier: str) -> MoveRecord:
        with self.lock:
            return self.pool.move(block, tier)

    # -- verification --------------------------------------------------------------------------------------------

    def verify(self) -> list[TierPlacement]:
        """Ask the kernel where every block's pages are, per tier."""
        with self.lock:
            return self._verify()

    def _verify(self) -> list[TierPlacement]:
        out = []
        for name in self.pool.order:
            tier = self.pool.tiers[name]
            blocks = self.pool.on(name)
            if not isinstance(self.pool.arenas[name], NumaArena):
                # File and device tiers have no pages for the kernel to place: a file tier's blocks are checked by
                # reading them back, a device tier's are in the memory torch allocated on that device. Reported as
                # fully on the tier, with no pages and no nodes.
                out.append(TierPlacement(name, tier.label, len(blocks), 0, 1.0, {}))
                continue
            status = np.concatenate([self._arena_of(b).page_nodes([b.slot]) for b in blocks]) if blocks \
                else np.empty(0, dtype=np.int32)
            present = status[status >= 0]
            nodes, counts = np.unique(present, return_counts=True)
            by_node = {int(n): int(c) for n, c in zip(nodes, counts, strict=True)}
            on = sum(c for n, c in by_node.items() if n in tier.nodes)
            out.append(TierPlacement(name, tier.label, len(blocks), len(status),
                                     on / len(present) if len(present) else 1.0, by_node))
        return out

    def close(self) -> None:
        with self.lock:
            self.pool.close()

    def __enter__(self) -> TieredKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _seq(self, seq: int) -> SequenceState:
        try:
            return self.seqs[seq]
        except KeyError:
            raise KVError(f"no sequence {seq} in the KV cache; add_sequence() it first "
                          f"(sequences: {sorted(self.seqs)[:10]})") from None

    def _arena_of(self, block: Block) -> MemoryArena:
        arena = self.pool.arenas[block.arena]
        if isinstance(arena, FileArena):
            raise KVError(f"block {block.id} is on file tier {block.tier!r}: it has no pages in memory")
        return arena

    def _memory_arena(self, name: str) -> MemoryArena:
        arena = self.pool.arenas[name]
        if isinstance(arena, FileArena):
            raise KVError(f"arena {name!r} is a file tier's; its blocks are read back into memory first")
        return arena

    def _index(self, state: SequenceState, layer: int) -> TableIndex:
        """The table's arrays (a file tier's blocks stay in their file: reads go through it). Rebuilt after
        any move (a daemon moves blocks every epoch), so it is built with array arithmetic, and once for all the
        layers that share one table."""
        table = state.tables[layer]
        key = (len(table), self.pool.generation)
        index = state.index.get(layer)
        if index is not None and index.key == key:
            return index
        li = 0 if self.layout.per_layer else layer
        layer_offset = li * self.layout.layer_slice_bytes
        shared = None if self.layout.per_layer else next(
            (i for i in state.index.values() if i.key == key), None)
        index = self._build_index(table, layer_offset) if shared is None else shared.for_layer_offset(layer_offset)
        state.index[layer] = index
        return index

    def _build_index(self, table: list[Block], layer_offset: int) -> TableIndex:
        key = (len(table), self.pool.generation)
        n = len(table)
        ids = np.fromiter((b.id for b in table), np.int64, n)
        tiers = np.fromiter((self.tier_index[b.tier] for b in table), np.int16, n)
        slots = np.fromiter((b.slot for b in table), np.int64, n)
        arenas = tuple(b.arena for b in table)
        block_addrs = np.empty(n, np.int64)
        groups = []
        direct = True
        for name in dict.fromkeys(arenas):
            mine = np.fromiter((a == name for a in arenas), bool, n)
            arena = self.pool.arenas[name]
            if isinstance(arena, FileArena):
                block_addrs[mine] = 0  # no address: the C kernel cannot attend in place, reads go through the file
                direct = False
            else:
                block_addrs[mine] = arena.addrs(slots[mine])
                direct = direct and (isinstance(arena, NumaArena) or arena.host_addressable)
            where = np.flatnonzero(mine)
            groups.append(ArenaGroup(name, torch.from_numpy(where), torch.from_numpy(slots[where]),
                                     self._per_tier(tiers[where])))
        return TableIndex(key=key, ids=ids, tiers=tiers, slots=torch.from_numpy(slots), arenas=arenas,
                          block_addrs=block_addrs, k_addrs=block_addrs + layer_offset,
                          per_tier=self._per_tier(tiers), groups=tuple(groups), direct=direct)

    def _per_tier(self, tiers: np.ndarray) -> tuple[tuple[str, int], ...]:
        counts = np.bincount(tiers, minlength=len(self.pool.order)) if len(tiers) else \
            np.zeros(len(self.pool.order), int)
        return tuple((self.pool.order[i], int(c)) for i, c in enumerate(counts) if c)

    def _account_read(self, seq: int, layer: int, index: TableIndex) -> None:
        slice_bytes = self.layout.layer_slice_bytes
        across = 0
        for tier, count in index.per_tier:
            traffic = self.stats.traffic[tier]
            # A compressed tier's blocks are read at their compressed size.
            read = count * slice_bytes if self.compression is None else self.compression.read_bytes(tier, count)
            traffic.blocks_read += count
            traffic.bytes_read += read
            if self.injector is not None and self.injector.emulates(tier):
                # Each block is one access at the tier's latency, then a stream at its bandwidth.
                self.injector.read(tier, count, read)
            if self._link is not None and tier != self._link:
                # The (emulated) GPU reads a host tier's blocks across its link: one transfer per read, as the
                # staging path gathers every host block of the read and copies them across at once. Compressed
                # blocks cross at their compressed size.
                traffic.bytes_staged += read
                across += read
        if self._link is not None and self.injector is not None and across:
            self.injector.cross(self._link, across)
        if self.log is not None:
            self.log.record(self.step, layer, seq, index.ids, index.tiers)


def _concrete(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current device): arenas report concrete devices, and the two compare unequal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _capacities(resolved: ResolvedTierMap, layout: KVLayout, given: Mapping[str, int] | None) -> dict[str, int]:
    """Blocks per tier: given explicitly, else from the tier map's capacity_mib."""
    given = dict(given or {})
    unknown = sorted(set(given) - {t.name for t in resolved.tiers})
    if unknown:
        raise KVError(f"capacity given for unknown tier(s) {', '.join(unknown)}; tiers: "
                      f"{', '.join(t.name for t in resolved.tiers)}")
    out = {}
    for tier in resolved.tiers:
        if tier.name in given:
            blocks = given[tier.name]
        elif tier.spec.capacity_mib is not None:
            blocks = tier.spec.capacity_mib * MIB // layout.block_bytes
        else:
            raise KVError(f"tier {tier.name!r} has no KV capacity: set capacity_mib in the tier map or give one "
                          f"(blocks are {layout.block_bytes >> 10} KiB)")
        if blocks < 0:
            raise KVError(f"tier {tier.name!r}: capacity {blocks} blocks; give 0 or more")
        out[tier.name] = blocks
    if not any(out[t.name] for t in resolved.tiers if not t.spec.is_file):
        raise KVError("no memory tier has any KV capacity; give at least one a capacity_mib")
    return out
