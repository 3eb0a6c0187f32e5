"""Batched access counting: an epoch's accesses aggregated per block (AccessCounts) with numpy, and the built-in
policies' observe_counts, which must leave every policy where a walk over the same events one by one leaves it.

The aggregation is checked against a dictionary walk written here; each ported policy is run twice over one
recorded access stream (one copy told event by event, one told the counts) and must plan the same moves and
choose the same victims at every epoch; the daemon's two paths are compared over a real cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tieremu.daemon.daemon import EventBatch, MigrationDaemon
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.numa.topology import discover
from tieremu.policy.base import AccessCounts, AccessEvent, Policy, RankedBlocks, TierState, observes_counts
from tieremu.policy.hotcold import HotCold
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve

REPO = Path(__file__).resolve().parents[1]
NAMES = ("fast", "mid", "slow")


class FakeView:
    """Three tiers with capacities; blocks placed by hand."""

    def __init__(self, capacities: Sequence[int | None]) -> None:
        self.capacity = dict(zip(NAMES, capacities, strict=True))
        self.where: dict[int, str] = {}

    @property
    def tiers(self) -> tuple[TierState, ...]:
        return tuple(TierState(n, i, self.capacity[n], sum(1 for t in self.where.values() if t == n))
                     for i, n in enumerate(NAMES))

    def tier_of(self, block: int) -> str | None:
        return self.where.get(block)

    def blocks_in(self, tier: str) -> Iterable[int]:
        return [b for b, t in self.where.items() if t == tier]

    def pinned(self, block: int) -> bool:
        return False


def textbook(events: Sequence[AccessEvent]) -> dict[int, tuple[int, int, int, str, str, int]]:
    """Per block: (count, first index, last index, first tier, last tier, last request), by a plain walk."""
    rows: dict[int, tuple[int, int, int, str, str, int]] = {}
    for i, e in enumerate(events):
        assert e.tier is not None
        count, first, _, first_tier, _, _ = rows.get(e.block, (0, i, i, e.tier, e.tier, e.request))
        rows[e.block] = (count + 1, first, i, first_tier, e.tier, e.request)
    return rows


def counts_of(events: Sequence[AccessEvent], layers: bool = False) -> AccessCounts:
    return AccessCounts.of(NAMES, events[0].time if events else 0.0, np.array([e.block for e in events], np.int64),
                           np.array([NAMES.index(e.tier or "") for e in events], np.int16),
                           np.array([e.request for e in events], np.int64),
                           np.array([e.layer for e in events], np.int32) if layers else None, events)


def test_counts_are_a_walk_over_the_events_aggregated_per_block() -> None:
    rng = random.Random(3)
    for n in (0, 1, 7, 500):
        events = [AccessEvent(rng.randrange(40), rng.choice(NAMES), 2.5, rng.randrange(5)) for _ in range(n)]
        counts = counts_of(events)
        want = textbook(events)
        got = {b: (k, f, la, NAMES[ft], NAMES[t], r) for b, k, f, la, ft, t, r in zip(
            counts.block.tolist(), counts.count.tolist(), counts.first.tolist(), counts.last.tolist(),
            counts.first_tier.tolist(), counts.tier.tolist(), counts.request.tolist(), strict=True)}
        assert got == want
        assert counts.last.tolist() == sorted(counts.last.tolist())  # rows in the order of their last access
        assert [counts.block[r] for r in counts.row.tolist()] == [e.block for e in events]
        assert len(counts) == len(want) and counts.accesses == n
        assert counts.last_time.tolist() == [2.5] * len(want)


def drive(name: str, params: dict[str, object], *, layers: int = 0, epochs: int = 60, seed: int = 0) -> int:
    """Two copies of a policy over one recorded stream, one told each event, one the counts: the same plans and
    victims at every epoch, and the same admissions. Returns how many moves and victims were compared."""
    rng = random.Random(seed)
    policies = [get_policy(name, params), get_policy(name, params)]
    assert observes_counts(policies[1])
    views = [FakeView((12, 20, None)), FakeView((12, 20, None))]
    layer_of: dict[int, int] = {}
    compared = 0
    next_block = 0
    for epoch in range(epochs):
        now = 0.05 * (epoch + 1)
        for _ in range(rng.randrange(1, 5)):  # new blocks
            admitted = [p.admit(next_block, v) for p, v in zip(policies, views, strict=True)]
            assert admitted[0] == admitted[1]
            for v in views:
                v.where[next_block] = admitted[0]
            layer_of[next_block] = rng.randrange(max(layers, 1))
            next_block += 1
        view = views[0]
        resident = list(view.where)
        hot = resident[: max(1, len(resident) // 4)]  # a skewed stream: some blocks read far more often
        reads = [rng.choice(hot) if rng.random() < 0.6 else rng.choice(resident) for _ in range(rng.randrange(0, 60))]
        events = [AccessEvent(b, view.where[b], now, rng.randrange(4), layer_of[b] if layers else None)
                  for b in reads]
        policies[0].observe(events)
        policies[1].observe_counts(counts_of(events, layers=bool(layers)))
        if layers:
            for p in policies:
                p.layer_started(epoch % layers)  # type: ignore[attr-defined]
        plans = [p.plan(v, now) for p, v in zip(policies, views, strict=True)]
        assert plans[0] == plans[1], f"epoch {epoch}"
        for move in plans[0].moves:
            for p, v in zip(policies, views, strict=True):
                if v.where.get(move.block) == move.source:
                    v.where[move.block] = move.target
                    p.moved(move.block, move.source, move.target)
            compared += 1
        for tier, below in (("fast", "mid"), ("mid", "slow")):
            if not any(t == tier for t in view.where.values()):
                continue
            victims = [p.victim(tier, v) for p, v in zip(policies, views, strict=True)]
            assert victims[0] == victims[1], f"epoch {epoch}, tier {tier}"
            for v in views:
                v.where[victims[0]] = below
            compared += 1
    return compared


@pytest.mark.parametrize(("name", "params", "layers"), [
    ("hotcold", {"quota": 6, "half_life_s": 0.2, "hysteresis": 0.5}, 0),
    ("hotcold", {"quota": 8}, 0),
    ("lru-epoch", {"promote_quota": 3}, 0),
    ("lru", {}, 0),
    ("lfu", {}, 0),
    ("lookahead", {}, 0),
    ("layerahead", {"quota": 4, "promote_quota": 2}, 3),
])
def test_a_policy_told_the_counts_plans_and_chooses_victims_as_one_told_each_event(
        name: str, params: dict[str, object], layers: int) -> None:
    assert drive(name, params, layers=layers) > 60


def test_hotcold_heat_from_counts_equals_the_per_event_sum_within_rounding() -> None:
    a, b = HotCold(half_life_s=0.5), HotCold(half_life_s=0.5)
    view = FakeView((10, 10, None))
    for block in range(6):
        view.where[block] = a.admit(block, view)
        b.admit(block, view)
    for t, reads in ((0.1, [0, 0, 0, 1, 2, 2]), (0.7, [0, 3, 3, 3, 3, 3, 3, 3]), (1.9, [5])):
        events = [AccessEvent(x, view.where[x], t, 0) for x in reads]
        a.observe(events)
        b.observe_counts(counts_of(events))
    for block in range(6):
        assert b.ranked.score(block) == pytest.approx(a.ranked.score(block), rel=1e-12, abs=1e-12)
    # k accesses at t are worth k * 2^(t / half_life): block 3's seven at 0.7 s
    assert a.ranked.score(3) == pytest.approx(np.log2(7 * 2 ** (0.7 / 0.5)))


def test_a_subclass_that_overrides_only_observe_keeps_getting_events() -> None:
    class Mine(HotCold):
        def observe(self, events: Sequence[AccessEvent]) -> None:
            super().observe(events)

    class Mine2(HotCold):
        def observe(self, events: Sequence[AccessEvent]) -> None:
            pass

        def observe_counts(self, counts: AccessCounts) -> None:
            pass

    assert observes_counts(HotCold()) and observes_counts(Mine2())
    assert not observes_counts(Mine())
    assert not observes_counts(get_policy("all-fastest"))  # observes nothing: its events are never built


# -- over a real cache ---------------------------------------------------------------------------------------------

@pytest.fixture
def make_cache(tmp_path: Path) -> Callable[..., TieredKVCache]:
    caches: list[TieredKVCache] = []
    path = tmp_path / "tiers.yaml"
    path.write_text(REPO.joinpath("configs/tiers/cxl-expander.yaml").read_text())
    resolved = resolve(load_tier_map(path), discover("/"))

    def make(kind: str = "all-layers") -> TieredKVCache:
        cache = TieredKVCache(resolved, KVLayout(2, 2, 64, 16, torch.float32, kind),
                              capacities={"dram": 6, "cxl": 10, "far": 40})
        caches.append(cache)
        return cache

    yield make  # type: ignore[misc]
    for cache in caches:
        cache.close()


def fill(cache: TieredKVCache, seqs: int, tokens: int) -> None:
    for seq in range(seqs):
        cache.add_sequence(seq, list(range(seq * 1000, seq * 1000 + tokens)))
        for layer in range(cache.layout.layers):
            cache.write(seq, layer, 0, torch.zeros(tokens, 2, 64), torch.zeros(tokens, 2, 64))


@pytest.mark.parametrize("kind", ["all-layers", "per-layer"])
def test_the_daemons_batch_counts_what_its_events_say(make_cache: Callable[..., TieredKVCache], kind: str) -> None:
    cache = make_cache(kind)
    fill(cache, 3, 40)
    rng = random.Random(1)
    for ident in ("id", "key") if kind == "all-layers" else ("id",):
        daemon = MigrationDaemon(cache, get_policy("hotcold"), ident=ident)
        for _ in range(4):
            for seq in rng.sample(range(3), 2):
                for layer in range(2):
                    cache.read(seq, layer)
            cache.end_step()
        batch = daemon._collect(3.0)
        assert isinstance(batch, EventBatch)
        counts, events = batch.counts(), list(batch)
        assert events and counts.accesses == len(events) and counts.time == 3.0
        want = textbook(events)
        assert {b: (k, la, tier_name(counts, t)) for b, k, la, t in zip(
            counts.block.tolist(), counts.count.tolist(), counts.last.tolist(), counts.tier.tolist(),
            strict=True)} == {b: (v[0], v[2], v[4]) for b, v in want.items()}
        if kind == "per-layer":
            assert counts.layer is not None
            assert dict(zip(counts.block.tolist(), counts.layer.tolist(), strict=True)) == \
                {e.block: e.layer for e in events}
        else:
            assert counts.layer is None


def tier_name(counts: AccessCounts, tier: int) -> str:
    return counts.tiers[tier]


def test_the_daemon_moves_the_same_blocks_on_either_path(make_cache: Callable[..., TieredKVCache]) -> None:
    class PerEvent(HotCold):  # the same policy, made to take the events one by one
        def observe(self, events: Sequence[AccessEvent]) -> None:
            super().observe(events)

    caches = [make_cache(), make_cache()]
    policies: list[Policy] = [HotCold(quota=4, half_life_s=0.05), PerEvent(quota=4, half_life_s=0.05)]
    daemons = [MigrationDaemon(c, p) for c, p in zip(caches, policies, strict=True)]
    assert daemons[0]._batched and not daemons[1]._batched
    for cache in caches:
        fill(cache, 4, 56)  # 16 blocks over dram 6, cxl 10
    rng = random.Random(5)
    moved = 0
    for epoch in range(12):
        seqs = [rng.choice((0, 1)) if rng.random() < 0.7 else rng.randrange(4) for _ in range(3)]
        for cache in caches:
            for seq in seqs:
                for layer in range(2):
                    cache.read(seq, layer)
                cache.end_step()
        outcomes = [d.epoch(now=0.02 * (epoch + 1)) for d in daemons]
        assert [(r.block, r.source, r.target) for r in outcomes[0].records] == \
            [(r.block, r.source, r.target) for r in outcomes[1].records]
        moved += outcomes[0].moved
    assert moved > 0
    for daemon in daemons:
        daemon.stop()


def test_ranked_blocks_set_many_ranks_as_set_one_by_one() -> None:
    rng = random.Random(7)
    one, many = RankedBlocks(track_highest=True), RankedBlocks(track_highest=True)
    view = FakeView((None, None, None))
    for _ in range(80):
        tier = rng.choice(NAMES)
        blocks = rng.sample(range(300), rng.randrange(0, 40))
        scores = [float(rng.randrange(6)) for _ in blocks]  # few values: ties are broken by stamps
        for block, score in zip(blocks, scores, strict=True):
            one.set(block, tier, score)
            view.where[block] = tier
        many.set_many(tier, blocks, scores)
    for tier in NAMES:
        for highest in (False, True):
            walks = []
            for ranked in (one, many):
                with ranked.walk(tier, view, highest=highest) as walk:
                    walks.append(list(iter(walk.next_block, None)))
            assert walks[0] == walks[1] and len(walks[0]) == sum(1 for t in view.where.values() if t == tier)
