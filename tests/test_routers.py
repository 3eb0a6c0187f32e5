"""Routers against hand-computed cases on a small fake cluster view, with the TTFT estimate recomputed here."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from tieremu.cluster.routers import (
    ROUTERS,
    Admission,
    InstanceLoad,
    RouteRequest,
    estimate,
    make_router,
    matches,
    parse_router,
)
from tieremu.errors import ConfigError

BLOCK = 4  # tokens per block in these cases


@dataclass
class FakeView:
    """Instances with loads and residency (instance -> block -> tier); uniform links; linear prefill."""

    loads: list[InstanceLoad]
    resident: list[dict[int, int]]
    sharing: bool = False
    read_per_block: tuple[float, ...] = (0.0, 0.5)
    pull_latency: float = 0.1
    pull_per_block: tuple[float, ...] = (0.2, 0.4)
    prefill_per_token: float = 1.0
    block_tokens: int = BLOCK
    queue: list[float] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return len(self.loads)

    def load(self, instance: int) -> InstanceLoad:
        return self.loads[instance]

    def holders(self, block: int) -> Collection[int]:
        return [i for i, r in enumerate(self.resident) if block in r]

    def tier_of(self, instance: int, block: int) -> int | None:
        return self.resident[instance].get(block)

    def read_s(self, instance: int, tier: int, blocks: int) -> float:
        return self.read_per_block[tier] * blocks

    def pull_s(self, source: int, target: int, tier: int, blocks: int) -> float:
        return self.pull_latency + self.pull_per_block[tier] * blocks

    def queue_s(self, instance: int) -> float:
        return self.queue[instance] if self.queue else 0.0

    def prefill_s(self, instance: int, tokens: int) -> float:
        return tokens * self.prefill_per_token


def idle(n: int) -> list[InstanceLoad]:
    return [InstanceLoad(0, 0, 0, 0) for _ in range(n)]


def test_round_robin_takes_eligible_instances_in_turn() -> None:
    view = FakeView(idle(4), [{}] * 4)
    router = make_router("round-robin")
    request = RouteRequest((1,), 4, 1)
    assert [router.route(request, view, [1, 3]) for _ in range(5)] == [1, 3, 1, 3, 1]


def test_least_loaded_counts_outstanding_requests_then_queued_tokens() -> None:
    loads = [InstanceLoad(2, 100, 1, 5), InstanceLoad(1, 50, 1, 5), InstanceLoad(0, 0, 2, 5)]
    view = FakeView(loads, [{}] * 3)
    # outstanding: 3, 2, 2; tie between 1 and 2 broken by queued prefill tokens (50 vs 0)
    assert make_router("least-loaded").route(RouteRequest((1,), 4, 1), view, [0, 1, 2]) == 2


def test_prefix_takes_the_longest_resident_prefix_unless_load_is_unbalanced() -> None:
    resident = [{1: 0}, {1: 0, 2: 0, 3: 1}, {2: 0, 3: 0, 4: 0}]  # instance 2 holds 3 blocks but no prefix
    loads = [InstanceLoad(0, 0, 0, 0), InstanceLoad(2, 0, 1, 0), InstanceLoad(0, 0, 0, 0)]
    view = FakeView(loads, resident)
    request = RouteRequest((1, 2, 3, 4), 16, 1)
    assert make_router("prefix", {"load_threshold": 3}).route(request, view, [0, 1, 2]) == 1
    # spread 3 > 2: balance first (least loaded: 0 and 2 tie at 0 outstanding, lowest index)
    assert make_router("prefix", {"load_threshold": 2}).route(request, view, [0, 1, 2]) == 0
    # the best match (3 of 4 blocks) under min_match 0.9: least loaded
    assert make_router("prefix", {"load_threshold": 8, "min_match": 0.9}).route(request, view, [0, 1, 2]) == 0
    # nothing resident anywhere: least loaded
    assert make_router("prefix").route(RouteRequest((9,), 4, 1), view, [1, 2]) == 2


def test_matches_agree_with_a_brute_force_count() -> None:
    resident = [{1: 0, 2: 1, 5: 0}, {2: 0}, {1: 1, 2: 1, 3: 0, 4: 1}]
    view = FakeView(idle(3), resident)
    request = (1, 2, 3, 4, 5)
    found = matches(view, request)
    for i, r in enumerate(resident):
        prefix = 0
        while prefix < len(request) and request[prefix] in r:
            prefix += 1
        resident_count = sum(1 for b in request if b in r)
        assert found[i].prefix == prefix
        assert found[i].resident == resident_count
        assert sum(found[i].by_tier) == resident_count
    assert found[2].by_tier == (1, 3)


def test_cost_router_estimate_is_queue_plus_reads_plus_cheaper_of_pull_and_prefill() -> None:
    # Request: 3 full blocks of 4 tokens + 2 tokens beyond the hashed blocks (14 tokens).
    request = RouteRequest((1, 2, 3), 14, 1)
    resident = [{1: 0}, {1: 1, 2: 1, 3: 1}, {}]
    view = FakeView(idle(3), resident, sharing=True, queue=[1.0, 9.0, 0.0])
    # Instance 0: queue 1; reads block 1 in tier 0 (0); blocks 2, 3 pulled from instance 1's tier 1:
    # 0.1 + 2 * 0.4 = 0.9 vs computing their 8 tokens (8): pull; then prefill of 2 tokens: 2. Total 1 + 0.9 + 2.
    e0 = estimate(view, request, 0)
    assert e0.pull_from == ((1, 1, 2),)
    assert math.isclose(e0.ttft_s, 1.0 + 0.9 + 2.0)
    # Instance 1: queue 9; reads 3 blocks from tier 1: 1.5; prefill 2 tokens. Total 12.5.
    assert math.isclose(estimate(view, request, 1).ttft_s, 9.0 + 1.5 + 2.0)
    # Instance 2: queue 0; pulls block 1 from instance 0's tier 0 (0.1 + 0.2) and blocks 2, 3 from instance 1's
    # tier 1 (0.1 + 0.8); prefill 2 tokens. Total 3.2 < 3.9: instance 2.
    e2 = estimate(view, request, 2)
    assert math.isclose(e2.ttft_s, 0.3 + 0.9 + 2.0)
    assert make_router("cost").route(request, view, [0, 1, 2]) == 2
    # Without sharing instance 2 computes all 14 tokens; instance 0 computes 10: 1 + 10 = 11 < 14; instance 1: 12.5.
    view.sharing = False
    assert math.isclose(estimate(view, request, 0).ttft_s, 11.0)
    assert make_router("cost").route(request, view, [0, 1, 2]) == 0


def test_pull_is_skipped_when_recompute_is_cheaper() -> None:
    request = RouteRequest((1,), 4, 1)
    view = FakeView(idle(2), [{1: 0}, {}], sharing=True, pull_latency=10.0)
    e = estimate(view, request, 1)
    assert e.pulled_blocks == 0 and math.isclose(e.ttft_s, 4.0)


def test_weighted_router_sums_weighted_prefill_blocks_and_decode_blocks() -> None:
    loads = [InstanceLoad(1, 8, 2, 10), InstanceLoad(0, 0, 4, 30), InstanceLoad(0, 0, 0, 0)]
    resident = [{1: 0, 2: 0}, {1: 0, 2: 0, 3: 0}, {}]
    view = FakeView(loads, resident)
    request = RouteRequest((1, 2, 3), 12, 1)
    # logit = w * (queued blocks + 3 - prefix) + decode blocks + 3

    def logit(w: float, i: int) -> float:
        prefix = (2, 3, 0)[i]
        return w * (math.ceil(loads[i].queued_prefill_tokens / BLOCK) + 3 - prefix) + loads[i].decode_blocks + 3
    for w in (0.0, 1.0, 20.0):
        expected = min(range(3), key=lambda i: (logit(w, i), i))
        assert make_router("weighted", {"overlap_weight": w}).route(request, view, [0, 1, 2]) == expected
    # by hand: w=20: 73, 33, 63 -> 1; w=0: 13, 33, 3 -> 2
    assert make_router("weighted", {"overlap_weight": 20}).route(request, view, [0, 1, 2]) == 1
    assert make_router("weighted", {"overlap_weight": 0}).route(request, view, [0, 1, 2]) == 2


def test_admission_rejects_predictions_over_the_slo_and_counts_them() -> None:
    view = FakeView(idle(1), [{}])
    admission = Admission(slo_ms=5000)
    assert admission.admit(estimate(view, RouteRequest((1,), 4, 1), 0))  # 4 s
    assert not admission.admit(estimate(view, RouteRequest((1, 2), 8, 1), 0))  # 8 s
    assert admission.rejected == 1
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="SLO"):
            Admission(slo_ms=bad)


def test_bad_router_names_and_parameters_are_refused_with_what_is_valid() -> None:
    with pytest.raises(ConfigError, match="valid routers: round-robin, least-loaded, prefix, cost, weighted"):
        make_router("random")
    with pytest.raises(ConfigError, match="unknown parameter 'threshold'; its parameters: load_threshold, min_match"):
        parse_router("prefix:threshold=3")
    with pytest.raises(ConfigError, match="its parameters: none"):
        parse_router("cost:x=1")
    with pytest.raises(ConfigError, match="is not an integer"):
        parse_router("prefix:load_threshold=2.5")
    with pytest.raises(ConfigError, match="out of range"):
        parse_router("prefix:min_match=1.5")
    with pytest.raises(ConfigError, match="is not a number"):
        parse_router("weighted:overlap_weight=nan")
    with pytest.raises(ConfigError, match="must be key=value"):
        parse_router("prefix:load_threshold")
    assert parse_router("prefix:load_threshold=4,min_match=0.5").describe() == {
        "router": "prefix", "load_threshold": 4, "min_match": 0.5}
    assert set(ROUTERS) == {"round-robin", "least-loaded", "prefix", "cost", "weighted"}
