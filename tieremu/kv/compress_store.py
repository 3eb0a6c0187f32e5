"""Blocks of compressed tiers held compressed in the tiered KV cache, and read back through a staging buffer.

`TierCompression.attach(cache)` gives a TieredKVCache its `compression` hook. From then on every layer slice of a
full block (all block_tokens written) that sits on a tier whose map says `compression: fp8|int8|int4` is held in that
tier's arena compressed: its compressed bytes overwrite the start of the slice in place, so reading it moves only
compressed bytes out of the tier's memory. A slice is compressed at the first read after it fills, and a block moved
between tiers (whoever moved it: the daemon moves blocks through the pool, not the cache) is compressed or
decompressed by the move itself, the hook being the pool's `codec` (kv/pool.py): a demotion into a compressed tier
reads the raw slices out of the source and writes only their compressed bytes into the target; a promotion out of one
reads the compressed bytes and writes the dequantized slices into the target. The move record counts the bytes that
crossed (compressed slices at their compressed size) and the (de)compression time. A page migration between NUMA
nodes moves whole pages and is not the hook's: the slices are compressed or restored in place at their next read.
A partly written block stays as written: its tokens are still arriving (KIVI likewise keeps the newest tokens in
full precision).

Attention cannot read a compressed slice in place (the C attention kernel reads fp32 rows), so a read with any
compressed block dequantizes those blocks (one kernel call per read) into a staging buffer, gathers the others beside
them, and attention runs on that: the result's state is `staging`. Compression and decompression are timed (ns per
call, summed) and the bytes read from each tier are counted at their compressed size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tieremu.errors import KVError
from tieremu.kv.arena import Arena, DeviceArena, FileArena, NumaArena
from tieremu.kv.compress import Codec, codec_for
from tieremu.kv.pool import CodecMove

if TYPE_CHECKING:
    from tieremu.kv.cache import SequenceState, TableIndex, TieredKVCache
    from tieremu.kv.pool import Block

STAGING = "staging"  # how attention reads compressed blocks: dequantized into a buffer first (not in place)


@dataclass
class CompressionStats:
    """What compression cost and saved over a run (layer slices, nanoseconds, bytes)."""

    slices_compressed: int = 0
    slices_restored: int = 0  # decompressed: moved out to an uncompressed tier (by the move, or in place)
    slices_dequantized: int = 0  # dequantized for a read
    compress_ns: int = 0
    decompress_ns: int = 0
    bytes_saved_on_read: int = 0
    by_tier: dict[str, str] = field(default_factory=dict)  # tier -> format description

    @property
    def compress_us_per_slice(self) -> float:
        return self.compress_ns / 1e3 / self.slices_compressed if self.slices_compressed else 0.0

    @property
    def decompress_us_per_slice(self) -> float:
        return self.decompress_ns / 1e3 / self.slices_dequantized if self.slices_dequantized else 0.0


@dataclass(frozen=True)
class _Plan:
    """One table's read at one layer: which blocks are held compressed, by codec, and the bytes read per tier."""

    index: TableIndex  # held, so its identity is not reused while the plan lives
    key: tuple[int, int]  # (full blocks, format version)
    by_codec: dict[Codec, list[int]]
    held: list[int]
    read_bytes: dict[str, int]


