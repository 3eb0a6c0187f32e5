"""The compiled replay core makes the Python path's decisions exactly: every figure of every built-in demand cache,
on the shared trace, with two and three tiers, pinned or not, with a migration budget or without."""

from __future__ import annotations

import random

import pytest
from fixture_paths import MOONCAKE_TRACE

from tieremu.errors import ConfigError
from tieremu.policy import Policy, get_policy
from tieremu.policy.recency import LRU
from tieremu.workloads.replay_core import NATIVE, supports
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, read_trace

TIMES = ("wall_s", "prepare_s", "policy_cpu_s", "core")  # how long and where it ran: the only fields that differ


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


def figures(result: ReplayResult) -> dict[str, object]:
    data = result.to_dict(samples=True)
    for key in TIMES:
        data.pop(key, None)
    return data


def both(requests: list[Request], name: str, tiers: list[SimTier], **kwargs: object) -> tuple[ReplayResult, ...]:
    return tuple(simulate(requests, tiers, get_policy(name, {}, policy_context(requests)), core=core,
                          tier_read_gbps={tiers[0].name: 20.0}, **kwargs)  # type: ignore[arg-type]
                 for core in ("python", "native"))


@pytest.mark.parametrize("fast", [439, 4392])  # 1% and 10% of the distinct blocks (at 1%, requests fill it)
@pytest.mark.parametrize("name", NATIVE)
def test_two_tiers_pinned(requests: list[Request], name: str, fast: int) -> None:
    python, native = both(requests, name, [SimTier("fast", fast), SimTier("slow")])
    assert (python.core, native.core) == ("python", "native")
    assert figures(native) == figures(python)
    assert python.promotions > 0 and python.demotions > 0 and python.waited_requests > 0  # not vacuous


@pytest.mark.parametrize("name", NATIVE)
def test_three_limited_tiers_unpinned_under_a_budget(requests: list[Request], name: str) -> None:
    tiers = [SimTier("fast", 300), SimTier("mid", 1200), SimTier("far", 5000)]
    python, native = both(requests, name, tiers, pin=False, budget_gbps=4.0, epoch_s=0.001)
    assert figures(native) == figures(python)
    assert python.evictions > 0 and python.ping_pongs > 0 and python.migration_gbps <= 4.0


def test_only_the_exact_built_in_classes_run_natively() -> None:
    class Mine(LRU):
        name = "mine"

    assert supports(get_policy("lru")) and not supports(Mine()) and not supports(get_policy("hotcold"))
    policy: Policy = get_policy("hotcold")
    with pytest.raises(ConfigError, match="core=native runs the built-in demand caches"):
        simulate([Request(0, 512, 1, (1,))], [SimTier("a")], policy, core="native")


def textbook_lfu_hits(stream: list[int], capacity: int) -> int:
    """LFU over a fast tier of `capacity` blocks whose counts outlive eviction (the slow tier below keeps every
    block): a missed block always comes in, and the cached block with the fewest references leaves, the one
    referenced longest ago among equals."""
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    cached: set[int] = set()
    hits = 0
    for i, block in enumerate(stream):
        if block in cached:
            hits += 1
        else:
            if len(cached) >= capacity:
                cached.remove(min(cached, key=lambda b: (count[b], last[b])))
            cached.add(block)
        count[block] = count.get(block, 0) + 1
        last[block] = i
    return hits


def crafted_stream(seed: int) -> list[int]:
    """Skewed references broken by rounds over a set of blocks, so that many blocks tie on their counts."""
    rng = random.Random(seed)
    stream: list[int] = []
    for part in range(12):
        if part % 3 == 2:  # a round robin: every block of the round ends with the same count
            stream += [100 * part + b for b in range(rng.randint(3, 12))] * rng.randint(1, 3)
        else:
            stream += [min(int(rng.paretovariate(1.2)), 40) for _ in range(rng.randint(50, 150))]
    return stream


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity", [1, 4, 9])
def test_lfu_is_textbook_lfu_on_crafted_ties(seed: int, capacity: int) -> None:
    stream = crafted_stream(seed)
    expected = textbook_lfu_hits(stream, capacity)
    assert 0 < expected < len(stream) - len(set(stream))  # neither all hits nor none
    tiers = [SimTier("fast", capacity), SimTier("slow")]
    one_each = [Request(i, 512, 1, (b,)) for i, b in enumerate(stream)]
    rng = random.Random(seed)
    grouped, i = [], 0  # several blocks a request, unpinned: the same reference stream
    while i < len(stream):
        n = rng.randint(1, 4)
        grouped.append(Request(len(grouped), 512 * n, 1, tuple(stream[i:i + n])))
        i += n
    for core in ("python", "native"):
        for requests, pin in ((one_each, True), (one_each, False), (grouped, False)):
            result = simulate(requests, tiers, get_policy("lfu"), core=core, pin=pin)
            assert result.core == core
            assert result.tiers[0].hits == expected, (core, pin, len(requests))


@pytest.mark.parametrize("name", NATIVE)
def test_requests_larger_than_the_tiers_fall_through_alike(name: str) -> None:
    """Pinned requests wider than the fast tier: admissions fall through to lower tiers and searches pass pinned
    blocks, the paths a miss or a promotion takes when its block cannot stay where the policy filed it."""
    rng = random.Random(7)
    requests = [Request(t, 512 * n, 1, tuple(rng.sample(range(40), n)))  # up to more than the three tiers hold
                for t, n in enumerate(rng.randint(1, 20) for _ in range(120))]
    tiers = [SimTier("fast", 3), SimTier("mid", 5), SimTier("far", 8)]
    python, native = (simulate(requests, tiers, get_policy(name, {}, policy_context(requests)), core=core)
                      for core in ("python", "native"))
    assert figures(native) == figures(python)
    assert python.evictions > 0 and python.uncached > 0 and python.promotions > 0
