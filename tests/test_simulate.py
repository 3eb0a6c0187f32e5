"""Simulate-mode replay: accounting rules on hand-made traces, the bounds on real and generated traces, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli.replay import replay
from tieremu.errors import ConfigError, PolicyError
from tieremu.policy import Move, Plan, Policy, PolicyContext, UpcomingRequest, get_policy, names
from tieremu.policy.base import AccessEvent, BlockView, first_unpinned
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, ceiling_hit_ratio, read_trace, reference_count

REPO = Path(__file__).resolve().parents[1]
SMALL_TRACE = REPO / "configs" / "traces" / "small.jsonl"
CXL_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
DEMAND = ("lru", "lfu")  # the demand caches Belady (MIN with bypass) bounds
ONLINE = (*DEMAND, "lru-epoch", "hotcold", "lookahead", "interleave")
MIB = 2**20


@pytest.fixture(scope="module")
def shared_trace() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


@pytest.fixture(scope="module")
def small_trace() -> list[Request]:
    return read_trace(SMALL_TRACE)


def run(requests: Sequence[Request], tiers: Sequence[SimTier], name: str, **params: object) -> ReplayResult:
    if name == "split":
        params = {"fractions": [1.0 / len(tiers)] * len(tiers), **params}
    return simulate(requests, tiers, get_policy(name, params, policy_context(requests)),
                    tier_read_gbps={t.name: 20.0 / (i + 1) for i, t in enumerate(tiers)})


def trace(*requests: tuple[float, Sequence[int]], tokens: int = 512) -> list[Request]:
    """Requests at (seconds, hash ids), every block full."""
    return [Request(round(at * 1000), tokens * len(ids), 1, tuple(ids)) for at, ids in requests]


# -- the bounds, on the shared Mooncake trace and the shipped small one --------------------------------------------

@pytest.mark.parametrize("name", names())
def test_unlimited_capacity_reaches_the_ceiling_on_the_shared_trace(shared_trace: list[Request], name: str) -> None:
    result = run(shared_trace, [SimTier("dram"), SimTier("cxl")], name)
    assert result.references == 121_877
    assert result.hit_ratio == pytest.approx(ceiling_hit_ratio(shared_trace), abs=1e-12)
    assert round(result.hit_ratio, 3) == 0.640
    assert result.evictions == 0 and result.misses == len({b for r in shared_trace for b in r.hash_ids})


@pytest.mark.parametrize("name", names())
def test_unlimited_capacity_reaches_the_ceiling_on_the_small_trace(small_trace: list[Request], name: str) -> None:
    result = run(small_trace, [SimTier("dram"), SimTier("cxl"), SimTier("far")], name)
    assert result.hit_ratio == pytest.approx(ceiling_hit_ratio(small_trace), abs=1e-12)
    assert result.references == reference_count(small_trace) == result.hits + result.misses


def check_bounds(requests: list[Request], tiers: list[SimTier]) -> dict[str, ReplayResult]:
    results = {name: run(requests, tiers, name) for name in (*ONLINE, "belady", "all-fastest", "all-slowest")}
    ceiling = ceiling_hit_ratio(requests)
    fast = {name: r.fast_hit_ratio for name, r in results.items()}
    for name in DEMAND:
        assert fast["belady"] >= fast[name], (name, fast)
        assert results["belady"].hit_ratio >= results[name].hit_ratio, name
    for name in (*ONLINE, "belady"):
        assert fast["all-slowest"] <= fast[name] <= fast["all-fastest"], (name, fast)
    assert fast["all-fastest"] == pytest.approx(ceiling) and fast["all-slowest"] == 0.0
    assert results["all-fastest"].capacity_lifted and not results["lru"].capacity_lifted
    assert results["lru"].fast_hit_ratio < ceiling  # the limit binds: the comparison is not vacuous
    return results


@pytest.mark.parametrize("fast_blocks", [100, 1000])
def test_with_a_limited_fast_tier_belady_and_the_static_bounds_bracket_every_online_policy(
        shared_trace: list[Request], fast_blocks: int) -> None:
    results = check_bounds(shared_trace, [SimTier("dram", fast_blocks), SimTier("cxl")])
    ttft = {name: r.ttft_ms.mean for name, r in results.items()}
    for name in (*ONLINE, "belady"):
        assert ttft["all-fastest"] <= ttft[name], (name, ttft)
        # A demand cache moves a block on every miss and slow hit: with 64 MiB blocks the migration channel
        # saturates and reads wait for blocks in flight, which may cost more than reading all from the slow tier.
        # The daemons move within their quota and epoch, so the slow tier's TTFT still bounds theirs.
        if name not in (*DEMAND, "belady"):
            assert ttft[name] <= ttft["all-slowest"], (name, ttft)
    assert max(results[name].waited_requests for name in DEMAND) > 0


@pytest.mark.parametrize("capacities", [(20, None), (60, None), (30, 150, None), (30, 150, 600)])
def test_bounds_on_the_small_trace(small_trace: list[Request], capacities: tuple[int | None, ...]) -> None:
    tiers = [SimTier(n, c) for n, c in zip(("dram", "cxl", "far"), capacities, strict=False)]
    results = check_bounds(small_trace, tiers)
    for r in results.values():
        for tier, sim in zip(r.tiers, tiers, strict=True):
            assert r.capacity_lifted or sim.capacity_blocks is None or tier.resident_blocks <= sim.capacity_blocks


# -- accounting rules -------------------------------------------------------------------------------------------------

def test_hits_misses_and_ttft_estimate() -> None:
    requests = trace((0.0, [1, 2]), (1.0, [1, 2, 3]))
    requests[1] = Request(1000, 512 * 2 + 100, 1, (1, 2, 3))  # the last block holds 100 tokens
    result = simulate(requests, [SimTier("dram"), SimTier("cxl")], get_policy("all-slowest"),
                      tier_read_gbps={"dram": 40.0, "cxl": 8.0}, block_bytes=8 * MIB, prefill_tokens_per_s=1000.0)
    assert (result.references, result.hits, result.misses) == (5, 2, 3)
    assert result.tier("cxl").hits == 2 and result.tier("dram").hits == 0
    assert result.star == 1.0 and result.strr == 1.0
    first_ms = 1024 / 1000.0 * 1e3
    second_ms = (100 / 1000.0 + 2 * 8 * MIB / 8e9) * 1e3
    assert result.ttft_samples_ms == pytest.approx((first_ms, second_ms))
    assert result.ttft_ms.max == pytest.approx(first_ms) and result.origin == "simulated"


def test_full_last_tier_evicts_and_the_block_misses_again() -> None:
    requests = trace((0.0, [1]), (0.1, [2]), (0.2, [3]), (0.3, [1]))
    result = run(requests, [SimTier("dram", 2)], "lru")
    assert result.evictions == 2 and result.misses == 4 and result.hits == 0


def test_lru_epoch_fills_the_fastest_tier_with_room() -> None:
    requests = trace((0.0, [1, 2]), (0.01, [3]), (0.02, [4]))
    result = run(requests, [SimTier("dram", 2), SimTier("cxl", 1), SimTier("far", 1)], "lru-epoch")
    assert result.demotions == 0 and [t.resident_blocks for t in result.tiers] == [2, 1, 1]


def test_a_demand_cache_places_every_miss_in_the_fastest_tier_and_pushes_victims_down() -> None:
    requests = trace((0.0, [1, 2]), (0.01, [3]), (0.02, [4]))
    result = run(requests, [SimTier("dram", 2), SimTier("cxl", 1), SimTier("far", 1)], "lru")
    # 3 pushes 1 (least recent) to cxl; 4 pushes 2 to cxl, which pushes 1 on to far.
    assert result.demotions == 3 and [t.resident_blocks for t in result.tiers] == [2, 1, 1]
    assert result.family == "demand" and result.evictions == 0


def test_a_demand_cache_promotes_a_slow_hit_at_once() -> None:
    requests = trace((0.0, [1]), (0.01, [2]), (0.02, [1]), (0.03, [1]))
    result = run(requests, [SimTier("dram", 1), SimTier("cxl")], "lru")
    # 2 pushes 1 down; 1 is hit in cxl (served there) and promoted, pushing 2 down; then 1 is a fast hit.
    assert [t.hits for t in result.tiers] == [1, 1] and (result.promotions, result.demotions) == (1, 2)
    # lru-epoch places 2 in cxl (dram is full) and would promote it only at the first epoch, 50 ms in.
    epoch = run(trace((0.0, [1]), (0.01, [2]), (0.02, [2]), (0.03, [2])), [SimTier("dram", 1), SimTier("cxl")],
                "lru-epoch")
    assert [t.hits for t in epoch.tiers] == [0, 2] and epoch.promotions == 0 and epoch.family == "daemon"


def test_victims_move_down_the_chain() -> None:
    requests = trace((0.0, [1, 2]), (0.01, [3]), (0.02, [4]), (0.03, [5]))
    policy = Scripted({}, admit_to="dram")  # FIFO victims
    result = simulate(requests, [SimTier("dram", 2), SimTier("cxl", 1), SimTier("far", 1)], policy)
    # 3 pushes 1 to cxl; 4 pushes 2 to cxl, which pushes 1 to far; 5 pushes 3 down, 2 to far and 1 out.
    assert (result.demotions, result.evictions) == (5, 1)
    assert [t.resident_blocks for t in result.tiers] == [2, 1, 1]


def test_pinned_blocks_are_never_pushed_out() -> None:
    # One tier of two blocks, a request of three: the third block finds only pinned neighbours.
    result = run(trace((0.0, [1, 2, 3]), (1.0, [1, 2])), [SimTier("dram", 2)], "lru")
    assert result.uncached == 1 and result.hits == 2 and result.evictions == 0


def test_strr_and_residency_average_over_epochs() -> None:
    requests = trace((0.0, [1, 2, 3, 4]), (1.0, [5]))
    result = simulate(requests, [SimTier("dram"), SimTier("cxl")], get_policy("interleave"), epoch_s=0.1)
    assert result.epochs == 10 and result.trace_s == 1.0
    assert result.strr == pytest.approx(0.5) and result.tier("dram").residency == pytest.approx(0.5)
    assert [t.resident_blocks for t in result.tiers] == [3, 2]


class Scripted(Policy):
    """Places everything in one tier (the slowest unless told), pushes out the oldest (unless told), and carries
    out a fixed plan per epoch."""

    name = "scripted"

    def __init__(self, plans: dict[int, Plan], victim: int | None = None, admit_to: str | None = None) -> None:
        super().__init__(PolicyContext())
        self.plans = plans
        self.epoch = 0
        self.forced_victim = victim
        self.admit_to = admit_to

    def admit(self, block: int, view: BlockView) -> str:
        return self.admit_to or view.tiers[-1].name

    def victim(self, tier: str, view: BlockView) -> int:
        return first_unpinned(view, tier) if self.forced_victim is None else self.forced_victim

    def plan(self, view: BlockView, now: float) -> Plan:
        self.epoch += 1
        return self.plans.get(self.epoch, Plan())


def test_moves_are_counted_with_ping_pongs_and_bytes() -> None:
    plans = {
        1: Plan([Move(1, "cxl", "dram", "promote"), Move(2, "cxl", "dram", "prefetch")]),
        2: Plan([Move(1, "dram", "cxl", "demote")]),  # straight back: a ping-pong
        3: Plan([Move(7, "cxl", "dram", "promote"), Move(2, "cxl", "dram", "promote")]),  # unknown, and stale
        4: Plan(evictions=[2]),
    }
    requests = trace((0.0, [1, 2]), (1.0, [1]))
    result = simulate(requests, [SimTier("dram"), SimTier("cxl")], Scripted(plans), epoch_s=0.1,
                      block_bytes=4 * MIB)
    assert (result.promotions, result.prefetches, result.demotions) == (1, 1, 1)
    assert result.ping_pongs == 1 and result.moves_skipped == 2 and result.evictions == 1
    assert result.migration_bytes == 3 * 4 * MIB
    assert result.migration_gbps == pytest.approx(3 * 4 * MIB / 1.0 / 1e9)  # every move landed within the trace


def test_a_promotion_into_a_full_tier_swaps_with_its_victim() -> None:
    plans = {1: Plan([Move(3, "cxl", "dram", "promote")])}
    requests = trace((0.0, [1, 2]), (0.0, [3]), (1.0, [3]))
    tiers = [SimTier("dram", 2), SimTier("cxl", 1)]
    policy = Scripted(plans)
    policy.admit = lambda block, view: "dram" if block < 3 else "cxl"  # type: ignore[method-assign]
    result = simulate(requests, tiers, policy, epoch_s=0.5)
    assert result.tier("dram").hits == 1 and result.evictions == 0
    assert (result.promotions, result.demotions) == (1, 1)


@pytest.mark.parametrize(("plan", "message"), [
    (Plan([Move(1, "cxl", "dram", "demote")]), "promote and prefetch go to a faster tier, demote to a slower"),
    (Plan([Move(1, "cxl", "hbm", "promote")]), "named tier 'hbm'; tiers: dram, cxl"),
    (Plan([Move(1, "cxl", "dram", "teleport")]), "reason 'teleport'; valid: promote, demote, prefetch"),
])
def test_bad_plans_are_refused(plan: Plan, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        simulate(trace((0.0, [1]), (1.0, [1])), [SimTier("dram"), SimTier("cxl")], Scripted({1: plan}))


def test_a_pinned_or_misplaced_victim_is_refused() -> None:
    tiers = [SimTier("dram", 2)]
    requests = trace((0.0, [1]), (1.0, [2, 3]))  # 3 overfills dram; 1 is the only block that may leave
    with pytest.raises(PolicyError, match="chose block 2 as the victim of tier dram, but it is pinned"):
        simulate(requests, tiers, Scripted({}, victim=2))
    with pytest.raises(PolicyError, match="chose block 3 as the victim of tier dram, but it is pinned"):
        simulate(requests, tiers, Scripted({}, victim=3))
    with pytest.raises(PolicyError, match="chose block 9 as the victim of tier dram, but it is in no tier"):
        simulate(requests, tiers, Scripted({}, victim=9))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tiers": []}, "at least one tier"),
    ({"tiers": [SimTier("a"), SimTier("a")]}, "tier names must be unique"),
    ({"tiers": [SimTier("a", 0)]}, "capacity_blocks=0 must be 1 or more"),
    ({"tier_read_gbps": {"b": 1.0}}, "names tier 'b', which is not one of a"),
    ({"epoch_s": 0}, "epoch_s=0 must be positive"),
])
def test_bad_simulation_settings(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"tiers": [SimTier("a")], **kwargs}
    tiers = args.pop("tiers")
    with pytest.raises(ConfigError, match=message):
        simulate(trace((0.0, [1])), tiers, get_policy("lru"), **args)  # type: ignore[arg-type]


# -- the replay command -------------------------------------------------------------------------------------------

def test_replay_command_prints_tiers_and_summary() -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), "--policy", "hotcold",
                                      "--param", "quota=4", "--capacity", "dram=40", "--capacity", "cxl=100"])
    assert out.exit_code == 0, out.output
    for text in ("under hotcold (simulated)", "dram", "cxl", "far", "STRR", "TTFT estimate p50", "ping-pongs"):
        assert text in out.output


def test_replay_json_matches_simulate(small_trace: list[Request]) -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), "--policy", "lru", "--capacity",
                                      "dram=40", "--block-mib", "16", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    direct = simulate(small_trace, [SimTier("dram", 40), SimTier("cxl"), SimTier("far")], get_policy("lru"),
                      block_bytes=16 * MIB)
    assert data["origin"] == "simulated" and data["policy"] == "lru" and data["block_bytes"] == 16 * MIB
    assert data["hit_ratio"] == direct.hit_ratio and data["tiers"][0]["hits"] == direct.tiers[0].hits
    assert data["promotions"] == direct.promotions and "ttft_samples_ms" not in data


def test_replay_takes_capacity_from_the_tier_map(tmp_path: Path) -> None:
    tiers = tmp_path / "t.yaml"
    tiers.write_text("name: t\ntiers:\n  - {name: dram, nodes: [0], capacity_mib: 1000}\n"
                     "  - {name: cxl, nodes: [1], allow_emulation: true, emulate: {bandwidth_gbps: 5}}\n")
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(tiers), "--policy", "lru", "--block-mib",
                                      "64", "--local-gbps", "30", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [t["capacity_blocks"] for t in data["tiers"]] == [1000 // 64, None]
    assert [t["read_gbps"] for t in data["tiers"]] == [30.0, 5.0]


@pytest.mark.parametrize(("args", "error", "message"), [
    (["--policy", "nope"], PolicyError, "unknown policy 'nope'; valid: all-fastest"),
    (["--policy", "lru", "--param", "quota=3"], PolicyError, "unknown parameter 'quota'"),
    (["--policy", "lru", "--capacity", "hbm=3"], ConfigError, "--capacity names tier 'hbm'; tiers of cxl-expander"),
    (["--policy", "lru", "--read-gbps", "hbm=3"], ConfigError, "--read-gbps names tier 'hbm'"),
])
def test_replay_errors(args: list[str], error: type[Exception], message: str) -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), *args])
    assert isinstance(out.exception, error) and message in str(out.exception)


def test_replay_refuses_an_unknown_mode_and_a_param_without_a_value() -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), "--policy", "lru", "--mode",
                                      "exec"])
    assert out.exit_code == 2 and "'exec' is not one of 'simulate', 'execute'" in out.output
    bad = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), "--policy", "lru", "--param",
                                      "quota"])
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output


@pytest.mark.parametrize(("name", "params"), [("lru", {}), ("lfu", {}), ("belady", {}), ("hotcold", {}),
                                              ("lookahead", {}), ("lru-epoch", {"promote_quota": 1000})])
def test_ranking_policies_file_every_resident_block_where_it_is(small_trace: list[Request], name: str,
                                                                params: dict[str, object]) -> None:
    """A block filed under the wrong tier is never a victim there (RankedWalk skips it): it would squat in its tier.
    Regression: promotions by a plan were never re-filed, so with a large quota lru-epoch turned into FIFO."""
    policy = get_policy(name, params, policy_context(small_trace))
    ranked = policy.ranked  # type: ignore[attr-defined]
    misfiled: list[int] = []
    plan = policy.plan

    def checked_plan(view: BlockView, now: float) -> Plan:
        misfiled.extend(b for t in view.tiers for b in view.blocks_in(t.name) if ranked.tier(b) != t.name)
        return plan(view, now)

    def checked_victim(tier: str, view: BlockView) -> int:
        # (A newcomer being fitted is pinned and may not be re-filed yet: it cannot be the victim anyway.)
        misfiled.extend(b for b in view.blocks_in(tier) if ranked.tier(b) != tier and not view.pinned(b))
        return victim(tier, view)

    victim = policy.victim
    policy.plan = checked_plan  # type: ignore[method-assign]
    policy.victim = checked_victim  # type: ignore[method-assign]
    tiers = [SimTier("dram", 20), SimTier("cxl", 60), SimTier("far", 200)]
    result = simulate(small_trace, tiers, policy, core="python")
    assert result.evictions > 0 and result.demotions > 0 and result.epochs > 100
    if policy.family == "daemon":
        assert result.promotions + result.prefetches > 0  # plans moved blocks: the check above saw them after
    final = simulate(small_trace, tiers, get_policy(name, params, policy_context(small_trace)), core="python")
    assert misfiled == [] and final.fast_hit_ratio == result.fast_hit_ratio


def test_lru_epoch_with_unlimited_quota_is_not_fifo(small_trace: list[Request]) -> None:
    """The ghost-block bug made every promoted block invisible to victim choice, so eviction fell back to first
    placed, first out; fixed, a generous quota makes lru-epoch promote like a demand LRU and hit more."""
    tiers = [SimTier("dram", 20), SimTier("cxl")]
    fifo = simulate(small_trace, tiers, FirstIn(promote_quota=1000))
    fixed = run(small_trace, tiers, "lru-epoch", promote_quota=1000)
    assert fixed.fast_hit_ratio > fifo.fast_hit_ratio


class FirstIn(Policy):
    """lru-epoch's placement and promotions, but the victim is always the first block placed: what the bug did."""

    name = "first-in"

    def __init__(self, promote_quota: int) -> None:
        super().__init__(PolicyContext())
        self.inner = get_policy("lru-epoch", {"promote_quota": promote_quota})

    def admit(self, block: int, view: BlockView) -> str:
        return self.inner.admit(block, view)

    def observe(self, events: Sequence[AccessEvent]) -> None:
        self.inner.observe(events)

    def victim(self, tier: str, view: BlockView) -> int:
        return first_unpinned(view, tier)

    def plan(self, view: BlockView, now: float) -> Plan:
        return self.inner.plan(view, now)


