"""Demand caches against textbook references written here, over the flattened hash-id stream of the shared trace.

A two-tier map (fast tier of C blocks, slow tier unlimited): the fast tier of `lru` must be exactly an OrderedDict
LRU of C blocks, and that of `belady --no-pin` exactly Belady's MIN with bypass (a heap of next uses), for C a share
p of the trace's distinct blocks. The figures the issue quotes are checked too, so that a change in the trace or the
references cannot pass unnoticed.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

import pytest
from fixture_paths import MOONCAKE_TRACE

from tieremu.policy import get_policy
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, read_trace

SHARES = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50)
# Fast-tier hit ratios (%) of textbook LRU and MIN at those shares, as measured by independent simulators.
LRU_PERCENT = (3.43, 7.58, 15.48, 25.98, 39.05, 58.88)
MIN_PERCENT = (18.54, 26.13, 39.56, 50.63, 60.80, 63.96)


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


@pytest.fixture(scope="module")
def stream(requests: list[Request]) -> list[int]:
    return [block for request in requests for block in request.hash_ids]


def textbook_lru_hits(stream: list[int], capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for block in stream:
        if block in cache:
            hits += 1
            cache.move_to_end(block)
        else:
            cache[block] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def textbook_min_hits(stream: list[int], capacity: int) -> int:
    """Belady's MIN with bypass: a missed block is cached unless it is needed no sooner than every cached block,
    and then the cached block needed farthest ahead leaves."""
    following: list[float] = [math.inf] * len(stream)
    seen: dict[int, int] = {}
    for i in range(len(stream) - 1, -1, -1):
        following[i] = seen.get(stream[i], math.inf)
        seen[stream[i]] = i
    cached: dict[int, float] = {}  # block -> its next use
    farthest: list[tuple[float, int]] = []  # (-next use, block), stale entries skipped
    hits = 0
    for i, block in enumerate(stream):
        use = following[i]
        if block in cached:
            hits += 1
        elif len(cached) >= capacity:
            while -farthest[0][0] != cached.get(farthest[0][1]):
                heapq.heappop(farthest)
            if use >= -farthest[0][0]:
                continue  # bypass
            del cached[heapq.heappop(farthest)[1]]
        cached[block] = use
        heapq.heappush(farthest, (-use, block))
    return hits


def replay(requests: list[Request], name: str, capacity: int, *, pin: bool = True) -> ReplayResult:
    return simulate(requests, [SimTier("fast", capacity), SimTier("slow")],
                    get_policy(name, {}, policy_context(requests)), pin=pin)


@pytest.mark.parametrize(("share", "lru_percent", "min_percent"), list(zip(SHARES, LRU_PERCENT, MIN_PERCENT,
                                                                           strict=True)))
def test_lru_is_textbook_lru_and_belady_is_min(requests: list[Request], stream: list[int], share: float,
                                              lru_percent: float, min_percent: float) -> None:
    distinct = len(set(stream))
    assert (len(stream), distinct) == (121_877, 43_924)
    capacity = math.floor(share * distinct)
    lru_hits, min_hits = textbook_lru_hits(stream, capacity), textbook_min_hits(stream, capacity)
    assert round(100 * lru_hits / len(stream), 2) == lru_percent
    assert round(100 * min_hits / len(stream), 2) == min_percent
    lru = replay(requests, "lru", capacity)
    assert lru.tiers[0].hits == lru_hits and lru.references == len(stream)
    assert replay(requests, "lru", capacity, pin=False).tiers[0].hits == lru_hits
    assert replay(requests, "belady", capacity, pin=False).tiers[0].hits == min_hits
    # Belady bounds every demand cache at this capacity, pinned (the default) or not.
    pinned = {name: replay(requests, name, capacity) for name in ("lru", "lfu", "belady")}
    for name in ("lru", "lfu"):
        assert pinned["belady"].fast_hit_ratio >= pinned[name].fast_hit_ratio, (name, share)
        unpinned = replay(requests, name, capacity, pin=False)
        assert min_hits >= unpinned.tiers[0].hits, (name, share)
