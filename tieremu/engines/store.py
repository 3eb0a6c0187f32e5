"""The tier store behind an engine's KV connector: the engine's KV blocks, keyed by the engine's block hashes, in
tieremu's tiered KV cache (the same arenas, tier maps, timing models, policies and migration daemon as tieremu's
own decode and execute-mode replay).

A saved block is admitted where the policy says, room being made the way execute-mode replay makes it (the policy's
victim pushed one tier down, recursively, or out of the last tier) and written through the cache's write path; a
loaded block is read through the cache's read path, so an emulated tier's timing model charges every load and save,
and every hit is attributed to the tier that served it. A demand cache's load below the fastest tier is then
promoted where the policy admits it (the daemon's promote: the placement engine makes room). The policy observes
every lookup (hits and misses) and its epochs run between engine steps in the engine's own thread (no concurrency
with the engine's forward pass).

A tier whose map says `compression: fp8|int8|int4` holds its blocks compressed (tieremu.kv.compress_store's hook on
the cache): a block put or moved into it is compressed there and then (each layer's K and V, by the compiled codec)
and written at its compressed size (the tier's emulated write charge and its byte counts are the compressed bytes;
a move carries only those, kv/pool.py); a load from it reads the compressed bytes (charged at that size) and
dequantizes them for the engine. Both times are measured, per tier (`StoreStats.compression`), a move's from its
record. A slot still has room for a raw block: capacity in blocks does not
grow with the ratio here (replay's accounting models that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tieremu.daemon.daemon import MigrationDaemon
from tieremu.daemon.room import LiveBoard, admit_new, carry_out_admission
from tieremu.daemon.view import PoolView
from tieremu.errors import ConfigError, KVError
from tieremu.kv.cache import MIB, TieredKVCache
from tieremu.kv.compress import Codec
from tieremu.kv.compress_store import TierCompression
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Directed
from tieremu.kv.pool import Block
from tieremu.policy.base import AccessEvent, Policy
from tieremu.tiers.config import TierMap, TierSpec
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap


@dataclass
class TierCompressionStats:
    """One compressed tier's figures: its format, what its blocks took and saved, what (de)compression cost."""

    format: str
    layout: str
    ratio: float  # a raw block's bytes over its compressed bytes (scales included)
    block_bytes: int  # one block (every layer's K and V) as held in the tier
    raw_block_bytes: int
    blocks_compressed: int = 0  # blocks put or moved into the tier
    bytes_stored: int = 0  # written by saves, at compressed size
    bytes_loaded: int = 0  # read by loads, at compressed size
    bytes_saved: int = 0  # raw minus compressed, over saves and loads
    compress_s: float = 0.0
    decompress_s: float = 0.0  # dequantizing loads, and restoring blocks moved out to an uncompressed tier


@dataclass
class StoreStats:
    """What the store did: blocks in and out, per tier, and what it cost."""

    stored_blocks: int = 0
    loaded_blocks: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)
    stored_by_tier: dict[str, int] = field(default_factory=dict)
    lookups: int = 0  # blocks asked for by the scheduler
    not_admitted: int = 0  # saves with no room (every tier full of pinned blocks)
    demotions: int = 0  # victims pushed one tier down to make room
    promotions: int = 0  # a demand cache's loads below the fastest tier, moved up after the load
    evictions: int = 0  # victims pushed out of the last tier
    save_s: float = 0.0
    load_s: float = 0.0
    stored_bytes_by_tier: dict[str, int] = field(default_factory=dict)  # a compressed tier's at compressed size
    loaded_bytes_by_tier: dict[str, int] = field(default_factory=dict)  # likewise
    compression: dict[str, TierCompressionStats] = field(default_factory=dict)  # per compressed tier


