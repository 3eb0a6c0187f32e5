"""Static placements: a block's tier is chosen once, at allocation, and no plan ever moves it.

`all-fastest` and `all-slowest` are the bounds every experiment runs beside its policies (the L100 and L0 of the
CXL papers): they declare `lifts_capacity`, so the simulator lets the tier they fill hold everything.
`interleave` and `split` respect capacities and spill to the next tier with room.
"""

from __future__ import annotations

import math

from tieremu.errors import PolicyError
from tieremu.policy.base import BlockView, Policy, PolicyContext, TierState, first_unpinned


class StaticPolicy(Policy):
    """Never plans a move; when a tier is full anyway, the oldest unpinned block is the one pushed down."""

    family = "static"

    def victim(self, tier: str, view: BlockView) -> int:
        return first_unpinned(view, tier)


class AllFastest(StaticPolicy):
    name = "all-fastest"
    lifts_capacity = True

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name


class AllSlowest(StaticPolicy):
    name = "all-slowest"
    lifts_capacity = True

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[-1].name


class Interleave(StaticPolicy):
    """Round robin over the tiers, like a page interleave; a full tier's turn passes to the next with room."""

    name = "interleave"

    def __init__(self, context: PolicyContext | None = None) -> None:
        super().__init__(context)
        self._turn = 0

    def admit(self, block: int, view: BlockView) -> str:
        tiers = view.tiers
        for step in range(len(tiers)):
            tier = tiers[(self._turn + step) % len(tiers)]
            if tier.has_room:
                self._turn = (tier.rank + 1) % len(tiers)
                return tier.name
        tier = tiers[self._turn % len(tiers)]
        self._turn = (tier.rank + 1) % len(tiers)
        return tier.name


class Split(StaticPolicy):
    """A placement vector: fraction f[i] of new blocks goes to tier i (the tier furthest below its share wins)."""

    name = "split"

    def __init__(self, context: PolicyContext | None = None, *, fractions: tuple[float, ...] = ()) -> None:
        super().__init__(context)
        if not fractions:
            raise PolicyError("policy split: parameter fractions is required: one share per tier, fastest first, "
                              "summing to 1 (e.g. fractions=[0.25,0.75])")
        if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise PolicyError(f"policy split: fractions={list(fractions)} must be 0 or more and sum to 1 "
                              f"(they sum to {sum(fractions):g})")
        self.fractions = tuple(float(f) for f in fractions)
        self._placed: list[int] = [0] * len(fractions)

    def admit(self, block: int, view: BlockView) -> str:
        tiers = view.tiers
        if len(tiers) != len(self.fractions):
            raise PolicyError(f"policy split: fractions has {len(self.fractions)} entries but there are "
                              f"{len(tiers)} tiers ({', '.join(t.name for t in tiers)}): give one per tier")
        candidates = [t for t in tiers if t.has_room and self.fractions[t.rank] > 0] or list(tiers)
        tier = max(candidates, key=self._deficit)
        self._placed[tier.rank] += 1
        return tier.name

    def _deficit(self, tier: TierState) -> tuple[float, float, int]:
        total = sum(self._placed) + 1
        # Ties (e.g. the very first block) go to the larger share, then to the faster tier.
        share = self.fractions[tier.rank]
        return share * total - self._placed[tier.rank], share, -tier.rank
