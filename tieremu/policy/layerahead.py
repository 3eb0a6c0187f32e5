"""Layer-ahead prefetch for the per-layer KV layout, on top of `lru-epoch` (a tiering daemon, family "daemon").

Decode reads the layers in a cycle: 0, 1, ..., L-1, then 0 again at the next step. When the model starts layer l
(the driver calls `layer_started(l)`: the migration daemon hooks the cache's `on_layer_start`), the blocks of
layer l+1 of the running sequences that sit in slower tiers are promoted, within a quota, into the fastest tier
that has room or holds a block needed later than they are, so they are close when l+1 reads them; after the last
layer, layer 0 of the next step is next.

Which blocks hold which layer of which sequence is learned from access events (per-layer blocks carry their
layer); a sequence not seen for `idle_s` seconds is taken to have finished. A victim is the block whose next read
is furthest away in the cycle: the layer just read (l-1) first, then l-2, and so on; layers l and l+1 only if
nothing else is left. Blocks of no known layer go first of all. Hits in slower tiers are promoted as in lru-epoch when
`promote_quota` > 0 (off by default: the layer cycle, not recency, says what is needed next).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tieremu.errors import PolicyError
from tieremu.policy.base import AccessCounts, AccessEvent, BlockView, Move, Plan, PolicyContext
from tieremu.policy.recency import LRUEpoch


class LayerAhead(LRUEpoch):
    """Tiering daemon: prefetches the next layer's blocks as the model starts each layer."""

    name = "layerahead"

    def __init__(self, context: PolicyContext | None = None, *, quota: int = 64, idle_s: float = 1.0,
                 promote_quota: int = 0) -> None:
        super().__init__(context, promote_quota=promote_quota)
        if quota < 1:
            raise PolicyError(f"policy layerahead: quota={quota} must be 1 or more (blocks prefetched per layer)")
        if not idle_s > 0:
            raise PolicyError(f"policy layerahead: idle_s={idle_s} must be positive (seconds after which a "
                              "sequence not read is taken to have finished)")
        self.quota = quota
        self.idle_s = idle_s
        self._current: int | None = None  # the layer the model started last
        self._layers = 0  # layers seen so far
        self._tables: dict[tuple[int, int], tuple[float, list[int]]] = {}  # (sequence, layer) -> (seen, blocks)
        self._layer_of: dict[int, int] = {}

    def layer_started(self, layer: int) -> None:
        """The model starts `layer` (called from the model's thread: only notes it)."""
        self._current = layer

    def observe(self, events: Sequence[AccessEvent]) -> None:
        super().observe(events)
        reads: dict[tuple[int, int], dict[int, None]] = {}
        seen: dict[tuple[int, int], float] = {}
        for event in events:
            if event.layer is None:
                continue  # all-layers blocks: nothing to do layer by layer
            key = (event.request, event.layer)
            reads.setdefault(key, {})[event.block] = None
            seen[key] = event.time
            self._layer_of[event.block] = event.layer
        for key, blocks in reads.items():
            self._tables[key] = (seen[key], list(blocks))  # a read returns the whole table: the latest is current
            self._layers = max(self._layers, key[1] + 1)

    def observe_counts(self, counts: AccessCounts) -> None:
        """The batched form of observe: each (sequence, layer)'s blocks in the order first read, found with
        numpy; Python only per distinct (sequence, layer, block)."""
        super().observe_counts(counts)
        if counts.layer is None or not counts.accesses:
            return
        layer = counts.layer[counts.row]
        # The first access of each (sequence, layer, row), in access order: one sort of a combined key.
        request, row = counts.access_request, counts.row
        key = np.stack([request - request.min(), layer.astype(np.int64), row])
        _, first = np.unique(key, axis=1, return_index=True)
        first.sort()
        reads: dict[tuple[int, int], dict[int, None]] = {}
        blocks = counts.block[row[first]].tolist()
        for seq, lay, block in zip(request[first].tolist(), layer[first].tolist(), blocks, strict=True):
            reads.setdefault((seq, lay), {})[block] = None
        self._layer_of.update(zip(counts.block.tolist(), counts.layer.tolist(), strict=True))
        now = counts.time
        for key_, found in reads.items():
            self._tables[key_] = (now, list(found))
            self._layers = max(self._layers, key_[1] + 1)

    def plan(self, view: BlockView, now: float) -> Plan:
        moves = super().plan(view, now).moves
        if self._current is None or not self._layers:
            return Plan(moves)
        self._forget_finished(view, now)
        current, ahead = self._current % self._layers, (self._current + 1) % self._layers
        tiers = view.tiers
        rank = {t.name: t.rank for t in tiers}
        slots: dict[int, float] = {}  # per tier rank, counted when first needed

        def has_slot(i: int) -> bool:
            """Free slots, plus blocks not needed before the ones coming in."""
            if i not in slots:
                t = tiers[i]
                slots[i] = math.inf if t.capacity_blocks is None else \
                    t.capacity_blocks - t.used_blocks + self._expendable(view, t.name, current, ahead)
            return slots[i] > 0

        planned = {m.block for m in moves}
        count = 0
        for (_, layer), (_, blocks) in list(self._tables.items()):
            if layer != ahead:
                continue
            for block in blocks:
                if count >= self.quota:
                    return Plan(moves)
                source = view.tier_of(block)
                if source is None or block in planned or view.pinned(block):
                    continue
                target = next((i for i in range(rank[source]) if has_slot(i)), None)
                if target is None:
                    continue
                slots[target] -= 1
                moves.append(Move(block, source, tiers[target].name, "prefetch"))
                planned.add(block)
                count += 1
        return Plan(moves)

    def choose_victim(self, tier: str, view: BlockView) -> int:
        if self._current is None or not self._layers:
            return super().choose_victim(tier, view)
        layers, current = self._layers, self._current % self._layers
        best, best_distance = None, -1
        for block in view.blocks_in(tier):
            if view.pinned(block):
                continue
            layer = self._layer_of.get(block)
            # How many layer starts until this block is read again: l is being read, l+1 next, l-1 last.
            distance = layers if layer is None else (layer - current) % layers
            if distance > best_distance:
                best, best_distance = block, distance
                if distance == layers:
                    break
        return super().choose_victim(tier, view) if best is None else best

    def _expendable(self, view: BlockView, tier: str, current: int, ahead: int) -> int:
        """Blocks of a tier that may make way: unpinned and of a layer other than the current and the next."""
        return sum(1 for b in view.blocks_in(tier)
                   if self._layer_of.get(b) not in (current, ahead) and not view.pinned(b))

    def _forget_finished(self, view: BlockView, now: float) -> None:
        stale = [key for key, (seen, _) in self._tables.items() if now - seen > self.idle_s]
        for key in stale:
            for block in self._tables.pop(key)[1]:
                if view.tier_of(block) is None:
                    self._layer_of.pop(block, None)