# -- migrations cost ------------------------------------------------------------------------------------------------

def test_a_read_waits_for_its_block_to_land_and_ttft_counts_the_wait() -> None:
    # dram holds one block: 2 pushes 1 down at 1.000 s; the move takes 64 MiB / 4 GB/s = 16.8 ms on the channel,
    # so 1, read from cxl at 1.001 s, is still in flight: that request waits for it to land.
    requests = trace((0.0, [1]), (1.0, [2]), (1.001, [1]))
    result = simulate(requests, [SimTier("dram", 1), SimTier("cxl")], get_policy("lru"), block_bytes=64 * MIB,
                      tier_read_gbps={"dram": 4.0, "cxl": 4.0}, prefill_tokens_per_s=1e9, core="python")
    move_s = 64 * MIB / 4e9
    landing = 1.0 + move_s
    read_s = 64 * MIB / 4e9
    assert result.waited_requests == 1 and result.demotions == 2 and result.promotions == 1
    assert result.ttft_samples_ms[2] == pytest.approx((read_s + (landing - 1.001)) * 1e3)
    # Three moves of 64 MiB at 4 GB/s, one after the other on the channel from 1.000 s: the span ends when the
    # last lands, so the rate stays under the channel's.
    assert result.migration_gbps == pytest.approx(3 * 64 * MIB / (1.0 + 3 * move_s) / 1e9)


