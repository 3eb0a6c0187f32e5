"""Demotion chains down the tier order, ranked by recency (LRU) or by access count (LFU).

A new block goes to the fastest tier with room (or the fastest, pushing its victim down one tier, and so on down
the chain); a hit in a slower tier is promoted back to the fastest at the next epoch, within a per-epoch quota.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from tieremu.errors import PolicyError
from tieremu.policy.base import AccessEvent, BlockView, Move, Plan, Policy, PolicyContext, RankedBlocks, first_unpinned


class DemotionChain(Policy):
    """The chain mechanics; subclasses say how a block is scored (the lowest score is pushed out first)."""

    def __init__(self, context: PolicyContext | None = None, *, promote_quota: int = 4) -> None:
        super().__init__(context)
        if promote_quota < 0:
            raise PolicyError(f"policy {self.name}: promote_quota={promote_quota} must be 0 or more (blocks per "
                              "epoch; 0 turns promotion off)")
        self.promote_quota = promote_quota
        self.ranked = RankedBlocks()
        self._order: tuple[str, ...] = ()
        self._slow_hits: dict[int, None] = {}  # insertion-ordered: the latest hit last

    def tier_names(self, view: BlockView) -> tuple[str, ...]:
        if not self._order:
            self._order = tuple(t.name for t in view.tiers)
        return self._order

    def admit(self, block: int, view: BlockView) -> str:
        tiers = view.tiers
        tier = next((t.name for t in tiers if t.has_room), tiers[0].name)
        self.tier_names(view)
        self.ranked.set(block, tier, self.admitted_score(block))
        return tier

    def observe(self, events: Sequence[AccessEvent]) -> None:
        fastest = self._order[0] if self._order else None
        for event in events:
            block = event.block
            tier = event.tier if event.tier is not None else self.ranked.tier(block)
            if tier is None:
                continue  # created and already pushed out of the last tier
            self.ranked.set(block, tier, self.touched_score(block))
            if event.tier is not None and event.tier != fastest:
                self._slow_hits.pop(block, None)
                self._slow_hits[block] = None

    def victim(self, tier: str, view: BlockView) -> int:
        block = self.choose_victim(tier, view)
        self.ranked.pushed_down(block, tier, self.tier_names(view))
        return block

    def choose_victim(self, tier: str, view: BlockView) -> int:
        block = self.ranked.lowest(tier, view)
        return first_unpinned(view, tier) if block is None else block

    def plan(self, view: BlockView, now: float) -> Plan:
        return Plan(self.promotions(view, set()))

    def promotions(self, view: BlockView, planned: set[int]) -> list[Move]:
        """Blocks hit in slower tiers since the last epoch, latest first, up to the quota, back to the fastest."""
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

    @abstractmethod
    def admitted_score(self, block: int) -> float:
        """Score of a block just created (its miss is observed afterwards)."""

    @abstractmethod
    def touched_score(self, block: int) -> float:
        """Score of a block just accessed."""


class LRU(DemotionChain):
    """Least recently used goes down first."""

    name = "lru"

    def __init__(self, context: PolicyContext | None = None, *, promote_quota: int = 4) -> None:
        super().__init__(context, promote_quota=promote_quota)
        self._clock = 0

    def admitted_score(self, block: int) -> float:
        return self.touched_score(block)

    def touched_score(self, block: int) -> float:
        self._clock += 1
        return self._clock


class LFU(DemotionChain):
    """Least frequently used goes down first; among equals, the one counted longest ago."""

    name = "lfu"

    def admitted_score(self, block: int) -> float:
        return self.ranked.score(block) or 0.0

    def touched_score(self, block: int) -> float:
        return (self.ranked.score(block) or 0.0) + 1.0
