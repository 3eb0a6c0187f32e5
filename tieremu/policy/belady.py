"""Belady's MIN with bypass: the offline optimum of demand caching, the bound of every demand cache's fast tier.

A demand cache (family "demand", see base.FAMILIES) that knows the whole future reference stream (trace replay
only). Time is the position of a reference in the flattened stream of every request's hash ids. A referenced block
(a miss, or a hit in a slower tier) enters the fastest tier unless its next use is farther than that of every
(unpinned) block there, in which case it tries the next tier down the same way (a miss that no tier takes goes to
the last one; a slow hit that no faster tier takes stays where it is); a full tier pushes out the block whose next
use is farthest. No plan, no epoch moves: everything it moves happens on access, like any demand cache, and costs
the same. Over a two-tier map with an unlimited slow tier and without pinning its fast-tier hit ratio is MIN's.

It bounds demand caches only: a tiering daemon that moves blocks ahead of their use (prefetch) may exceed it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from tieremu.errors import PolicyError
from tieremu.policy.base import (
    AccessEvent,
    BlockView,
    Policy,
    PolicyContext,
    RankedBlocks,
    UpcomingRequest,
    first_unpinned,
)

NEVER = math.inf


class Belady(Policy):
    """Demand cache with perfect foresight (MIN with bypass): the upper bound of every demand cache."""

    name = "belady"
    family = "demand"

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        if self.context.future is None:
            raise PolicyError("policy belady is offline: it needs the future reference stream, which only trace "
                              "replay gives (PolicyContext.future); use an online policy elsewhere")
        self._uses: dict[int, list[int]] = {}
        self._starts: list[int] = []  # position of each request's first reference
        position = 0
        for blocks in self.context.future:
            self._starts.append(position)
            for block in blocks:
                self._uses.setdefault(block, []).append(position)
                position += 1
        self._position = 0  # of the reference being served
        self.ranked = RankedBlocks(track_highest=True)  # score = position of the next use
        self._order: tuple[str, ...] = ()

    def next_use(self, block: int, after: int) -> float:
        uses = self._uses.get(block)
        if not uses:
            return NEVER
        i = bisect.bisect_right(uses, after)
        return uses[i] if i < len(uses) else NEVER

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:
        # Re-synchronise with the driver: the next reference is the first of this request.
        if requests and requests[0].request < len(self._starts):
            self._position = self._starts[requests[0].request]

    def admit(self, block: int, view: BlockView) -> str:
        tiers = view.tiers
        self._order = self._order or tuple(t.name for t in tiers)
        use = self.next_use(block, self._position)
        current = view.tier_of(block)
        chosen = current or tiers[-1].name  # a slow hit no faster tier takes stays; a miss goes to the last tier
        for tier in tiers:
            if tier.name == current:
                break
            if tier.has_room:
                chosen = tier.name
                break
            farthest = self.ranked.highest(tier.name, view)
            if farthest is not None and use < self._score(farthest):
                chosen = tier.name
                break
        self.ranked.set(block, chosen, use)
        return chosen

    def observe(self, events: Sequence[AccessEvent]) -> None:
        for event in events:
            tier = self.ranked.tier(event.block) or event.tier
            if tier is not None:
                self.ranked.set(event.block, tier, self.next_use(event.block, self._position))
            self._position += 1

    def victim(self, tier: str, view: BlockView) -> int:
        block = self.ranked.highest(tier, view)
        if block is None:
            block = first_unpinned(view, tier)
        self.ranked.pushed_down(block, tier, self._order or tuple(t.name for t in view.tiers))
        return block

    def moved(self, block: int, source: str, target: str | None) -> None:
        self.ranked.follow(block, target)

    def _score(self, block: int) -> float:
        score = self.ranked.score(block)
        return NEVER if score is None else score