@pytest.mark.parametrize("name", ["lru", "lfu", "belady", "lru-epoch", "hotcold", "lookahead"])
@pytest.mark.parametrize("budget", [0.5, 4.0])
def test_the_migration_budget_is_never_exceeded(small_trace: list[Request], name: str, budget: float) -> None:
    tiers = [SimTier("dram", 20), SimTier("cxl", 60), SimTier("far")]
    result = simulate(small_trace, tiers, get_policy(name, {}, policy_context(small_trace)), budget_gbps=budget,
                      tier_read_gbps={"dram": 20.0, "cxl": 8.0, "far": 2.0})
    assert result.moves > 0 and result.budget_gbps == budget
    assert result.migration_gbps <= budget * (1 + 1e-12)


def test_hotcold_moves_less_and_hits_differently_under_a_tighter_budget(small_trace: list[Request]) -> None:
    tiers = [SimTier("dram", 20), SimTier("cxl", 60), SimTier("far")]
    results = {budget: simulate(small_trace, tiers, get_policy("hotcold", {}, policy_context(small_trace)),
                                budget_gbps=budget) for budget in (0.05, 1.0, None)}
    tight, loose, unlimited = results[0.05], results[1.0], results[None]
    assert tight.moves_deferred > loose.moves_deferred and tight.moves < loose.moves <= unlimited.moves
    assert tight.fast_hit_ratio != unlimited.fast_hit_ratio
    assert tight.migration_gbps <= 0.05 * (1 + 1e-12)


