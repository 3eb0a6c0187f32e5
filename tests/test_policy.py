"""Placement policies: the registry, and each policy's decisions against a hand-made view of the tiers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from tieremu.errors import PolicyError
from tieremu.policy import AccessEvent, Plan, Policy, PolicyContext, TierState, UpcomingRequest, get_policy, names
from tieremu.policy.base import RankedBlocks, first_unpinned
from tieremu.policy.registry import parameters


class FakeView:
    """Tiers fastest first with capacities; blocks placed by hand; pins set by hand."""

    def __init__(self, *capacities: int | None, names: Sequence[str] = ("fast", "mid", "slow")) -> None:
        self.names = tuple(names[: len(capacities)])
        self.capacity = dict(zip(self.names, capacities, strict=True))
        self.where: dict[int, str] = {}
        self.pins: set[int] = set()

    @property
    def tiers(self) -> tuple[TierState, ...]:
        return tuple(TierState(n, i, self.capacity[n], sum(1 for t in self.where.values() if t == n))
                     for i, n in enumerate(self.names))

    def tier_of(self, block: int) -> str | None:
        return self.where.get(block)

    def blocks_in(self, tier: str) -> Iterable[int]:
        return [b for b, t in self.where.items() if t == tier]

    def pinned(self, block: int) -> bool:
        return block in self.pins


def admit_all(policy: Policy, view: FakeView, blocks: Iterable[int], *, request: int = 0, time: float = 0.0) -> None:
    """Admit new blocks where the policy says (the view must have room) and let it observe their misses."""
    for block in blocks:
        view.where[block] = policy.admit(block, view)
    policy.observe([AccessEvent(b, None, time, request) for b in blocks])


def hit(policy: Policy, view: FakeView, blocks: Iterable[int], *, request: int = 0, time: float = 0.0) -> None:
    policy.observe([AccessEvent(b, view.where[b], time, request) for b in blocks])


# -- registry ---------------------------------------------------------------------------------------------------

def test_builtin_names() -> None:
    assert set(names()) == {"all-fastest", "all-slowest", "interleave", "split", "lru", "lfu", "lru-epoch",
                            "hotcold", "lookahead", "belady", "layerahead"}


def test_every_policy_names_its_family() -> None:
    families = {name: get_policy(name, {"fractions": [1.0]} if name == "split" else {},
                                 PolicyContext(future=[[1]])).family for name in names()}
    assert {n for n, f in families.items() if f == "demand"} == {"lru", "lfu", "belady"}
    assert {n for n, f in families.items() if f == "daemon"} == {"lru-epoch", "hotcold", "lookahead", "layerahead"}
    assert set(families.values()) <= {"demand", "daemon", "static"}


def test_unknown_policy_lists_the_valid_names() -> None:
    with pytest.raises(PolicyError, match="unknown policy 'lru2'; valid: all-fastest, all-slowest, belady"):
        get_policy("lru2")


def test_unknown_parameter_names_it_and_the_valid_ones() -> None:
    with pytest.raises(PolicyError, match="policy hotcold: unknown parameter 'quotas'; valid parameters: "
                                          "half_life_s, hysteresis, quota, target_util"):
        get_policy("hotcold", {"quotas": 3})
    with pytest.raises(PolicyError, match="policy lru-epoch: unknown parameter 'x'; valid parameters: promote_quota"):
        get_policy("lru-epoch", {"x": 1})
    with pytest.raises(PolicyError, match="policy lru: unknown parameter 'x'; valid parameters: none"):
        get_policy("lru", {"x": 1})


@pytest.mark.parametrize(("name", "params", "message"), [
    ("lru-epoch", {"promote_quota": "many"}, "parameter promote_quota='many' must be int"),
    ("lru-epoch", {"promote_quota": 1.5}, "parameter promote_quota=1.5 must be int"),
    ("lru-epoch", {"promote_quota": True}, "parameter promote_quota=True must be int"),
    ("lru-epoch", {"promote_quota": -1}, "promote_quota=-1 must be 0 or more"),
    ("hotcold", {"target_util": 1.5}, r"target_util=1.5 must be in \(0, 1\]"),
    ("split", {"fractions": ["a"]}, r"parameter fractions=\['a'\] must be"),
    ("split", {"fractions": [0.5, 0.6]}, "must be 0 or more and sum to 1"),
    ("split", {}, "parameter fractions is required"),
    ("lookahead", {"window": 0}, "window=0 must be 1 or more"),
])
def test_bad_parameter_values(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        get_policy(name, params)


def test_parameters_are_coerced_from_their_annotations() -> None:
    hotcold = get_policy("hotcold", {"target_util": 1, "quota": 3})
    assert hotcold.target_util == 1.0 and isinstance(hotcold.target_util, float) and hotcold.quota == 3
    assert get_policy("split", {"fractions": [1, 0]}).fractions == (1.0, 0.0)
    assert set(parameters(type(get_policy("lookahead")))) == {"window", "prefetch_quota", "promote_quota"}


class OwnFifo(Policy):
    """A user policy, loaded by name without touching the registry."""

    name = "own-fifo"

    def __init__(self, context: PolicyContext | None = None, *, depth: int = 1) -> None:
        super().__init__(context)
        self.depth = depth

    def admit(self, block: int, view: FakeView) -> str:  # type: ignore[override]
        return view.tiers[0].name

    def victim(self, tier: str, view: FakeView) -> int:  # type: ignore[override]
        return first_unpinned(view, tier)


def test_user_policy_by_module_and_class() -> None:
    policy = get_policy("test_policy:OwnFifo", {"depth": 3})
    assert type(policy).__name__ == "OwnFifo" and policy.depth == 3  # type: ignore[attr-defined]
    with pytest.raises(PolicyError, match="unknown parameter 'width'; valid parameters: depth"):
        get_policy("test_policy:OwnFifo", {"width": 3})


@pytest.mark.parametrize(("name", "message"), [
    ("no_such_module_here:Thing", "cannot import module 'no_such_module_here'"),
    ("test_policy:FakeView", "test_policy has no Policy subclass named 'FakeView'"),
    ("tieremu.policy.recency:DemotionChain", "leaves abstract methods unimplemented: admitted_score"),
])
def test_user_policy_errors(name: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        get_policy(name)


def test_belady_needs_the_future() -> None:
    with pytest.raises(PolicyError, match="belady is offline: it needs the future reference stream"):
        get_policy("belady")


# -- static placements --------------------------------------------------------------------------------------------

def test_bounds_fill_one_end_and_lift_capacity() -> None:
    view = FakeView(1, 1)
    assert get_policy("all-fastest").admit(1, view) == "fast"
    assert get_policy("all-slowest").admit(1, view) == "mid"
    assert get_policy("all-fastest").lifts_capacity and get_policy("all-slowest").lifts_capacity
    assert not get_policy("lru").lifts_capacity
    assert get_policy("all-fastest").plan(view, 0.0) == Plan()


def test_interleave_takes_turns_and_skips_full_tiers() -> None:
    view = FakeView(2, None, None)
    policy = get_policy("interleave")
    admit_all(policy, view, range(9))
    placed = [view.where[b] for b in range(9)]
    assert placed[:6] == ["fast", "mid", "slow", "fast", "mid", "slow"]
    assert placed[6:] == ["mid", "slow", "mid"]  # fast is full: its turns pass on


def test_split_follows_its_vector() -> None:
    view = FakeView(None, None, None)
    policy = get_policy("split", {"fractions": [0.2, 0.3, 0.5]})
    admit_all(policy, view, range(1000))
    counts = {n: sum(1 for t in view.where.values() if t == n) for n in view.names}
    assert counts == {"fast": 200, "mid": 300, "slow": 500}


def test_split_spills_when_a_tier_is_full_and_checks_its_length() -> None:
    view = FakeView(10, None)
    policy = get_policy("split", {"fractions": [0.5, 0.5]})
    admit_all(policy, view, range(100))
    assert sum(1 for t in view.where.values() if t == "fast") == 10
    with pytest.raises(PolicyError, match="fractions has 2 entries but there are 3 tiers"):
        get_policy("split", {"fractions": [0.5, 0.5]}).admit(1, FakeView(1, 1, 1))


# -- LRU / LFU ------------------------------------------------------------------------------------------------------

def test_lru_epoch_admits_to_the_fastest_with_room() -> None:
    view = FakeView(2, 2, None)
    policy = get_policy("lru-epoch")
    admit_all(policy, view, [1, 2, 3, 4, 5])
    assert [view.where[b] for b in (1, 2, 3, 4, 5)] == ["fast", "fast", "mid", "mid", "slow"]
    full = FakeView(1)
    full.where[9] = "fast"
    assert get_policy("lru-epoch").admit(10, full) == "fast"  # nowhere has room: the fastest, pushing a victim down


def test_demand_caches_admit_to_the_fastest_always() -> None:
    for name in ("lru", "lfu"):
        view = FakeView(2, None)
        view.where.update({1: "fast", 2: "fast", 3: "mid"})
        policy = get_policy(name)
        assert policy.admit(4, view) == "fast" and policy.admit(3, view) == "fast"  # a miss, a slow hit
        assert policy.plan(view, 1.0).moves == []  # demand caches never plan


def test_lru_victim_is_least_recent_and_never_pinned() -> None:
    view = FakeView(4, None)
    policy = get_policy("lru")
    admit_all(policy, view, [1, 2, 3, 4])
    hit(policy, view, [1, 3])
    assert policy.victim("fast", view) == 2  # recency: 2 < 4 < 1 < 3
    view.where[2] = "mid"  # the driver carried it down
    view.pins = {4}
    assert policy.victim("fast", view) == 1


def test_lru_victims_in_order_with_driver_moves() -> None:
    view = FakeView(3, None)
    policy = get_policy("lru")
    admit_all(policy, view, [1, 2, 3])
    hit(policy, view, [2, 1])  # recency now 3 < 2 < 1
    order = []
    for _ in range(3):
        block = policy.victim("fast", view)
        order.append(block)
        view.where[block] = "mid"
    assert order == [3, 2, 1]
    assert policy.victim("mid", view) == 3  # filed under the tier below, keeping its recency


def test_lfu_victim_is_least_frequent_ties_by_age() -> None:
    view = FakeView(3, None)
    policy = get_policy("lfu")
    admit_all(policy, view, [1, 2, 3])
    hit(policy, view, [1, 1, 3])
    assert policy.victim("fast", view) == 2
    view.where[2] = "mid"
    hit(policy, view, [2, 2, 2])  # a hit in the slow tier counts too
    assert policy.victim("fast", view) == 3


def test_lru_epoch_promotes_slow_hits_latest_first_within_quota() -> None:
    view = FakeView(10, None)
    policy = get_policy("lru-epoch", {"promote_quota": 2})
    admit_all(policy, view, [1])
    for b in (5, 6, 7):
        view.where[b] = "mid"
    hit(policy, view, [5, 6, 7, 1])
    plan = policy.plan(view, 1.0)
    assert [(m.block, m.source, m.target, m.reason) for m in plan.moves] == [(7, "mid", "fast", "promote"),
                                                                            (6, "mid", "fast", "promote")]
    assert policy.plan(view, 2.0).moves == []  # hits are promoted at the next epoch or not at all


def test_lru_epoch_without_quota_never_promotes() -> None:
    view = FakeView(10, None)
    policy = get_policy("lru-epoch", {"promote_quota": 0})
    view.where[5] = "mid"
    hit(policy, view, [5])
    assert policy.plan(view, 1.0).moves == []


# -- hot/cold -------------------------------------------------------------------------------------------------------

def test_hotcold_admits_up_to_its_target_then_below() -> None:
    view = FakeView(10, None)
    policy = get_policy("hotcold", {"target_util": 0.5})
    admit_all(policy, view, range(8))
    assert [view.where[b] for b in range(8)] == ["fast"] * 5 + ["mid"] * 3


def test_hotcold_sheds_the_coldest_above_target_within_quota() -> None:
    view = FakeView(4, None)
    policy = get_policy("hotcold", {"target_util": 0.5, "quota": 1})
    for b in range(4):
        view.where[b] = "fast"
    hit(policy, view, [0, 1, 3], time=0.0)
    hit(policy, view, [2], time=-100.0)  # long ago: the coldest
    plan = policy.plan(view, 1.0)
    assert [(m.block, m.target, m.reason) for m in plan.moves] == [(2, "mid", "demote")]


def test_hotcold_exchanges_only_clearly_hotter_blocks() -> None:
    view = FakeView(2, None)
    policy = get_policy("hotcold", {"target_util": 1.0, "quota": 8, "half_life_s": 1.0, "hysteresis": 1.0})
    view.where.update({1: "fast", 2: "fast", 3: "mid", 4: "mid"})
    hit(policy, view, [1, 2], time=10.0)
    hit(policy, view, [3], time=10.5)  # hotter, but by less than a factor 2: stays
    hit(policy, view, [4, 4, 4, 4], time=11.0)  # far hotter: swaps with the coldest
    moves = [(m.block, m.source, m.target, m.reason) for m in policy.plan(view, 11.0).moves]
    assert moves[:2] == [(1, "fast", "mid", "demote"), (4, "mid", "fast", "promote")]
    assert len(moves) == 2


def test_hotcold_fills_up_to_target_from_below() -> None:
    view = FakeView(4, None)
    policy = get_policy("hotcold", {"target_util": 0.5})
    view.where.update({1: "mid", 2: "mid", 3: "mid"})
    hit(policy, view, [1], time=1.0)
    hit(policy, view, [2, 2], time=1.0)
    hit(policy, view, [3], time=0.0)
    moves = [(m.block, m.reason) for m in policy.plan(view, 2.0).moves]
    assert moves == [(2, "promote"), (1, "promote")]


# -- look-ahead -------------------------------------------------------------------------------------------------------

def test_lookahead_prefetches_upcoming_blocks_and_spares_them() -> None:
    view = FakeView(3, None)
    policy = get_policy("lookahead", {"prefetch_quota": 2, "window": 2})
    admit_all(policy, view, [1, 2, 3], request=0)
    view.where.update({7: "mid", 8: "mid", 9: "mid"})
    policy.upcoming([UpcomingRequest(1, 1.0, (1, 7)), UpcomingRequest(2, 2.0, (8, 9)),
                     UpcomingRequest(3, 3.0, (2,))])
    plan = policy.plan(view, 0.5)
    assert [(m.block, m.reason) for m in plan.moves] == [(7, "prefetch"), (8, "prefetch")]
    assert policy.victim("fast", view) == 2  # 1 is the oldest but wanted next; 3 is newer than 2
    hit(policy, view, [1, 7], request=1)
    # Request 1 was served: what is left to prefetch is request 2's; 7 was hit in mid, so LRU promotes it.
    assert [(m.block, m.reason) for m in policy.plan(view, 1.5).moves] == [(8, "prefetch"), (9, "prefetch"),
                                                                          (7, "promote")]


# -- Belady -----------------------------------------------------------------------------------------------------------

def belady(future: Sequence[Sequence[int]], **params: object) -> Policy:
    return get_policy("belady", params, PolicyContext(future=future))


def test_belady_pushes_out_the_block_used_farthest_ahead() -> None:
    future = [[1, 2, 3], [4], [2], [3], [1]]
    view = FakeView(3, None)
    policy = belady(future)
    policy.upcoming([UpcomingRequest(0, 0.0, (1, 2, 3))])
    admit_all(policy, view, [1, 2, 3], request=0)
    policy.upcoming([UpcomingRequest(1, 1.0, (4,))])
    assert policy.victim("fast", view) == 1  # used again at request 4, after 2 (at 2) and 3 (at 3)


def test_belady_bypasses_a_block_used_later_than_everything_resident() -> None:
    future = [[1, 2], [3], [1], [2], [3]]
    view = FakeView(2, None)
    policy = belady(future)
    policy.upcoming([UpcomingRequest(0, 0.0, (1, 2))])
    admit_all(policy, view, [1, 2], request=0)
    policy.upcoming([UpcomingRequest(1, 1.0, (3,))])
    assert policy.admit(3, view) == "mid"  # next used at 4; both residents are needed sooner


def test_belady_promotes_a_slow_hit_only_if_needed_sooner_than_the_farthest_fast_block() -> None:
    # Positions in the flattened stream: 1@0 2@1 3@2 3@3 then 3@4 1@5 2@6 (first future) or 1@4 2@5 3@6 (second).
    for future, expected in (([[1, 2], [3], [3], [3], [1], [2]], "fast"), ([[1, 2], [3], [3], [1], [2], [3]], "mid")):
        view = FakeView(2, None)
        policy = belady(future)
        policy.upcoming([UpcomingRequest(0, 0.0, (1, 2))])
        admit_all(policy, view, [1, 2], request=0)
        view.where[3] = "mid"
        policy.upcoming([UpcomingRequest(2, 2.0, (3,))])  # 3 is hit in mid at position 3
        assert policy.admit(3, view) == expected, future
        assert policy.plan(view, 2.5).moves == []  # no epoch moves: MIN moves only on access


def test_lru_epoch_files_a_promoted_block_under_its_new_tier() -> None:
    """Regression (the ghost-block bug): a block promoted by a plan stayed filed under its old tier, so it was
    never a victim of the fast tier until referenced again."""
    view = FakeView(None, None)
    policy = get_policy("lru-epoch", {"promote_quota": 10})
    admit_all(policy, view, [1, 2])
    view.where[3] = "mid"
    hit(policy, view, [3])
    [move] = policy.plan(view, 1.0).moves
    view.where[3] = "fast"
    policy.moved(move.block, move.source, move.target)  # what every driver reports after carrying a move out
    hit(policy, view, [1, 2])  # 3 is now the least recently used block of the fast tier
    assert policy.victim("fast", view) == 3


# -- ranking bookkeeping ----------------------------------------------------------------------------------------------

def test_ranked_blocks_follow_moves_they_were_not_told_about() -> None:
    view = FakeView(None, None)
    ranked = RankedBlocks(track_highest=True)
    for block, score in ((1, 5.0), (2, 1.0), (3, 3.0)):
        view.where[block] = "fast"
        ranked.set(block, "fast", score)
    view.where[2] = "mid"  # moved behind its back
    assert ranked.lowest("fast", view) == 3
    assert ranked.tier(2) == "mid" and ranked.lowest("mid", view) == 2
    del view.where[1]  # gone
    assert ranked.highest("fast", view) == 3 and 1 not in ranked
    view.pins = {3}
    assert ranked.lowest("fast", view) is None and ranked.lowest("mid", view) == 2


def test_ranked_blocks_survive_heap_rebuilds() -> None:
    view = FakeView(None)
    ranked = RankedBlocks(track_highest=True)
    for block in range(50):
        view.where[block] = "fast"
    for step in range(5000):  # many re-scores: stale heap entries pile up and are rebuilt away
        ranked.set(step % 50, "fast", float(step))
    assert ranked.lowest("fast", view) == (5000 - 50) % 50
    assert ranked.highest("fast", view) == 4999 % 50
    with ranked.walk("fast", view) as walk:
        seen = [walk.next_block() for _ in range(50)]
    assert sorted(seen) == list(range(50)) and ranked.lowest("fast", view) == 0


def test_first_unpinned_refuses_an_all_pinned_tier() -> None:
    view = FakeView(2)
    view.where.update({1: "fast", 2: "fast"})
    view.pins = {1, 2}
    with pytest.raises(PolicyError, match="tier 'fast' holds no unpinned block"):
        first_unpinned(view, "fast")
