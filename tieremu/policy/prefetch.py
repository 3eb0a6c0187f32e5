"""Scheduler-aware look-ahead on top of `lru-epoch`, as CachedAttention does with its job queue.

A tiering daemon (family "daemon"): accesses are served where the block lives, and moves happen at epochs. The
scheduler says which requests run next. Each epoch their blocks that sit in slower tiers are prefetched into
the fastest tier (within a quota, earliest request first), and while they wait their blocks are the last choice
as victims. Hits in slower tiers are still promoted at epochs, as in
`lru-epoch`. Every prefetch is a move that costs bandwidth and migration budget; it is not a bound.
"""

from __future__ import annotations

from collections.abc import Sequence

from tieremu.errors import PolicyError
from tieremu.policy.base import (
    AccessCounts,
    AccessEvent,
    BlockView,
    Move,
    Plan,
    PolicyContext,
    UpcomingRequest,
    first_unpinned,
)
from tieremu.policy.recency import LRUEpoch


class Lookahead(LRUEpoch):
    """Tiering daemon: prefetches the blocks of the next requests at epochs, over lru-epoch."""

    name = "lookahead"

    def __init__(self, context: PolicyContext | None = None, *, window: int = 4, prefetch_quota: int = 16,
                 promote_quota: int = 4) -> None:
        super().__init__(context, promote_quota=promote_quota)
        if window < 1:
            raise PolicyError(f"policy lookahead: window={window} must be 1 or more (requests looked ahead)")
        if prefetch_quota < 0:
            raise PolicyError(f"policy lookahead: prefetch_quota={prefetch_quota} must be 0 or more (blocks per "
                              "epoch)")
        self.window = window
        self.prefetch_quota = prefetch_quota
        self._queue: Sequence[UpcomingRequest] = ()
        self._wanted: set[int] = set()
        self._served = -1

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:
        self._queue = requests[: self.window]
        self._wanted = {block for request in self._queue for block in request.blocks}

    def observe(self, events: Sequence[AccessEvent]) -> None:
        super().observe(events)
        if events:
            self._served = max(self._served, max(e.request for e in events))

    def observe_counts(self, counts: AccessCounts) -> None:
        super().observe_counts(counts)
        if counts.accesses:
            self._served = max(self._served, int(counts.access_request.max()))

    def choose_victim(self, tier: str, view: BlockView) -> int:
        wanted = self._wanted
        block = self.ranked.lowest(tier, view, skip=wanted.__contains__)
        if block is None:  # everything left is wanted soon: fall back to plain LRU
            block = self.ranked.lowest(tier, view)
        return first_unpinned(view, tier) if block is None else block

    def plan(self, view: BlockView, now: float) -> Plan:
        fastest = self.tier_names(view)[0]
        planned: set[int] = set()
        moves: list[Move] = []
        for request in self._queue:
            if request.request <= self._served:
                continue
            for block in request.blocks:
                if len(moves) >= self.prefetch_quota:
                    break
                source = view.tier_of(block)
                if source is None or source == fastest or block in planned:
                    continue
                moves.append(Move(block, source, fastest, "prefetch"))
                planned.add(block)
        return Plan(moves + self.promotions(view, planned))