class TierCompression:
    """The cache's compression hook: which slices are compressed, with which codec, and the staged reads."""

    state = STAGING

    def __init__(self, cache: TieredKVCache) -> None:
        lay = cache.layout
        self.cache = cache
        self.codecs: dict[str, Codec] = {}
        for tier in cache.resolved.tiers:
            c = tier.spec.compression
            codec = codec_for(c.format, c.layout, block_tokens=lay.block_tokens, kv_heads=lay.kv_heads,
                              head_dim=lay.head_dim, dtype=lay.dtype)
            if codec is None:
                continue
            if isinstance(cache.pool.arenas[tier.name], DeviceArena):
                raise KVError(f"tier {tier.name!r} is a GPU tier with compression {c.format}: the compression "
                              "kernels run on the CPU over host memory; compress a host or file tier instead")
            self.codecs[tier.name] = codec
        self._by_index = [self.codecs.get(name) for name in cache.pool.order]
        self._compressed_tiers = np.array([i for i, c in enumerate(self._by_index) if c is not None], np.int16)
        self.slices: dict[tuple[int, int], Codec] = {}  # (block id, layer in block) -> codec it is held in
        self.full: set[tuple[int, int]] = set()  # (block id, layer in block) of slices with every token written
        self.stats = CompressionStats(by_tier={t: c.describe() for t, c in self.codecs.items()})
        self._staging = torch.empty(0)
        self._read_bytes: dict[str, int] = {}
        self._version = 0  # bumped whenever any slice changes format
        self._memo: dict[tuple[int, int], _Plan] = {}  # (sequence, layer) -> its last read's plan
        self._plan: _Plan | None = None  # the plan of the read prepare() was last called for

    @classmethod
    def attach(cls, cache: TieredKVCache) -> TierCompression | None:
        """Hook compression into the cache when its tier map compresses any tier; None (and no hook) otherwise."""
        hook = cls(cache)
        if not hook.codecs:
            return None
        cache.compression = hook
        cache.pool.codec = hook
        return hook

    # -- the cache's hooks --------------------------------------------------------------------------------------

    def prepare(self, state: SequenceState, layer: int, index: TableIndex) -> bool:
        """Bring the table's slices for this layer to their tier's format; whether any is held compressed (then
        attention reads through the staging buffer). Under the cache's lock: it rewrites blocks a daemon may move."""
        with self.cache.lock:
            return self._prepare(state, layer, index)

    def _prepare(self, state: SequenceState, layer: int, index: TableIndex) -> bool:
        li = 0 if self.cache.layout.per_layer else layer
        table = state.tables[layer]
        if not self.slices and not np.isin(index.tiers, self._compressed_tiers).any():
            self._read_bytes, self._plan = {}, None
            return False
        full = state.lengths[layer] // self.cache.layout.block_tokens
        # The plan holds while the table is unchanged (the cache rebuilds its index after any move or growth), no
        # block filled, and no slice changed format anywhere (a shared prefix block may have been compressed through
        # another sequence's table).
        key = (full, self._version)
        memo = self._memo.get((state.id, layer))
        if memo is not None and memo.index is index and memo.key == key:  # the same table index object: no move
            self._read_bytes, self._plan = memo.read_bytes, memo
            return bool(memo.held)
        pending: dict[Codec, list[Block]] = {}
        for i, block in enumerate(table):  # a Python loop when the table changed: tables are tens of blocks
            want = self._by_index[index.tiers[i]] if i < full else None
            have = self.slices.get((block.id, li))
            if want is not have:
                if have is not None:
                    self._restore(block, li, have)
                if want is not None:
                    pending.setdefault(want, []).append(block)
        for codec, blocks in pending.items():  # one kernel call per format (a prefill fills many blocks at once)
            self._compress(blocks, li, codec)
        by_codec: dict[Codec, list[int]] = {}
        for i, block in enumerate(table):
            codec = self.slices.get((block.id, li))
            if codec is not None:
                by_codec.setdefault(codec, []).append(i)
        plan = _Plan(index, (full, self._version), by_codec, [i for w in by_codec.values() for i in w],
                     self._bytes_by_tier(table, li, index))
        self._memo[(state.id, layer)] = plan
        self._read_bytes, self._plan = plan.read_bytes, plan
        return bool(plan.held)

    def read_bytes(self, tier: str, count: int) -> int:
        """Bytes the last prepared read moves out of `tier` for its `count` blocks (compressed ones at their size)."""
        full = count * self.cache.layout.layer_slice_bytes
        moved = self._read_bytes.get(tier, full)
        self.stats.bytes_saved_on_read += full - moved
        return moved

    def read(self, state: SequenceState, layer: int, index: TableIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [blocks, block_tokens, kv_heads, head_dim] on the cache's device: compressed slices dequantized
        and the others gathered into the staging buffer, then copied out of it."""
        cache, lay = self.cache, self.cache.layout
        li = 0 if lay.per_layer else layer
        table = state.tables[layer]
        n = len(table)
        staged = self._staging_buffer(n)
        plan = self._plan
        if plan is None:
            raise KVError("compressed read without prepare(): the cache calls prepare() first")
        held = plan.held
        for codec, where in plan.by_codec.items():
            t0 = time.perf_counter_ns()
            if where == list(range(where[0], where[0] + len(where))):  # a run: dequantized straight into the buffer
                codec.decompress_many(index.k_addrs[where], staged[where[0]:where[0] + len(where)])
            else:
                out = torch.empty((len(where), *codec.shape), dtype=lay.dtype)
                codec.decompress_many(index.k_addrs[where], out)
                staged.index_copy_(0, torch.tensor(where), out)
            self.stats.decompress_ns += time.perf_counter_ns() - t0
            self.stats.slices_dequantized += len(where)
        if len(held) < n:
            raw = np.ones(n, bool)
            raw[held] = False
            for group in index.groups:
                mine = raw[group.where.numpy()]
                if not mine.any():
                    continue
                blocks = cache._memory_arena(group.arena).blocks
                where, slots = group.where[torch.from_numpy(mine)], group.slots[torch.from_numpy(mine)]
                # A GPU tier's blocks come through the host too: the staged table is assembled in one place.
                picked = torch.index_select(blocks[:, li], 0, slots.to(blocks.device))
                staged.index_copy_(0, where, picked.cpu())
        k = staged[:, 0].to(cache.device, copy=True)
        v = staged[:, 1].to(cache.device, copy=True)
        if cache.device.type != "cpu":  # the dequantized blocks crossed to the model's device at full size
            for tier, count in index.per_tier:
                cache.stats.traffic[tier].bytes_staged += count * lay.layer_slice_bytes
        return k, v

    def settle(self, block: Block) -> None:
        """Bring every layer slice of one full block to its tier's format now (compressed in a compressed tier,
        restored elsewhere) rather than at its next read: a store that holds whole blocks (the engine connector's)
        compresses a block when it is put into, or moved into, a compressed tier. Under the cache's lock."""
        want = self.codecs.get(block.tier)
        with self.cache.lock:
            for li in range(1 if self.cache.layout.per_layer else self.cache.layout.layers):
                self.full.add((block.id, li))  # a store's block is whole
                have = self.slices.get((block.id, li))
                if have is want:
                    continue
                if have is not None:
                    self._restore(block, li, have)
                if want is not None:
                    self._compress([block], li, want)

    def filled(self, block: Block, li: int) -> None:
        """The cache's write path: every token of this layer slice is written (it may be held compressed now)."""
        self.full.add((block.id, li))
        if len(self.full) > 2 * self.cache.layout.layers * len(self.cache.pool.blocks) + 64:  # drop freed blocks'
            live = self.cache.pool.blocks
            self.full = {k for k in self.full if k[0] in live}

    # -- the pool's hook (moves) --------------------------------------------------------------------------------

    def _layers(self) -> range:
        return range(1 if self.cache.layout.per_layer else self.cache.layout.layers)

    def _wanted(self, block: Block, li: int, target: str) -> Codec | None:
        return self.codecs.get(target) if (block.id, li) in self.full else None

    def involves(self, block: Block, target: str) -> bool:
        """Whether a copy-move of block to target changes how any of its slices is held, between memory arenas
        (a file or GPU tier's blocks are copied raw, as the hook's kernels run over host memory)."""
        arenas = self.cache.pool.arenas
        if not (isinstance(arenas[block.arena], NumaArena) and isinstance(arenas[target], NumaArena)):
            return False
        return any(self.slices.get((block.id, li)) is not self._wanted(block, li, target) for li in self._layers())

    def copy_move(self, block: Block, src: Arena, src_slot: int, dst: Arena, dst_slot: int,
                  target: str) -> CodecMove:
        """Copy block into (dst, dst_slot), each full slice in target's form: compressed by the kernel straight from
        the source's raw slice into the target (a demotion), dequantized straight from the source's compressed bytes
        into the target (a promotion), compressed bytes copied as they are (same format), raw copied raw. Bytes read,
        written and crossed per the pool's docstring; (de)compression timed. Called by the pool under its lock."""
        assert isinstance(src, NumaArena) and isinstance(dst, NumaArena)
        raw = self.cache.layout.layer_slice_bytes
        read = written = crossed = 0
        c_ns = d_ns = 0
        to_compress: dict[Codec, list[tuple[int, torch.Tensor, bool]]] = {}  # li, its raw slice, read from src
        for li in self._layers():
            have, want = self.slices.get((block.id, li)), self._wanted(block, li, target)
            s_view, d_view = src.blocks[src_slot, li], dst.blocks[dst_slot, li]
            if have is want:
                n = raw if have is None else have.compressed_bytes
                d_view.reshape(-1).view(torch.uint8)[:n].copy_(s_view.reshape(-1).view(torch.uint8)[:n])
                read, written, crossed = read + n, written + n, crossed + n
                continue
            if have is None:
                to_compress.setdefault(want, []).append((li, s_view, True))  # type: ignore[arg-type]
                continue
            # Read the compressed bytes, write the raw slice (a change of format compresses that again below).
            t0 = time.perf_counter_ns()
            have.decompress(s_view.reshape(-1).view(torch.uint8)[:have.compressed_bytes], d_view)
            d_ns += time.perf_counter_ns() - t0
            self.stats.slices_restored += 1
            del self.slices[(block.id, li)]
            read += have.compressed_bytes
            if want is None:
                written, crossed = written + raw, crossed + have.compressed_bytes
            else:
                to_compress.setdefault(want, []).append((li, d_view, False))
                crossed += min(have.compressed_bytes, want.compressed_bytes)
        for codec, items in to_compress.items():
            t0 = time.perf_counter_ns()
            kv = torch.stack([view for _, view, _ in items])  # the raw slices, read once (a copy: see _compress)
            codec.compress_many(kv, np.fromiter((dst.blocks[dst_slot, li].data_ptr() for li, _, _ in items),
                                                np.int64, len(items)))
            c_ns += time.perf_counter_ns() - t0
            self.stats.slices_compressed += len(items)
            for li, _, from_src in items:
                self.slices[(block.id, li)] = codec
                written += codec.compressed_bytes
                if from_src:
                    read, crossed = read + raw, crossed + codec.compressed_bytes
        self.stats.compress_ns += c_ns
        self.stats.decompress_ns += d_ns
        self._version += 1
        return CodecMove(read, written, crossed, c_ns, d_ns)

    # -- internals ----------------------------------------------------------------------------------------------

    def _slice(self, block_arena: str, slot: int, li: int) -> torch.Tensor:
        arena = self.cache.pool.arenas[block_arena]
        if isinstance(arena, FileArena):  # the cache reads file-tier blocks back into memory before any read
            raise KVError(f"arena {block_arena!r} is a file tier's; its blocks are read back into memory first")
        return arena.blocks[slot, li]

    def _compress(self, blocks: list[Block], li: int, codec: Codec) -> None:
        views = [self._slice(b.arena, b.slot, li) for b in blocks]
        t0 = time.perf_counter_ns()
        kv = torch.stack(views)  # a copy: the kernel writes each block's codes where its values are read
        codec.compress_many(kv, np.fromiter((v.data_ptr() for v in views), np.int64, len(views)))
        self.stats.compress_ns += time.perf_counter_ns() - t0
        self.stats.slices_compressed += len(blocks)
        for b in blocks:
            self.slices[(b.id, li)] = codec
        self._version += 1
        if len(self.slices) > 2 * len(self.cache.pool.blocks) + 64:  # drop freed blocks' entries now and then
            live = self.cache.pool.blocks
            self.slices = {k: c for k, c in self.slices.items() if k[0] in live}

    def _restore(self, block: Block, li: int, codec: Codec) -> None:
        view = self._slice(block.arena, block.slot, li)
        t0 = time.perf_counter_ns()
        data = view.reshape(-1).view(torch.uint8)[:codec.compressed_bytes].clone()
        codec.decompress(data, view)
        self.stats.decompress_ns += time.perf_counter_ns() - t0
        self.stats.slices_restored += 1
        del self.slices[(block.id, li)]
        self._version += 1

    def _bytes_by_tier(self, table: list, li: int, index: TableIndex) -> dict[str, int]:
        full = self.cache.layout.layer_slice_bytes
        out: dict[str, int] = {}
        for i, block in enumerate(table):
            codec = self.slices.get((block.id, li))
            tier = self.cache.pool.order[index.tiers[i]]
            out[tier] = out.get(tier, 0) + (full if codec is None else codec.compressed_bytes)
        return out

    def _staging_buffer(self, blocks: int) -> torch.Tensor:
        lay = self.cache.layout
        if self._staging.shape[0] < blocks:  # doubling: a decode's reads grow a block at a time
            self._staging = torch.empty((max(blocks, 2 * self._staging.shape[0]), 2, lay.block_tokens, lay.kv_heads,
                                         lay.head_dim), dtype=lay.dtype)
        return self._staging[:blocks]
