"""Goal-driven hot/cold migration in the style of DAMOS auto-tuning (DAMON's migrate_hot / migrate_cold).

A tiering daemon (family "daemon"): accesses are served where the block lives; blocks move only in the epoch plans,
and each move costs its bytes over the tier pair's bandwidth within the run's migration budget.

The goal is a target utilisation of each limited tier. Every epoch, within a quota of blocks: a tier above its
target sheds its coldest blocks one tier down; a tier below its target pulls up the hottest of the tier beneath;
a tier at its target exchanges its coldest for the hottest beneath while those are clearly hotter (a hysteresis
keeps blocks from bouncing). New blocks fill a tier only up to its target, so allocation finds headroom.

Hotness is an access count that halves every `half_life_s` seconds (the migration daemon hands it an epoch's
accesses counted per block: AccessCounts, one update per block). Because the decay is the same for every
block, it never reorders blocks that were not touched; the score is kept as log2 of the count expressed at time 0
(each access at time t adds 2^(t / half_life)), so it changes only on access and the ranking stays in heaps.
"""

from __future__ import annotations

import itertools
import math
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
    TierState,
    first_unpinned,
)

NEVER_ACCESSED = -math.inf


def log2_add(a: float, b: float) -> float:
    """log2(2^a + 2^b) without overflow."""
    high, low = (a, b) if a >= b else (b, a)
    if low == NEVER_ACCESSED:
        return high
    return high + math.log2(1.0 + 2.0 ** (low - high))


class HotCold(Policy):
    """Tiering daemon: keeps each limited tier at a target utilisation with its hottest blocks."""

    name = "hotcold"

    def __init__(self, context: PolicyContext | None = None, *, target_util: float = 0.9, quota: int = 8,
                 half_life_s: float = 10.0, hysteresis: float = 1.0) -> None:
        super().__init__(context)
        if not 0 < target_util <= 1:
            raise PolicyError(f"policy hotcold: target_util={target_util} must be in (0, 1] (share of each limited "
                              "tier to keep filled)")
        if quota < 1:
            raise PolicyError(f"policy hotcold: quota={quota} must be 1 or more (blocks migrated per epoch)")
        if half_life_s <= 0:
            raise PolicyError(f"policy hotcold: half_life_s={half_life_s} must be positive (seconds)")
        if hysteresis < 0:
            raise PolicyError(f"policy hotcold: hysteresis={hysteresis} must be 0 or more (log2 of how much "
                              "hotter a block must be to swap places)")
        self.target_util = target_util
        self.quota = quota
        self.half_life_s = half_life_s
        self.hysteresis = hysteresis
        self.ranked = RankedBlocks(track_highest=True)
        self._order: tuple[str, ...] = ()
        # Rankings change only through accesses, admissions and victims; with none since an empty plan, the
        # next plan would be empty too (most epochs of a sparse trace).
        self._changed = True

    def admit(self, block: int, view: BlockView) -> str:
        self._changed = True
        tiers = view.tiers
        self._order = self._order or tuple(t.name for t in tiers)
        tier = next((t.name for t in tiers if t.used_blocks + 1 <= self._target(t)), None)
        if tier is None:
            tier = next((t.name for t in tiers if t.has_room), tiers[0].name)
        self.ranked.set(block, tier, NEVER_ACCESSED)
        return tier

    def observe(self, events: Sequence[AccessEvent]) -> None:
        self._changed = self._changed or bool(events)
        for event in events:
            block = event.block
            tier = event.tier if event.tier is not None else self.ranked.tier(block)
            if tier is None:
                continue
            old = self.ranked.score(block)
            heat = event.time / self.half_life_s
            self.ranked.set(block, tier, heat if old is None else log2_add(old, heat))

    def observe_counts(self, counts: AccessCounts) -> None:
        """The batched form of observe: k accesses at time t add k * 2^(t / half_life), so each block's score
        takes one log2_add of t / half_life + log2(k) (the per-event sum, equal within float rounding), set in
        the order of the blocks' last accesses (the order per-event updates leave the tie-breaks in)."""
        if not len(counts):
            return
        self._changed = True
        blocks = counts.block.tolist()
        added = counts.time / self.half_life_s + np.log2(counts.count)
        # log2(2^old + 2^added) in numpy (a block never ranked, or never accessed, is -inf: it gets `added`)
        old = np.array(self.ranked.scores(blocks, NEVER_ACCESSED), dtype=np.float64)
        new = np.logaddexp2(old, added)
        tiers = counts.by_tier()
        if len(tiers) == 1:  # every row in one tier (a decode's epoch, often): no gather
            self.ranked.set_many(tiers[0][0], blocks, new.tolist())
            return
        for tier, rows in tiers:
            self.ranked.set_many(tier, counts.block[rows].tolist(), new[rows].tolist())

    def victim(self, tier: str, view: BlockView) -> int:
        self._changed = True
        block = self.ranked.lowest(tier, view)
        if block is None:
            block = first_unpinned(view, tier)
        self.ranked.pushed_down(block, tier, self._order or tuple(t.name for t in view.tiers))
        return block

    def moved(self, block: int, source: str, target: str | None) -> None:
        self._changed = True
        self.ranked.follow(block, target)

    def plan(self, view: BlockView, now: float) -> Plan:
        if not self._changed:
            return Plan()
        tiers = view.tiers
        budget = self.quota
        moves: list[Move] = []
        planned: set[int] = set()
        skip = planned.__contains__

        def move(block: int, source: str, target: str, reason: str) -> None:
            nonlocal budget
            moves.append(Move(block, source, target, reason))
            planned.add(block)
            budget -= 1

        for upper, lower in itertools.pairwise(tiers):
            used, target = upper.used_blocks, self._target(upper)
            with self.ranked.walk(upper.name, view) as coldest, \
                    self.ranked.walk(lower.name, view, highest=True) as hottest:
                while budget and used > target and (cold := coldest.next_block(skip)) is not None:
                    move(cold, upper.name, lower.name, "demote")
                    used -= 1
                while budget and used < target and (hot := hottest.next_block(skip)) is not None:
                    move(hot, lower.name, upper.name, "promote")
                    used += 1
                while budget >= 2:
                    hot, cold = hottest.next_block(skip), coldest.next_block(skip)
                    if hot is None or cold is None or self._heat(hot) <= self._heat(cold) + self.hysteresis:
                        break
                    # Demote first: the slot it frees above is what the promotion lands in.
                    move(cold, upper.name, lower.name, "demote")
                    move(hot, lower.name, upper.name, "promote")
        self._changed = bool(moves)  # moves that could not be carried out are tried again
        return Plan(moves)

    def _target(self, tier: TierState) -> float:
        if tier.capacity_blocks is None:
            return math.inf
        return math.floor(self.target_util * tier.capacity_blocks)

    def _heat(self, block: int) -> float:
        score = self.ranked.score(block)
        return NEVER_ACCESSED if score is None else score