# -- epochs ---------------------------------------------------------------------------------------------------------

class Counting(Policy):
    """Remembers when it was asked to plan, and which request came last before."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__(PolicyContext())
        self.plans: list[tuple[float, int]] = []
        self.last = -1

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name

    def victim(self, tier: str, view: BlockView) -> int:
        return first_unpinned(view, tier)

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:
        self.last = requests[0].request

    def plan(self, view: BlockView, now: float) -> Plan:
        self.plans.append((now, self.last))
        return Plan()


def test_epochs_fall_between_requests_sharing_a_timestamp() -> None:
    requests = trace((0.0, [1]), (0.0, [2]), (0.0, [3]), (0.0, [4]))  # one millisecond, four requests
    policy = Counting()
    result = simulate(requests, [SimTier("dram")], policy, epoch_s=0.0002)
    assert [last for _, last in policy.plans] == [0, 1, 2]  # an epoch ended after each of the first three
    assert result.epochs == 3


def test_empty_epochs_cost_nothing_and_are_counted() -> None:
    requests = trace((0.0, [1]), (10_000.0, [1]))  # 10,000 s apart at 1 ms epochs: ten million epochs
    policy = Counting()
    result = simulate(requests, [SimTier("dram"), SimTier("cxl")], policy, epoch_s=0.001)
    assert result.epochs == 10_000_000 and len(policy.plans) == 1  # asked once; its empty plan stands after
    assert result.tier("dram").residency == 1.0


# -- the replay command: capacities, checks, bounds ---------------------------------------------------------------

def shared(*args: str) -> list[str]:
    return [str(MOONCAKE_TRACE), "--tiers", str(CXL_MAP), *args]


def test_replay_json_keeps_its_shape_and_flags_nothing(shared_trace: list[Request]) -> None:
    out = CliRunner().invoke(replay, shared("--policy", "lru", "--capacity", "dram=10%", "--capacity", "cxl=100%",
                                            "--json"))
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["references"] == 121_877 and data["wall_s"] > 0 and data["core"] == "native"
    assert data["tiers"][0]["capacity_blocks"] == 4392 and data["tiers"][1]["capacity_blocks"] == 43_924
    assert round(data["tiers"][0]["hit_ratio"], 4) == 0.2598
    assert [b["bound"] for b in data["bounds"]] == ["ceiling", "belady"] and all(b["within"] for b in data["bounds"])
    unpinned = json.loads(CliRunner().invoke(replay, shared("--policy", "belady", "--capacity", "dram=1%",
                                                            "--no-pin", "--json")).output)
    assert round(unpinned["tiers"][0]["hit_ratio"], 4) == 0.1854 and unpinned["pinned"] is False


def test_a_result_outside_its_bound_is_flagged(small_trace: list[Request], monkeypatch: pytest.MonkeyPatch) -> None:
    from tieremu.workloads import bounds

    real = bounds.simulate

    def weak_belady(*args: object, **kwargs: object) -> ReplayResult:  # a Belady that hits nothing in dram
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(result, tiers=tuple(dataclasses.replace(t, hit_ratio=0.0) for t in result.tiers))

    monkeypatch.setattr(bounds, "simulate", weak_belady)
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), "--policy", "lru", "--capacity",
                                      "dram=20"])
    assert out.exit_code == 0, out.output
    assert "OUTSIDE ITS BOUNDS" in out.output and "vs belady 0:" in out.output


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "lru", "--capacity", "dram=150%"], "--capacity dram=150%: a share must be above 0% and at most 100%"),
    (["--policy", "lru", "--capacity", "dram=0.001%"], "is less than one block"),
    (["--policy", "lru", "--capacity", "dram=0"], "--capacity dram=0: give 1 block or more"),
    (["--policy", "lru", "--capacity", "dram=lots"], "expected a number of blocks or a share such as 10%"),
    (["--policy", "hotcold", "--param", "quota=many"], "parameter quota='many' must be int"),
    (["--policy", "hotcold", "--param", "target_util=1.5"], "target_util=1.5 must be in (0, 1]"),
    (["--policy", "lru", "--param", "promote_quota=4"], "policy lru: unknown parameter 'promote_quota'"),
])
def test_bad_input_is_refused_with_its_name(args: list[str], message: str) -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(CXL_MAP), *args])
    assert isinstance(out.exception, (ConfigError, PolicyError)), out.output
    assert message in str(out.exception)


def test_the_simulate_replay_path_never_imports_torch(tmp_path: Path) -> None:
    script = ("import sys\nfrom tieremu.cli.replay import replay\n"
              f"replay.main([{str(SMALL_TRACE)!r}, '--tiers', {str(CXL_MAP)!r}, '--policy', 'lru', '--json'], "
              "standalone_mode=False)\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["policy"] == "lru"


# -- the oracle bound of tiering daemons -----------------------------------------------------------------------------

def test_the_daemon_oracle_counts_by_hand() -> None:
    """Epoch 0 holds requests 0 and 1: blocks 1 and 2 are re-referenced after being created there (2 hits at most),
    block 3 is new. Epoch 2 reads 1 and 3, which existed before it: with one fast block only one of those first
    references can be a fast hit; unlimited, both can (the ceiling)."""
    from tieremu.workloads.bounds import daemon_oracle

    trace = [Request(0, 1, 1, (1, 2)), Request(0, 1, 1, (1, 2, 3)), Request(100, 1, 1, (1, 3))]
    assert daemon_oracle(trace, 1, 0.05) == 3
    assert daemon_oracle(trace, None, 0.05) == 4 == round(ceiling_hit_ratio(trace) * 7)
    assert daemon_oracle(trace, 1, 1.0) == 4  # one epoch: every re-reference may follow its (re)admission


def test_no_tiering_daemon_beats_the_daemon_oracle_and_the_replay_checks_it(shared_trace: list[Request]) -> None:
    """With long epochs the oracle is well below the ceiling; every daemon, the prefetching one included, stays
    within it, and simulate's bound checks list it for daemons (never for demand caches, which MIN bounds)."""
    from tieremu.workloads.bounds import check, daemon_oracle

    requests = shared_trace[:1500]
    refs = reference_count(requests)
    tiers = [SimTier("fast", 200), SimTier("slow", None)]
    oracle = daemon_oracle(requests, 200, 30.0) / refs
    assert oracle < 0.6 * ceiling_hit_ratio(requests)
    for name in ("lru-epoch", "hotcold", "lookahead"):
        result = simulate(requests, tiers, get_policy(name, {}, policy_context(requests, 30.0)), epoch_s=30.0)
        bounds = {b.bound: b for b in check(requests, tiers, result, epoch_s=30.0)}
        assert bounds["daemon-oracle"].limit == pytest.approx(oracle) and bounds["daemon-oracle"].within
        assert result.fast_hit_ratio <= oracle
    lru = simulate(requests, tiers, get_policy("lru", {}, policy_context(requests)))
    assert "daemon-oracle" not in {b.bound for b in check(requests, tiers, lru)}
