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
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Directed
from tieremu.policy.base import AccessEvent, Policy
from tieremu.tiers.config import TierMap, TierSpec
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap


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
            self.daemon = MigrationDaemon(self.cache, policy, epoch_s=epoch_s, ident="key")
        except BaseException:
            self.cache.close()
            raise
        self.view: PoolView = self.daemon.view
        self.board = LiveBoard(self.view, self.cache.pool.capacity, self.daemon.policy_lock)
        self.stats = StoreStats(hits_by_tier=dict.fromkeys(self.names, 0),
                                stored_by_tier=dict.fromkeys(self.names, 0))
        self.lock = threading.RLock()  # the scheduler's lookups and the worker's loads and saves
        self._next_seq = 0
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

    # -- the worker's loads and saves ------------------------------------------------------------------------

    def load(self, keys: Sequence[int], request: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V of every layer ([blocks * block_tokens, kv_heads, head_dim] each) of these resident blocks, read
        through the cache's read path (an emulated tier's delay is paid here); hits counted per tier."""
        if not keys:
            return []
        with self.lock:
            t0 = time.perf_counter()
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
            self.stats.loaded_blocks += len(keys)
            self.stats.load_s += time.perf_counter() - t0
            served = [(k, self.view.tier_of(k)) for k in keys]
            if self.policy.family == "demand":
                self._promote(served)
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
                try:
                    for layer in range(self.layout.layers):
                        cache.write(seq, layer, 0, block[layer, 0], block[layer, 1])
                finally:
                    cache.free_sequence(seq)
                landed = cache.pool.by_key(key)
                if landed is None or landed.tier != tier:
                    raise KVError(f"connector: block {key} was admitted to tier {tier!r} but landed in "
                                  f"{None if landed is None else landed.tier!r}")
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

    def _observe(self, events: list[AccessEvent]) -> None:
        with self.daemon.policy_lock:
            self.policy.observe(events)

    def _seq(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    def _now(self) -> float:
        return time.monotonic() - self._t0
