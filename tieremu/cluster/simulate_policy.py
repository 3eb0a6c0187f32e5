"""Any tieremu placement policy as one simulated instance's KV cache, through simulate-mode replay's own state machine.

The cluster simulator's default cache is `TieredLRU` (demand LRU, fast). For every other policy (lfu, lru-epoch,
hotcold, lookahead, static placements, a user's `package.module:Class`), each instance gets its own policy object
and its own replay state from tieremu.workloads.simulate: admission where the policy says, victims pushed one tier
down, promotion on access for demand caches, the daemon's epochs and plans on the instance's clock, moves on its
migration channel. The holders index the routers read is kept in step with every placement and removal.

A request's hits per tier are the replay's own counts (each block where it was at its reference); its misses are
the blocks not resident when its prefill started (they differ only if the request's own admissions push one of its
later blocks out of the last tier first). Offline policies (belady) need the future of each instance's requests,
which routing decides as it goes: they are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tieremu.policy.base import Policy, UpcomingRequest
from tieremu.workloads.simulate import (
    DEFAULT_EPOCH_S,
    DEFAULT_PING_PONG_EPOCHS,
    Settings,
    _Replay,
    epochs_due,
    move_gbps,
)
from tieremu.workloads.trace import Request


def replay_settings(names: Sequence[str], capacity: Sequence[int | None], read_gbps: Sequence[float],
                    block_bytes: int, block_tokens: int, prefill_tokens_per_s: float, policy: Policy) -> Settings:
    """simulate's settings for one instance's tiers (moves at the lower of two tiers' read bandwidths, no budget)."""
    read = tuple(read_gbps)
    n = len(names)
    return Settings(names=tuple(names),
                    capacity=tuple(None if policy.lifts_capacity else c for c in capacity),
                    epoch_s=DEFAULT_EPOCH_S, block_bytes=block_bytes, read_gbps=read,
                    read_s=tuple(block_bytes / (g * 1e9) for g in read),
                    move_s=tuple(tuple(block_bytes / (move_gbps(read, i, j) * 1e9) for j in range(n))
                                 for i in range(n)),
                    prefill=prefill_tokens_per_s, block_tokens=block_tokens,
                    ping_pong_epochs=DEFAULT_PING_PONG_EPOCHS, pin=True, budget_gbps=None)


class PolicyCache(_Replay):
    """One instance's cache under `policy`; `where` (block -> tier rank) is what the routers read."""

    def __init__(self, settings: Settings, policy: Policy, owner: int, holders: dict[int, set[int]]) -> None:
        super().__init__(settings, policy)
        self.owner = owner
        self.holders = holders
        self.start: float | None = None

    def _place(self, block: int, i: int) -> None:
        super()._place(block, i)
        holders = self.holders.get(block)
        if holders is None:
            holders = self.holders[block] = set()
        holders.add(self.owner)

    def _remove(self, block: int) -> int:
        i = super()._remove(block)
        holders = self.holders[block]
        holders.discard(self.owner)
        if not holders:
            del self.holders[block]
        return i

    def serve(self, index: int, request: Request, now: float) -> tuple[list[int], list[int]]:
        """The request's prefill starts at `now`: epochs due run first, then its references; the positions of its
        misses and its hits per tier."""
        if self.start is None:
            self.start = self.channel_free = now
        self._epochs_until(self.start, epochs_due(self.start, self.s.epoch_s, now))
        self.now = now
        self.policy.upcoming([UpcomingRequest(index, now, request.hash_ids)])
        where = self.where
        missing = [p for p, b in enumerate(request.hash_ids) if b not in where]
        before = list(self.hits)
        self._serve(index, request)
        return missing, [h - b for h, b in zip(self.hits, before, strict=True)]


def usable(read_gbps: Sequence[float]) -> bool:
    return all(math.isfinite(g) and g > 0 for g in read_gbps)
