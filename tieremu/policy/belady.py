"""Belady's offline optimum (MIN), the bound every eviction policy is compared against.

It knows the whole future reference stream (trace replay only). The block pushed out of a full tier is the one
whose next use is farthest away; a new block whose next use is farther than everything in a full tier goes
straight to the tier below (MIN with bypass); and each epoch, the tiers are re-sorted so the blocks used soonest
sit highest, which is what any prefetching policy could hope to achieve with perfect foresight. Time is counted
in requests: all blocks of one request are used "at once", as they are pinned together while it is served.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

from tieremu.errors import PolicyError
from tieremu.policy.base import (
    AccessEvent,
    BlockView,
    Move,
    Plan,
    Policy,
    PolicyContext,
    RankedBlocks,
    UpcomingRequest,
    first_unpinned,
)

NEVER = math.inf


class Belady(Policy):
    name = "belady"

    def __init__(self, context: PolicyContext | None = None, *, quota: int = 0) -> None:
        super().__init__(context)
        if self.context.future is None:
            raise PolicyError("policy belady is offline: it needs the future reference stream, which only trace "
                              "replay gives (PolicyContext.future); use an online policy elsewhere")
        if quota < 0:
            raise PolicyError(f"policy belady: quota={quota} must be 0 or more (blocks moved per epoch; "
                              "0 = unlimited)")
        self.quota = quota
        self._uses: dict[int, list[int]] = {}
        for index, blocks in enumerate(self.context.future):
            for block in blocks:
                uses = self._uses.setdefault(block, [])
                if not uses or uses[-1] != index:
                    uses.append(index)
        self._now = -1  # the request being served (or the last one)
        self.ranked = RankedBlocks(track_highest=True)  # score = next use (request index)
        self._admitted: dict[int, str] = {}
        self._order: tuple[str, ...] = ()
        # Rankings change only through accesses, admissions and victims; with none since an empty plan, the
        # next plan would be empty too (most epochs of a sparse trace).
        self._changed = True

    def next_use(self, block: int, after: int) -> float:
        uses = self._uses.get(block)
        if not uses:
            return NEVER
        i = bisect.bisect_right(uses, after)
        return uses[i] if i < len(uses) else NEVER

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:
        if requests:
            self._now = max(self._now, requests[0].request)

    def admit(self, block: int, view: BlockView) -> str:
        self._changed = True
        tiers = view.tiers
        self._order = self._order or tuple(t.name for t in tiers)
        use = self.next_use(block, self._now)
        chosen = tiers[-1].name  # never used again, or needed later than everything resident: bypass
        for tier in tiers if use != NEVER else ():
            if tier.has_room:
                chosen = tier.name
                break
            farthest = self.ranked.highest(tier.name, view)
            if farthest is None or use < self._score(farthest):
                chosen = tier.name
                break
        # Ranked once its request is over (observe): until then it is pinned, and ranking it would only make
        # every victim search of this request step over it.
        self._admitted[block] = chosen
        return chosen

    def observe(self, events: Sequence[AccessEvent]) -> None:
        self._changed = self._changed or bool(events)
        for event in events:
            self._now = max(self._now, event.request)
            tier = event.tier
            if tier is None:
                tier = self._admitted.pop(event.block, None) or self.ranked.tier(event.block)
            if tier is not None:
                self.ranked.set(event.block, tier, self.next_use(event.block, event.request))
        self._admitted.clear()

    def victim(self, tier: str, view: BlockView) -> int:
        self._changed = True
        block = self.ranked.highest(tier, view)
        if block is None:
            block = first_unpinned(view, tier)
        self.ranked.pushed_down(block, tier, self._order or tuple(t.name for t in view.tiers))
        return block

    def plan(self, view: BlockView, now: float) -> Plan:
        if not self._changed:
            return Plan()
        tiers = view.tiers
        budget = self.quota or math.inf
        moves: list[Move] = []
        planned: set[int] = set()
        skip = planned.__contains__
        for upper, lower in itertools.pairwise(tiers):
            free = math.inf if upper.capacity_blocks is None else upper.capacity_blocks - upper.used_blocks
            with self.ranked.walk(lower.name, view) as soonest, \
                    self.ranked.walk(upper.name, view, highest=True) as farthest:
                while budget >= 1:
                    soon = soonest.next_block(skip)
                    if soon is None or self._score(soon) == NEVER:
                        break
                    if free > 0:
                        free -= 1
                    else:
                        far = farthest.next_block(skip)
                        if far is None or self._score(soon) >= self._score(far) or budget < 2:
                            break
                        moves.append(Move(far, upper.name, lower.name, "demote"))
                        planned.add(far)
                        budget -= 1
                    moves.append(Move(soon, lower.name, upper.name, "promote"))
                    planned.add(soon)
                    budget -= 1
        self._changed = bool(moves)  # moves that could not be carried out are tried again
        return Plan(moves)

    def _score(self, block: int) -> float:
        score = self.ranked.score(block)
        return NEVER if score is None else score
