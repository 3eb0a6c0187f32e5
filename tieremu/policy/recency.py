"""Recency and frequency rankings: the demand caches `lru` and `lfu`, and the tiering daemon `lru-epoch`.

`lru` and `lfu` are demand caches (family "demand", see base.FAMILIES), as vLLM, LMCache and SGLang HiCache run
them: a miss is placed in the fastest tier, a hit in a slower tier is served there and promoted at once, and a full
tier pushes its least recently (or least frequently) used block one tier down, out of the last. On a two-tier map
with an unlimited slow tier, the fast tier of `lru` is textbook LRU of its capacity.

`lru-epoch` is a tiering daemon (family "daemon"): a new block goes to the fastest tier with room (or the fastest,
pushing its victim down the chain); a hit in a slower tier is served there and promoted back to the fastest only at
the next epoch, within a per-epoch quota, the rest forgotten. It is what a kernel-style promotion daemon does, and it
is not LRU.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from tieremu.errors import PolicyError
from tieremu.policy.base import (
    AccessCounts,
    AccessEvent,
    BlockView,
    Move,
    Plan,
    Policy,
    PolicyContext,
    RankedBlocks,
    first_unpinned,
)


class Ranked(Policy):
    """Blocks ranked per tier by a score the subclass defines; the lowest is pushed down first."""

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        self.ranked = RankedBlocks()
        self._order: tuple[str, ...] = ()

    def tier_names(self, view: BlockView) -> tuple[str, ...]:
        if not self._order:
            self._order = tuple(t.name for t in view.tiers)
        return self._order

    def observe(self, events: Sequence[AccessEvent]) -> None:
        for event in events:
            block = event.block
            # Where the driver left it (it may have promoted the block since it was served), else where it was hit.
            tier = self.ranked.tier(block) or event.tier
            if tier is None:
                continue  # created and already pushed out of the last tier
            self.ranked.set(block, tier, self.touched_score(block))

    def observe_counts(self, counts: AccessCounts) -> None:
        """The batched form of observe, when the scores allow it (touched_scores); else the events one by one.
        Blocks are set in the order of their last accesses, with the tier they were first seen in when the
        ranking did not know them (what a walk over the events gives)."""
        scores = self.touched_scores(counts)
        if scores is None:
            Ranked.observe(self, counts.events)
            return
        names, ranked = counts.tiers, self.ranked
        known = ranked.tier
        groups: dict[str, tuple[list[int], list[float]]] = {}
        for block, first, score in zip(counts.block.tolist(), counts.first_tier.tolist(), scores, strict=True):
            tier = known(block) or names[first]
            group = groups.get(tier) or groups.setdefault(tier, ([], []))
            group[0].append(block)
            group[1].append(score)
        for tier, (blocks, tier_scores) in groups.items():
            ranked.set_many(tier, blocks, tier_scores)

    def touched_scores(self, counts: AccessCounts) -> list[float] | None:
        """Per row of `counts`: the score after its accesses, as touched_score once per access would leave it;
        None when the scores cannot be had in a batch (observe_counts then walks the events)."""
        return None

    def victim(self, tier: str, view: BlockView) -> int:
        block = self.choose_victim(tier, view)
        self.ranked.pushed_down(block, tier, self.tier_names(view))
        return block

    def choose_victim(self, tier: str, view: BlockView) -> int:
        block = self.ranked.lowest(tier, view)
        return first_unpinned(view, tier) if block is None else block

    def moved(self, block: int, source: str, target: str | None) -> None:
        self.ranked.follow(block, target)

    @abstractmethod
    def admitted_score(self, block: int) -> float:
        """Score of a block just placed (a miss, or a promotion on access); its access is observed afterwards."""

    @abstractmethod
    def touched_score(self, block: int) -> float:
        """Score of a block just accessed."""


class DemandCache(Ranked):
    """A demand cache: every referenced block is brought into the fastest tier at once."""

    family = "demand"

    def admit(self, block: int, view: BlockView) -> str:
        tier = self.tier_names(view)[0]
        self.ranked.set(block, tier, self.admitted_score(block))
        return tier


class Recency:
    """Scores that order blocks by their last access (a mixin: the clock ticks on every placement and access)."""

    _clock = 0

    def admitted_score(self, block: int) -> float:
        return self.touched_score(block)

    def touched_score(self, block: int) -> float:
        self._clock += 1
        return self._clock

    def touched_scores(self, counts: AccessCounts) -> list[float] | None:
        """The clock ticks once per access: a block's score is the clock at its last access."""
        if type(self).touched_score is not Recency.touched_score:
            return None  # a subclass scores accesses its own way
        clock = self._clock
        self._clock = clock + counts.accesses
        return (counts.last + (clock + 1)).astype(np.float64).tolist()


