"""What a policy sees of a live TieredKVCache: tier occupancy and where each block is (a BlockView).

Blocks are named by `Block.id` (ident "id", the default) or by their prefix key (ident "key": trace hash ids, for
trace replay; all-layers layout only, since per-layer blocks share a key; blocks without a key, a sequence's
private tail, are not shown, though they count in each tier's occupancy).

Reads take no lock. They are single dictionary or attribute reads, or a snapshot list taken without releasing
the GIL, so they are safe beside the workload's thread; a policy may still see a block that is freed a moment
later, which is why the executor checks every decision again under the cache's lock.

While the executor makes room for a block, it stages it: the block is shown in its target tier, pinned, and the
victims it pushes down are shown where they are headed, before anything is moved. So a policy is never asked for
a victim while the newcomer is in no tier, and never picks the newcomer itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tieremu.errors import ConfigError
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.pool import Block
from tieremu.policy.base import TierState
from tieremu.policy.staging import Staging

IDENTS = ("id", "key")


class PoolView:
    """A BlockView over a TieredKVCache (see tieremu.policy.base.BlockView)."""

    def __init__(self, cache: TieredKVCache, *, ident: str = "id") -> None:
        if ident not in IDENTS:
            raise ConfigError(f"PoolView ident={ident!r} is not understood; valid: {', '.join(IDENTS)} "
                              "(id: Block.id; key: the block's prefix hash)")
        if ident == "key" and cache.layout.per_layer:
            raise ConfigError("PoolView ident='key' needs the all-layers layout: in the per-layer layout every "
                              "layer's block shares the prefix key; use ident='id'")
        self.cache = cache
        self.pool = cache.pool
        self.ident = ident
        self.rank = {name: i for i, name in enumerate(self.pool.order)}
        self._pins: set[int] = set()
        self._staging = Staging()  # the executor's trial: blocks shown where they are headed

    # -- BlockView -----------------------------------------------------------------------------------------------

    @property
    def tiers(self) -> list[TierState]:
        pool = self.pool
        return [TierState(name, i, pool.capacity[name], self.used(name)) for i, name in enumerate(pool.order)]

    def tier_of(self, block: int) -> str | None:
        return self._staging.tier_of(block, self._real_tier)

    def blocks_in(self, tier: str) -> Iterable[int]:
        if self.ident == "id":
            real = [b.id for b in self.pool.on(tier)]
        else:
            by_key = self.pool.by_key
            real = [b.key for b in self.pool.on(tier) if b.key is not None and by_key(b.key) is b]
        return self._staging.blocks_in(tier, real)

    def pinned(self, block: int) -> bool:
        return block in self._pins or block in self._staging.pins

    # -- beyond the protocol -------------------------------------------------------------------------------------

    def block(self, ident: int) -> Block | None:
        """The cache's block named ident, or None if there is none (freed, evicted, or never existed)."""
        if self.ident == "id":
            return self.pool.blocks.get(ident)
        return self.pool.by_key(ident)

    def ident_of(self, block: Block) -> int | None:
        """How policies name this block (None: not shown, a keyless block under ident 'key')."""
        return block.id if self.ident == "id" else block.key

    def pin(self, blocks: Iterable[int]) -> None:
        """Pin blocks (e.g. those of the request being served): never victims, and moves of them are skipped."""
        self._pins.update(blocks)

    def unpin(self, blocks: Iterable[int] | None = None) -> None:
        """Unpin the given blocks, or every pinned block."""
        if blocks is None:
            self._pins.clear()
        else:
            self._pins.difference_update(blocks)

    def pinned_in(self, tier: str) -> int:
        """Pinned blocks shown in a tier (pins are few: this walks them, not the tier)."""
        return sum(1 for b in self._pins | self._staging.pins if self.tier_of(b) == tier)

    def used(self, tier: str) -> int:
        """Blocks shown in a tier, staging included."""
        return self.pool.used(tier) + self._staging.change(tier)

    # -- staging (the executor's, while it decides how to make room) --------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[None]:
        """A scope in which stage() shows blocks where they are headed; everything is shown as it is after."""
        try:
            yield
        finally:
            self._staging.clear()

    def stage(self, ident: int, tier: str | None, *, pinned: bool = False) -> None:
        """Show block ident in tier (None: in no tier) from now until the staging scope ends."""
        self._staging.stage(ident, self.tier_of(ident), tier, pinned=pinned)

    def _real_tier(self, ident: int) -> str | None:
        found = self.block(ident)
        return None if found is None else found.tier