def capacities_for(resolved: ResolvedTierMap, layout: KVLayout,
                   given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Blocks per tier (from capacity_mib unless given); ConfigError naming a tier that cannot hold one block."""
    given = dict(given or {})
    out = {}
    for tier in resolved.tiers:
        if tier.name in given:
            if given[tier.name] < 1:
                raise ConfigError(f"tier {tier.name!r}: capacity {given[tier.name]} blocks; give 1 or more")
            out[tier.name] = given[tier.name]
        else:
            _check_tier(tier.spec, layout.block_bytes, layout.block_tokens)
            out[tier.name] = tier.spec.capacity_mib * MIB // layout.block_bytes
    return out


def check_capacities(tier_map: TierMap, block_bytes: int, block_tokens: int) -> None:
    """Before any engine starts: every tier of the map has a capacity_mib that holds one block (ConfigError naming
    the tier, its capacity and the block size otherwise)."""
    for tier in tier_map.tiers:
        _check_tier(tier, block_bytes, block_tokens)


def _check_tier(tier: TierSpec, block_bytes: int, block_tokens: int) -> None:
    if tier.capacity_mib is None:
        raise ConfigError(f"tier {tier.name!r} has no capacity_mib: the connector's store needs one per tier "
                          f"(a block is {block_bytes / MIB:.3f} MiB)")
    if tier.capacity_mib * MIB < block_bytes:
        raise ConfigError(f"tier {tier.name!r} cannot hold one KV block: capacity {tier.capacity_mib} MiB, a "
                          f"block of {block_tokens} tokens of this model is {block_bytes / MIB:.3f} MiB; give "
                          f"capacity_mib >= {-(-block_bytes // MIB)} or a smaller --block-tokens")


class TierStore:
    def __init__(self, resolved: ResolvedTierMap, layout: KVLayout, policy: Policy, *,
                 injector: DelayInjector | None = None, capacities: Mapping[str, int] | None = None,
                 epoch_s: float = 0.01) -> None:
        if layout.per_layer:
            raise ConfigError("the connector's store keeps whole blocks (all layers): use the all-layers layout")
        self.layout = layout
        self.policy = policy
        self.capacity = capacities_for(resolved, layout, capacities)
        self.names = [t.name for t in resolved.tiers]
        self.rank = {name: i for i, name in enumerate(self.names)}
        self.placement = Directed(self.names[0], "connector's policy")
        self.cache = TieredKVCache(resolved, layout, capacities=self.capacity, placement=self.placement,
                                   injector=injector, log_accesses=False)
        try:
            self.compression = TierCompression.attach(self.cache)  # None when no tier is compressed
            self.daemon = MigrationDaemon(self.cache, policy, epoch_s=epoch_s, ident="key")
        except BaseException:
            self.cache.close()
            raise
        self.view: PoolView = self.daemon.view
        self.board = LiveBoard(self.view, self.cache.pool.capacity, self.daemon.policy_lock)
        self.stats = StoreStats(hits_by_tier=dict.fromkeys(self.names, 0),
                                stored_by_tier=dict.fromkeys(self.names, 0),
                                stored_bytes_by_tier=dict.fromkeys(self.names, 0),
                                loaded_bytes_by_tier=dict.fromkeys(self.names, 0))
        if self.compression is not None:
            for tier, codec in self.compression.codecs.items():
                self.stats.compression[tier] = TierCompressionStats(
                    codec.kind, codec.layout, codec.ratio, codec.compressed_bytes * layout.layers,
                    layout.block_bytes)
        self.lock = threading.RLock()  # the scheduler's lookups and the worker's loads and saves
        self._next_seq = 0
        self._moves_seen = 0  # pool.moves counted into the compression figures
        self._t0 = time.monotonic()

    # -- the scheduler's questions ---------------------------------------------------------------------------

    def matched(self, keys: Sequence[int], request: int) -> int:
        """How many of keys, from the first, are resident; they are pinned until release() (a save must not push
        out a block the scheduler has promised to load). The policy sees the lookups."""
        with self.lock, self.cache.lock:
            count = 0
            for key in keys:
                if self.view.tier_of(key) is None:
                    break
                count += 1
            self.view.pin(keys[:count])
            self.stats.lookups += len(keys)
        return count

    def release(self, keys: Sequence[int]) -> None:
        with self.lock:
            self.view.unpin(keys)

    def resident_prefix(self, keys: Sequence[int]) -> int:
        """How many of keys, from the first, are resident (nothing pinned, nothing counted: a look before a peer
        is asked for the rest)."""
        with self.lock, self.cache.lock:
            count = 0
            for key in keys:
                if self.view.tier_of(key) is None:
                    break
                count += 1
            return count

    # -- what peers ask of this store (tieremu.cluster's vLLM instances) ---------------------------------------

    def held(self) -> set[int]:
        """The keys of every resident block."""
        with self.lock, self.cache.lock:
            return {b.key for b in self.cache.pool.blocks.values() if b.key is not None}

    def peek(self, key: int) -> bytes | None:
        """A resident block's bytes as save() takes them ([layers, 2, block_tokens, kv_heads, head_dim] of the
        layout's dtype), copied out of its tier's memory under the lock, for a peer that pulls it; None if it is not
        resident or is held in a form that is not those bytes (a compressed or file tier). Not counted as a load:
        the peer's pull is counted by the transport."""
        with self.lock, self.cache.lock:
            block = self.cache.pool.by_key(key)
            if block is None or (self.compression is not None and block.tier in self.compression.codecs):
                return None
            arena = self.cache.pool.arenas[block.arena]
            blocks = getattr(arena, "blocks", None)
            if not isinstance(blocks, torch.Tensor) or blocks.device.type != "cpu":
                return None
            return blocks[block.slot].contiguous().view(torch.uint8).numpy().tobytes()

    # -- the worker's loads and saves ------------------------------------------------------------------------

    def load(self, keys: Sequence[int], request: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V of every layer ([blocks * block_tokens, kv_heads, head_dim] each) of these resident blocks, read
        through the cache's read path (an emulated tier's delay is paid here); hits counted per tier."""
        if not keys:
            return []
        with self.lock:
            t0 = time.perf_counter()
            traffic = self.cache.stats.traffic
            read_before = {name: traffic[name].bytes_read for name in self.names}
            dq_before = self.compression.stats.decompress_ns if self.compression is not None else 0
            seq = self._seq()
            hit = self.cache.add_sequence(seq, keys=list(keys))
            try:
                if hit.tokens != len(keys) * self.layout.block_tokens:
                    raise KVError(f"connector: {hit.tokens // self.layout.block_tokens} of {len(keys)} promised "
                                  "blocks are resident; a pinned block left the store")
                out = [self.cache.read(seq, layer) for layer in range(self.layout.layers)]
                self.cache.end_step()  # pays the emulated tiers' delay the reads owe
            finally:
                self.cache.free_sequence(seq)
            for tier, n in hit.blocks_by_tier.items():
                self.stats.hits_by_tier[tier] += n
            self._count_load(hit.blocks_by_tier, read_before, dq_before)
            self.stats.loaded_blocks += len(keys)
            self.stats.load_s += time.perf_counter() - t0
            served = [(k, self.view.tier_of(k)) for k in keys]
            if self.policy.family == "demand":
                self._promote(served)
                self._settle_moved()
            self._observe([AccessEvent(k, tier, self._now(), request) for k, tier in served])
            self.view.unpin(keys)
            return out

    def save(self, key: int, block: torch.Tensor, request: int) -> str | None:
        """Store one block ([layers, 2, block_tokens, kv_heads, head_dim]) under key where the policy admits it;
        the tier it landed in, or None if it was resident already or no tier could take it."""
        with self.lock:
            if self.view.tier_of(key) is not None:
                return None
            t0 = time.perf_counter()
            cache = self.cache
            with cache.lock:
                admission = admit_new(self.board, self.policy, key)
                done = carry_out_admission(cache, self.board, self.policy, key, admission)
                self.stats.demotions += done.demoted
                self.stats.evictions += done.evicted
                if admission.rank is None:
                    self.stats.not_admitted += 1
                    return None
                tier = self.names[admission.rank]
                self.placement.target = tier
                seq = self._seq()
                cache.add_sequence(seq, keys=[key])
                compressed = self.stats.compression.get(tier)
                injector = cache.injector
                if compressed is not None:
                    cache.injector = None  # the raw write is not the tier's: its compressed bytes are charged below
                written = cache.stats.traffic[tier].bytes_written
                try:
                    for layer in range(self.layout.layers):
                        cache.write(seq, layer, 0, block[layer, 0], block[layer, 1])
                finally:
                    cache.injector = injector
                    cache.free_sequence(seq)
                landed = cache.pool.by_key(key)
                if landed is None or landed.tier != tier:
                    raise KVError(f"connector: block {key} was admitted to tier {tier!r} but landed in "
                                  f"{None if landed is None else landed.tier!r}")
                nbytes = cache.stats.traffic[tier].bytes_written - written
                if self.compression is not None:
                    self._settle_moved()  # the new block, and any victim pushed down into a compressed tier
                if compressed is not None:
                    cache.stats.traffic[tier].bytes_written -= nbytes - compressed.block_bytes
                    compressed.bytes_saved += nbytes - compressed.block_bytes
                    nbytes = compressed.block_bytes
                    compressed.bytes_stored += nbytes
                    if injector is not None and injector.emulates(tier):
                        injector.transfer(tier, nbytes, "write")
                self.stats.stored_bytes_by_tier[tier] += nbytes
            cache.end_step()  # pays the emulated tiers' delay the writes owe
            self.stats.stored_blocks += 1
            self.stats.stored_by_tier[tier] += 1
            self.stats.save_s += time.perf_counter() - t0
            self._observe([AccessEvent(key, None, self._now(), request)])
            return tier

    def epoch(self) -> None:
        """One epoch of the policy's plans (moves, evictions), run between engine steps."""
        with self.lock:
            self.daemon.epoch(self._now())
            self._settle_moved()

    def resident(self) -> dict[str, int]:
        return {name: self.cache.pool.used(name) for name in self.names}

    def close(self) -> None:
        self.cache.close()

    def _promote(self, served: Sequence[tuple[int, str | None]]) -> None:
        """A demand cache's hits below the fastest tier move where the policy admits them, as in simulate and
        execute-mode replay: real moves through the daemon, room made by the placement engine."""
        for key, tier in served:
            if tier is None or tier == self.names[0]:
                continue
            with self.daemon.policy_lock:
                target = self.policy.admit(key, self.view)
            if target in self.rank and self.rank[target] < self.rank[tier]:
                self.daemon.promote(key, tier, target)
                self.stats.promotions += self.view.tier_of(key) == target

    def _settle_moved(self) -> None:
        """Every block whose tier's format differs from how it is held (put, demoted or promoted since) is
        compressed or restored now, the time going to the tier it was compressed in or restored out of."""
        hook = self.compression
        if hook is None:
            return
        with self.cache.lock:
            self._count_moved()
            for block in list(self.cache.pool.blocks.values()):
                have = hook.slices.get((block.id, 0))
                if have is not hook.codecs.get(block.tier):
                    self._settle(block, have)

    def _count_moved(self) -> None:
        """Moves since the last count that compressed or decompressed their block on the way (the pool's copy-moves
        into and out of compressed tiers): their measured time to the tier compressed into or restored out of."""
        moves = self.cache.pool.moves
        for rec in moves[self._moves_seen:]:
            into, out_of = self.stats.compression.get(rec.target), self.stats.compression.get(rec.source)
            if rec.ok and rec.compress_seconds and into is not None:
                into.blocks_compressed += 1
                into.compress_s += rec.compress_seconds
            if rec.ok and rec.decompress_seconds and out_of is not None:
                out_of.decompress_s += rec.decompress_seconds
        self._moves_seen = len(moves)

    def _settle(self, block: Block, have: Codec | None) -> None:
        hook = self.compression
        assert hook is not None
        c0, d0 = hook.stats.compress_ns, hook.stats.decompress_ns
        hook.settle(block)
        into = self.stats.compression.get(block.tier)
        if into is not None:
            into.blocks_compressed += 1
            into.compress_s += (hook.stats.compress_ns - c0) / 1e9
        if have is not None:
            out_of = next(t for t, c in hook.codecs.items() if c is have)
            self.stats.compression[out_of].decompress_s += (hook.stats.decompress_ns - d0) / 1e9

    def _count_load(self, blocks_by_tier: Mapping[str, int], read_before: Mapping[str, int], dq_before: int) -> None:
        """A load's bytes per tier (compressed tiers' at their compressed size, as the cache's read path counts
        them); its dequantization time shared among the compressed tiers it read, by blocks."""
        traffic = self.cache.stats.traffic
        for tier in self.names:
            self.stats.loaded_bytes_by_tier[tier] += traffic[tier].bytes_read - read_before[tier]
        if self.compression is None:
            return
        mine = {t: n for t, n in blocks_by_tier.items() if t in self.stats.compression and n}
        total = sum(mine.values())
        spent = (self.compression.stats.decompress_ns - dq_before) / 1e9
        for tier, n in mine.items():
            c = self.stats.compression[tier]
            moved = traffic[tier].bytes_read - read_before[tier]
            c.bytes_loaded += moved
            c.bytes_saved += n * c.raw_block_bytes - moved
            c.decompress_s += spent * n / total

    def _observe(self, events: list[AccessEvent]) -> None:
        with self.daemon.policy_lock:
            self.policy.observe(events)

    def _seq(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    def _now(self) -> float:
        return time.monotonic() - self._t0