class LRU(Recency, DemandCache):
    """Demand cache, least recently used pushed down first (textbook LRU per tier)."""

    name = "lru"


class LFU(DemandCache):
    """Demand cache, least frequently used pushed down first; among equals, the one counted longest ago. Counts
    live as long as the block is in some tier."""

    name = "lfu"

    def admitted_score(self, block: int) -> float:
        return self.ranked.score(block) or 0.0

    def touched_score(self, block: int) -> float:
        return (self.ranked.score(block) or 0.0) + 1.0

    def touched_scores(self, counts: AccessCounts) -> list[float] | None:
        if type(self).touched_score is not LFU.touched_score:
            return None
        score = self.ranked.score
        return [(score(b) or 0.0) + k for b, k in zip(counts.block.tolist(), counts.count.tolist(), strict=True)]


class DemotionChain(Ranked):
    """Tiering-daemon mechanics: new blocks fill the fastest tier with room, slow hits are promoted at epochs."""

    def __init__(self, context: PolicyContext | None = None, *, promote_quota: int = 4) -> None:
        super().__init__(context)
        if promote_quota < 0:
            raise PolicyError(f"policy {self.name}: promote_quota={promote_quota} must be 0 or more (blocks per "
                              "epoch; 0 turns promotion off)")
        self.promote_quota = promote_quota
        self._slow_hits: dict[int, None] = {}  # insertion-ordered: the latest hit last

    def admit(self, block: int, view: BlockView) -> str:
        tiers = view.tiers
        tier = next((t.name for t in tiers if t.has_room), tiers[0].name)
        self.tier_names(view)
        self.ranked.set(block, tier, self.admitted_score(block))
        return tier

    def observe(self, events: Sequence[AccessEvent]) -> None:
        super().observe(events)
        fastest = self._order[0] if self._order else None
        for event in events:
            if event.tier is not None and event.tier != fastest:
                self._slow_hits.pop(event.block, None)
                self._slow_hits[event.block] = None

    def observe_counts(self, counts: AccessCounts) -> None:
        Ranked.observe_counts(self, counts)
        if not counts.accesses:
            return
        # Slow hits in the order of each block's last access in a slower tier, as observe's re-insertions leave them.
        fastest = counts.tiers.index(self._order[0]) if self._order else -1
        slow = np.flatnonzero(counts.access_tier != fastest)
        if not len(slow):
            return
        rows = counts.row[slow]
        last = np.full(len(counts), -1, dtype=np.int64)
        np.maximum.at(last, rows, slow)  # each row's last slow access
        hit = np.flatnonzero(last >= 0)
        hits = self._slow_hits
        for block in counts.block[hit[np.argsort(last[hit])]].tolist():
            hits.pop(block, None)
            hits[block] = None

    def plan(self, view: BlockView, now: float) -> Plan:
        return Plan(self.promotions(view, set()))

    def promotions(self, view: BlockView, planned: set[int]) -> list[Move]:
        """Blocks hit in slower tiers since the last epoch, latest first, up to the quota, back to the fastest.
        The driver reports each move it carries out (`moved`), which re-files the block under its new tier."""
        if not self._slow_hits:
            return []
        fastest = self.tier_names(view)[0]
        moves = []
        for block in reversed(self._slow_hits):
            if len(moves) >= self.promote_quota:
                break
            source = view.tier_of(block)
            if source is None or source == fastest or block in planned:
                continue
            moves.append(Move(block, source, fastest, "promote"))
            planned.add(block)
        self._slow_hits.clear()
        return moves


class LRUEpoch(Recency, DemotionChain):
    """Tiering daemon: least recently used pushed down first; slow hits promoted at epochs within
    `promote_quota` (the LRU of kernel-style tiering, not textbook LRU)."""

    name = "lru-epoch"
