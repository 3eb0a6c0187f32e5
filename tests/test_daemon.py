"""The migration daemon over the tiered KV cache: the view policies read, the executor's choices (victims, budget,
skips), what kernels answer (EBUSY, ENOMEM, pages that moved on their own), thousands of migrations under
concurrent reads with every block checksummed, the GIL left free during migrations, and layer-ahead prefetch.

Kernel answers are tested twice: on this machine through the pool's real page-migration path over a stand-in
kernel with three nodes (FakeNodes: pages are where move_pages last put them), and inside the multi-node QEMU
guest (marked numa_vm) against the real kernel, with EBUSY and ENOMEM injected into move_pages.
"""

from __future__ import annotations

import ctypes
import errno
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from tieremu.daemon.daemon import MigrationDaemon
from tieremu.daemon.executor import PlanOutcome, execute_plan
from tieremu.daemon.view import PoolView
from tieremu.errors import ConfigError, NodeFullError, PolicyError, TieremuError
from tieremu.kv.arena import NumaArena
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.pool import Block
from tieremu.numa import syscalls
from tieremu.numa.pages import page_addresses
from tieremu.numa.topology import discover
from tieremu.policy.base import AccessEvent, BlockView, Move, Plan, Policy, first_unpinned
from tieremu.policy.layerahead import LayerAhead
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.region import allocate
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.llama import LlamaModel, preset, with_overrides

REPO = Path(__file__).resolve().parents[1]
BT = 16  # tokens per block in most tests: 2 layers x 2 heads x 64 dims x fp32 x K,V = 32 KiB, 8 pages


def tier_map(tmp_path: Path, *, calibration: Calibration | None = None) -> ResolvedTierMap:
    """dram, cxl, far on nodes 0, 1, 2 where they exist (the QEMU guest), emulated on node 0 where not."""
    path = tmp_path / "tiers.yaml"
    path.write_text(REPO.joinpath("configs/tiers/cxl-expander.yaml").read_text())
    return resolve(load_tier_map(path), discover("/"), calibration=calibration)


def layout(kind: str = "all-layers", layers: int = 2) -> KVLayout:
    return KVLayout(layers=layers, kv_heads=2, head_dim=64, block_tokens=BT, dtype=torch.float32, layout=kind)


@pytest.fixture
def make_cache(tmp_path: Path) -> Iterator[Callable[..., TieredKVCache]]:
    caches: list[TieredKVCache] = []

    def make(dram: int, cxl: int, far: int, *, kind: str = "all-layers", layers: int = 2,
             injector: DelayInjector | None = None, resolved: ResolvedTierMap | None = None) -> TieredKVCache:
        cache = TieredKVCache(resolved or tier_map(tmp_path), layout(kind, layers),
                              capacities={"dram": dram, "cxl": cxl, "far": far}, injector=injector)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def fill(cache: TieredKVCache, ref: ContiguousKV, seq: int, n: int, tokens: Sequence[int] | None = None) -> None:
    """A sequence of n positions with seeded content, in the cache and in the contiguous reference."""
    cache.add_sequence(seq, tokens or ())
    g = torch.Generator().manual_seed(seq)
    for layer in range(cache.layout.layers):
        k, v = torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
        cache.write(seq, layer, 0, k, v)
        ref.write(seq, layer, 0, k, v)


def reference() -> ContiguousKV:
    return ContiguousKV(2, 2, 64, max_len=1024)


def intact(cache: TieredKVCache, ref: ContiguousKV, seqs: Sequence[int]) -> bool:
    return all(torch.equal(a, b) for seq in seqs for layer in range(cache.layout.layers)
               for a, b in zip(cache.read(seq, layer), ref.read(seq, layer), strict=True))


def blocks_of(cache: TieredKVCache, seq: int) -> list[Block]:
    return list(cache.seqs[seq].tables[0])


def consistent(cache: TieredKVCache) -> None:
    """The pool's books agree with its blocks: per-tier counts, and no two blocks in one slot."""
    pool = cache.pool
    for tier in pool.order:
        assert pool.used(tier) == sum(1 for b in pool.blocks.values() if b.tier == tier), tier
        assert pool.used(tier) <= pool.capacity[tier], tier
    slots = [(b.arena, b.slot) for b in pool.blocks.values()]
    assert len(set(slots)) == len(slots)


class Scripted(Policy):
    """Plans what it is told; victims are the oldest unpinned block (or what `victims` says). Records what the view
    showed whenever it was asked for a victim."""

    name = "scripted"

    def __init__(self, plan: Plan | None = None, victims: Sequence[int] = ()) -> None:
        super().__init__()
        self.next_plan = plan or Plan()
        self.victims = list(victims)
        self.asked: list[dict[str, object]] = []
        self.events: list[AccessEvent] = []

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name

    def observe(self, events: Sequence[AccessEvent]) -> None:
        self.events.extend(events)

    def victim(self, tier: str, view: BlockView) -> int:
        self.asked.append({"tier": tier, "used": {t.name: t.used_blocks for t in view.tiers},
                           "members": list(view.blocks_in(tier)),
                           "pinned": [b for b in view.blocks_in(tier) if view.pinned(b)]})
        return self.victims.pop(0) if self.victims else first_unpinned(view, tier)

    def plan(self, view: BlockView, now: float) -> Plan:
        plan, self.next_plan = self.next_plan, Plan()
        return plan


# -- the view ---------------------------------------------------------------------------------------------------

def test_the_view_shows_tiers_blocks_and_pins_as_policies_expect(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 2, 4)
    ref = reference()
    fill(cache, ref, 0, 5 * BT)  # 5 blocks: dram 2, cxl 2, far 1
    view = PoolView(cache)
    blocks = blocks_of(cache, 0)
    assert [(t.name, t.rank, t.capacity_blocks, t.used_blocks) for t in view.tiers] == \
        [("dram", 0, 2, 2), ("cxl", 1, 2, 2), ("far", 2, 4, 1)]
    assert list(view.blocks_in("cxl")) == [blocks[2].id, blocks[3].id]
    assert view.tier_of(blocks[4].id) == "far" and view.tier_of(10_000) is None
    assert view.block(blocks[0].id) is blocks[0]
    view.pin([blocks[0].id])
    assert view.pinned(blocks[0].id) and not view.pinned(blocks[1].id)
    view.unpin()
    assert not view.pinned(blocks[0].id)
    with pytest.raises(ConfigError, match="valid: id, key"):
        PoolView(cache, ident="hash")


def test_the_view_by_key_names_blocks_by_their_prefix_hash(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(4, 4, 4)
    fill(cache, reference(), 0, 2 * BT + 5, tokens=list(range(2 * BT + 5)))  # 2 keyed blocks and a private tail
    view = PoolView(cache, ident="key")
    keys = cache.seqs[0].keys
    assert list(view.blocks_in("dram")) == keys  # the keyless tail is not shown...
    assert view.tiers[0].used_blocks == 3  # ...though it takes a slot
    assert view.block(keys[1]) is blocks_of(cache, 0)[1]
    per_layer = make_cache(4, 4, 4, kind="per-layer")
    with pytest.raises(ConfigError, match="needs the all-layers layout"):
        PoolView(per_layer, ident="key")


# -- epochs: from the access log to the policy -------------------------------------------------------------------

def test_an_epoch_hands_the_policy_each_block_read_once_per_step(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 8, 8)
    ref = reference()
    fill(cache, ref, 0, 3 * BT)  # dram, dram, cxl
    fill(cache, ref, 1, BT)  # cxl
    policy = Scripted()
    daemon = MigrationDaemon(cache, policy)
    for _ in range(2):  # two steps, each reading both layers of both sequences
        for seq in (0, 1):
            for layer in (0, 1):
                cache.read(seq, layer)
        cache.end_step()
    daemon.epoch(now=5.0)
    b = [x.id for x in blocks_of(cache, 0)] + [blocks_of(cache, 1)[0].id]
    # All-layers blocks: reading layers 0 and 1 in one step is one access of the block.
    assert [(e.block, e.tier, e.request, e.layer, e.time) for e in policy.events] == [
        (b[0], "dram", 0, None, 5.0), (b[1], "dram", 0, None, 5.0), (b[2], "cxl", 0, None, 5.0),
        (b[3], "cxl", 1, None, 5.0)] * 2
    daemon.epoch()
    assert len(policy.events) == 8  # nothing read since: nothing new

    class Keeps(Scripted):  # looks at its events only later, after the workload has read on
        def observe(self, events: Sequence[AccessEvent]) -> None:
            self.kept = events

    keeper = Keeps()
    daemon = MigrationDaemon(cache, keeper)
    cache.read(1, 0)
    daemon.epoch()
    cache.read(0, 0)
    assert [(e.block, e.request) for e in keeper.kept] == [(b[3], 1)]  # this epoch's read, not the later one
    daemon.epoch()
    assert [(e.block, e.request) for e in keeper.kept] == [(b[0], 0), (b[1], 0), (b[2], 0)]

    per_layer = make_cache(8, 8, 8, kind="per-layer")
    fill(per_layer, reference(), 0, 2 * BT)
    recorder = Scripted()
    daemon = MigrationDaemon(per_layer, recorder)
    per_layer.read(0, 1)
    daemon.epoch()
    assert [(e.block, e.layer) for e in recorder.events] == [(x.id, 1) for x in per_layer.seqs[0].tables[1]]


# -- the executor: victims, room, skips, budget -------------------------------------------------------------------

def test_a_promotion_into_a_full_tier_swaps_with_a_victim_chosen_while_the_newcomer_shows_there(
        make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 2, 0)
    ref = reference()
    fill(cache, ref, 0, 4 * BT)  # b0 b1 in dram, b2 b3 in cxl: both full
    b0, b1, b2, b3 = (x.id for x in blocks_of(cache, 0))
    policy = Scripted(Plan([Move(b2, "cxl", "dram", "promote")]))
    outcome = MigrationDaemon(cache, policy).epoch()
    # When asked, the policy saw the newcomer in dram already (one over), pinned, and gone from cxl.
    assert policy.asked == [{"tier": "dram", "used": {"dram": 3, "cxl": 1, "far": 0}, "members": [b0, b1, b2],
                             "pinned": [b2]}]
    assert (outcome.moved, outcome.skipped, outcome.failed) == (2, 0, 0)
    assert [(r.block, r.source, r.target) for r in outcome.records] == [(b0, "dram", "cxl"), (b2, "cxl", "dram")]
    assert {x.id: x.tier for x in blocks_of(cache, 0)} == {b0: "cxl", b1: "dram", b2: "dram", b3: "cxl"}
    assert outcome.bytes == 2 * cache.layout.block_bytes
    consistent(cache)
    assert intact(cache, ref, [0])


def test_a_demotion_chain_ends_in_an_eviction_only_of_an_unused_block(
        make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(1, 1, 1)
    ref = reference()
    fill(cache, ref, 0, 3 * BT, tokens=list(range(3 * BT)))  # keyed: dram, cxl, far
    b0, b1, b2 = (x.id for x in blocks_of(cache, 0))
    # While a sequence uses every block, the chain would have to drop one it needs: skipped, nothing moved.
    outcome = execute_plan(cache, Plan([Move(b0, "dram", "cxl", "demote")]), PoolView(cache), policy=Scripted())
    assert (outcome.moved, outcome.skipped, outcome.reasons) == (0, 1, {"victim_in_use": 1})
    assert [x.tier for x in blocks_of(cache, 0)] == ["dram", "cxl", "far"]
    cache.free_sequence(0)  # now they are cached prefixes nobody reads
    outcome = execute_plan(cache, Plan([Move(b0, "dram", "cxl", "demote")]), PoolView(cache), policy=Scripted())
    assert (outcome.moved, outcome.evicted, outcome.skipped) == (2, 1, 0)
    assert b2 not in cache.pool.blocks
    assert cache.pool.blocks[b0].tier == "cxl" and cache.pool.blocks[b1].tier == "far"
    consistent(cache)


def test_moves_that_cannot_start_are_skipped_with_their_reason(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 2, 4)
    ref = reference()
    fill(cache, ref, 0, 5 * BT)  # dram b0 b1, cxl b2 b3, far b4
    fill(cache, ref, 1, BT, tokens=list(range(100, 100 + BT)))  # far, keyed
    b0, b1, b2, b3, b4 = (x.id for x in blocks_of(cache, 0))
    cached = blocks_of(cache, 1)[0].id
    cache.free_sequence(1)
    view = PoolView(cache)
    view.pin([b3])
    plan = Plan([
        Move(99_999, "far", "cxl", "promote"),  # no such block (freed by the workload)
        Move(b3, "cxl", "dram", "promote"),  # pinned
        Move(b0, "cxl", "far", "demote"),  # it is in dram, not where the policy thought
        Move(b2, "dram", "cxl", "demote"),  # already on its target
    ], evictions=[b1, 99_998, cached])
    outcome = execute_plan(cache, plan, view, policy=Scripted())
    assert outcome.reasons == {"gone": 2, "pinned": 1, "not_in_source": 1, "already_there": 1, "in_use": 1}
    assert (outcome.skipped, outcome.evicted, outcome.moved) == (6, 1, 0)
    assert cached not in cache.pool.blocks
    # A full tier whose blocks are all pinned takes nobody; without a policy to ask, a full tier takes nobody.
    view.pin([b0, b1])
    outcome = execute_plan(cache, Plan([Move(b4, "far", "dram", "promote")]), view, policy=Scripted())
    assert outcome.reasons == {"full": 1}
    view.unpin()
    outcome = execute_plan(cache, Plan([Move(b4, "far", "dram", "promote")]), view)
    assert outcome.reasons == {"full": 1}
    assert intact(cache, ref, [0])
    consistent(cache)


def test_a_plan_or_victim_that_breaks_the_rules_is_a_policy_error(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 2, 4)
    fill(cache, reference(), 0, 4 * BT)
    b0, _, b2, b3 = (x.id for x in blocks_of(cache, 0))
    view = PoolView(cache)
    with pytest.raises(PolicyError, match="named tier 'hbm'; tiers: dram, cxl, far"):
        execute_plan(cache, Plan([Move(b2, "cxl", "hbm", "promote")]), view)
    with pytest.raises(PolicyError, match="promote and prefetch go to a faster tier"):
        execute_plan(cache, Plan([Move(b0, "dram", "cxl", "promote")]), view)
    with pytest.raises(PolicyError, match="valid: promote, demote, prefetch"):
        execute_plan(cache, Plan([Move(b0, "dram", "cxl", "evict")]), view)
    with pytest.raises(PolicyError, match=f"chose block {b3} as the victim of tier dram, but it is in cxl"):
        execute_plan(cache, Plan([Move(b2, "cxl", "dram", "promote")]), view, policy=Scripted(victims=[b3]))
    assert [x.tier for x in blocks_of(cache, 0)] == ["dram", "dram", "cxl", "cxl"]  # nothing moved


def test_the_byte_budget_stops_the_moves_and_the_daemon_keeps_its_rate(
        make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(8, 8, 8)
    ref = reference()
    fill(cache, ref, 0, 8 * BT)  # all in dram
    block = cache.layout.block_bytes
    ids = [x.id for x in blocks_of(cache, 0)]
    plan = Plan([Move(b, "dram", "far", "demote") for b in ids[:6]])
    outcome = execute_plan(cache, plan, PoolView(cache), budget_bytes=int(2.5 * block))
    assert (outcome.moved, outcome.bytes, outcome.skipped, outcome.reasons) == (3, 3 * block, 3, {"budget": 3})

    class DemoteAll(Scripted):
        def plan(self, view: BlockView, now: float) -> Plan:
            return Plan([Move(b, "dram", "far", "demote") for b in view.blocks_in("dram")])

    other = make_cache(16, 8, 16)
    fill(other, reference(), 0, 16 * BT)
    epoch_s = 0.01
    gbps = 1.5 * block / epoch_s / 1e9  # one and a half blocks per epoch
    daemon = MigrationDaemon(other, DemoteAll(), epoch_s=epoch_s, budget_gbps=gbps)
    moved = [daemon.epoch(now=100.0 + i * epoch_s).moved for i in range(6)]
    # Whole blocks move: an epoch that overshoots is paid back by the next, so the rate holds over time.
    assert moved == [2, 1, 2, 1, 2, 1]
    assert sum(moved) * block <= gbps * 1e9 * 6 * epoch_s + block


# -- what kernels answer -------------------------------------------------------------------------------------------

class FakeNodes:
    """A stand-in kernel with three nodes on a one-node machine, for the pool's page-migration path: every page is
    on the node of the arena it was born in until move_pages puts it elsewhere. Data never really moves."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cache: TieredKVCache) -> None:
        self.node_of_tier = {"dram": 0, "cxl": 1, "far": 2}
        self.homes = [(a.region.addr, a.region.nbytes, self.node_of_tier[name])
                      for name, a in cache.pool.arenas.items() if isinstance(a, NumaArena)]
        self.where: dict[int, int] = {}
        monkeypatch.setattr(syscalls, "mbind", lambda *args, **kwargs: None)
        monkeypatch.setattr(syscalls, "move_pages", self.move_pages)
        monkeypatch.setattr(syscalls, "query_pages", self.query_pages)
        monkeypatch.setattr(cache.pool, "numa_node", self.node_of_tier.__getitem__)

    def home(self, page: int) -> int:
        return next(node for addr, size, node in self.homes if addr <= page < addr + size)

    def query_pages(self, pages: np.ndarray, pid: int = 0) -> np.ndarray:
        return np.array([self.where.get(int(p), self.home(int(p))) for p in pages], dtype=np.int32)

    def move_pages(self, pages: np.ndarray, node: int, pid: int = 0, **kwargs: object) -> np.ndarray:
        for page in pages:
            self.where[int(page)] = node
        return np.full(len(pages), node, dtype=np.int32)


@dataclass
class Kernel:
    """A cache whose dram and cxl tiers sit on different nodes (fake or real), with faults injected into
    move_pages: each call takes the next answer from `script` ("ok", "ebusy", "enomem": half the pages move and
    the rest get that errno; "nodefull": the call fails with ENOMEM)."""

    cache: TieredKVCache
    ref: ContiguousKV
    script: list[str] = field(default_factory=list)
    calls: int = 0

    def pages(self, block: Block) -> np.ndarray:
        return page_addresses(self.cache.pool.arenas[block.arena].addr(block.slot), self.cache.layout.block_bytes)

    def nodes(self, block: Block) -> set[int]:
        return set(syscalls.query_pages(self.pages(block)).tolist())

    def node(self, tier: str) -> int:
        return self.cache.pool.numa_node(tier)


def _flaky(kernel: Kernel, real: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def move_pages(pages: np.ndarray, node: int, pid: int = 0, **kwargs: object) -> np.ndarray:
        kernel.calls += 1
        answer = kernel.script.pop(0) if kernel.script else "ok"
        if answer == "nodefull":
            raise NodeFullError(f"move_pages(to node {node}) failed: not enough free memory", call="move_pages",
                                errno=errno.ENOMEM, nodes=(node,))
        if answer == "ok" or len(pages) < 2:
            return real(pages, node, pid, **kwargs)
        half = len(pages) // 2
        status = np.empty(len(pages), dtype=np.int32)
        status[:half] = real(pages[:half], node, pid, **kwargs)
        status[half:] = -errno.EBUSY if answer == "ebusy" else -errno.ENOMEM
        return status
    return move_pages


@pytest.fixture(params=[pytest.param("fake", id="fake-nodes"),
                        pytest.param("vm", id="vm", marks=pytest.mark.numa_vm)])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           make_cache: Callable[..., TieredKVCache]) -> Kernel:
    cache = make_cache(4, 4, 4)
    ref = reference()
    fill(cache, ref, 0, 4 * BT)  # 4 blocks in dram
    if request.param == "vm":
        if not {0, 1, 2} <= set(discover("/").memory_nodes):
            pytest.skip("needs memory nodes 0, 1 and 2 (the guest of configs/vm/cxl-3node.yaml)")
        real = syscalls.move_pages
    else:
        real = FakeNodes(monkeypatch, cache).move_pages
    kernel = Kernel(cache, ref)
    monkeypatch.setattr(syscalls, "move_pages", _flaky(kernel, real))
    return kernel


def demote_first(kernel: Kernel, *, retries: int = 3) -> tuple[Block, PlanOutcome]:
    block = blocks_of(kernel.cache, 0)[0]
    plan = Plan([Move(block.id, "dram", "cxl", "demote")])
    return block, execute_plan(kernel.cache, plan, PoolView(kernel.cache), retries=retries)


def test_ebusy_pages_are_tried_again_and_the_move_completes(kernel: Kernel) -> None:
    kernel.script = ["ebusy"]
    block, outcome = demote_first(kernel)
    assert (outcome.moved, outcome.failed, outcome.retried) == (1, 0, 1)
    first, second = outcome.records
    # Half the pages moved; the busy half, asked again, is still on dram's node.
    assert first.kind == "migrate" and not first.ok and first.pages_moved == 4
    assert first.pages_failed == {f"on node {kernel.node('dram')}": 4}
    assert second.ok and (second.pages_moved, second.pages_already) == (4, 4)
    assert "pages_already_there" not in outcome.reasons  # pages the first attempt moved are not "on their own"
    assert block.tier == "cxl" and kernel.nodes(block) == {kernel.node("cxl")}
    assert intact(kernel.cache, kernel.ref, [0])


def test_pages_busy_every_time_fail_after_bounded_retries_and_go_back(kernel: Kernel) -> None:
    kernel.script = ["ebusy"] * 3
    block, outcome = demote_first(kernel, retries=2)
    assert (outcome.moved, outcome.failed, outcome.retried, outcome.reasons) == (0, 1, 2, {"ebusy": 1})
    assert kernel.calls == 4  # three attempts, then the pages that did move were moved back
    assert block.tier == "dram" and kernel.nodes(block) == {kernel.node("dram")}
    assert intact(kernel.cache, kernel.ref, [0])
    consistent(kernel.cache)


def test_enomem_fails_at_once_and_leaves_the_block_whole_where_it_was(kernel: Kernel) -> None:
    kernel.script = ["enomem"]
    block, outcome = demote_first(kernel)
    assert (outcome.moved, outcome.failed, outcome.retried, outcome.reasons) == (0, 1, 0, {"enomem": 1})
    assert block.tier == "dram" and kernel.nodes(block) == {kernel.node("dram")}
    kernel.script = ["nodefull"]  # the whole call refused: the daemon counts it and goes on
    block, outcome = demote_first(kernel)
    assert (outcome.failed, outcome.reasons) == (1, {"enomem": 1}) and block.tier == "dram"
    block, outcome = demote_first(kernel)  # and the next attempt, with memory free again, works
    assert outcome.moved == 1 and block.tier == "cxl" and kernel.nodes(block) == {kernel.node("cxl")}
    assert intact(kernel.cache, kernel.ref, [0])
    consistent(kernel.cache)


def test_pages_that_moved_on_their_own_are_counted_not_failed(kernel: Kernel) -> None:
    block = blocks_of(kernel.cache, 0)[0]
    pages = kernel.pages(block)
    syscalls.move_pages(pages[:3], kernel.node("cxl"))  # as the kernel's own tiering might have done
    _, outcome = demote_first(kernel)
    (record,) = outcome.records
    assert record.ok and (record.pages_already, record.pages_moved) == (3, 5)
    assert (outcome.moved, outcome.failed, outcome.reasons) == (1, 0, {"pages_already_there": 1})
    assert block.tier == "cxl" and kernel.nodes(block) == {kernel.node("cxl")}
    assert intact(kernel.cache, kernel.ref, [0])


# -- thousands of migrations while a workload reads and verifies every block ---------------------------------------

class RandomMoves(Policy):
    """Moves random blocks to random other tiers every epoch and evicts random ones; random victims."""

    name = "random-moves"

    def __init__(self, seed: int = 0, per_epoch: int = 12) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.per_epoch = per_epoch

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name

    def victim(self, tier: str, view: BlockView) -> int:
        return self.rng.choice([b for b in view.blocks_in(tier) if not view.pinned(b)])

    def plan(self, view: BlockView, now: float) -> Plan:
        tiers = [t.name for t in view.tiers]
        placed = [(b, t) for t in tiers for b in view.blocks_in(t)]
        if not placed:
            return Plan()
        moves = []
        for block, source in self.rng.sample(placed, min(self.per_epoch, len(placed))):
            target = self.rng.choice([t for t in tiers if t != source])
            reason = "demote" if tiers.index(target) > tiers.index(source) else "promote"
            moves.append(Move(block, source, target, reason))
        return Plan(moves, evictions=[b for b, _ in self.rng.sample(placed, min(3, len(placed)))])


class VerifyingWorkload:
    """Sequences of known content (a shared two-block prefix, then their own blocks) read over and over from a
    thread; every block read is checked against the CRC of what was written. Every few rounds the oldest sequence
    is freed and a new one added, so the daemon meets blocks freed under it and cached prefixes to evict."""

    def __init__(self, cache: TieredKVCache, sequences: int, own_blocks: int) -> None:
        self.cache = cache
        self.own = own_blocks * BT + 5  # and a partial block
        g = torch.Generator().manual_seed(7)
        self.prefix = [(torch.randn(2 * BT, 2, 64, generator=g), torch.randn(2 * BT, 2, 64, generator=g))
                       for _ in range(cache.layout.layers)]
        self.expected: dict[int, list[list[int]]] = {}
        self.next_seq = 0
        self.checked = self.mismatched = self.rounds = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        for _ in range(sequences):
            self.add()

    def add(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        tokens = list(range(2 * BT)) + [1_000_000 + seq * 1000 + i for i in range(self.own)]
        reused = self.cache.add_sequence(seq, tokens).tokens
        g = torch.Generator().manual_seed(seq)
        self.expected[seq] = []
        for layer in range(self.cache.layout.layers):
            k = torch.cat([self.prefix[layer][0], torch.randn(self.own, 2, 64, generator=g)])
            v = torch.cat([self.prefix[layer][1], torch.randn(self.own, 2, 64, generator=g)])
            self.cache.write(seq, layer, reused, k[reused:], v[reused:])
            self.expected[seq].append(crcs(k, v))

    def verify(self, seq: int) -> None:
        for layer in range(self.cache.layout.layers):
            got = crcs(*self.cache.read(seq, layer))
            want = self.expected[seq][layer]
            self.checked += len(want)
            self.mismatched += sum(a != b for a, b in zip(got, want, strict=True)) + abs(len(got) - len(want))

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for seq in list(self.expected):
                    self.verify(seq)
                self.rounds += 1
                if self.rounds % 4 == 0:
                    oldest = min(self.expected)
                    self.cache.free_sequence(oldest)
                    del self.expected[oldest]
                    self.add()
        except BaseException as exc:  # handed to the test
            self.error = exc


def crcs(k: torch.Tensor, v: torch.Tensor) -> list[int]:
    return [zlib.crc32(k[i:i + BT].numpy().tobytes() + v[i:i + BT].numpy().tobytes())
            for i in range(0, k.shape[0], BT)]


def checksum_run(cache: TieredKVCache, migrations: int, timeout_s: float,
                 rounds: int = 20) -> tuple[VerifyingWorkload, object]:
    """Until the daemon has moved `migrations` blocks and the reader verified every sequence `rounds` times."""
    workload = VerifyingWorkload(cache, sequences=6, own_blocks=3)
    daemon = MigrationDaemon(cache, RandomMoves(), epoch_s=0.001)
    reader = threading.Thread(target=workload.run, name="verifying-reader")
    reader.start()
    daemon.start()
    deadline = time.monotonic() + timeout_s
    try:
        # Also until the reader has checked more blocks than the daemon must move: how fast each goes is the
        # machine's business, that both ran together until then is the test's.
        while (daemon.report().moved < migrations or workload.rounds < rounds or workload.checked <= migrations) \
                and time.monotonic() < deadline and workload.error is None:
            time.sleep(0.05)
    finally:
        report = daemon.stop()
        workload.stop.set()
        reader.join()
    if workload.error is not None:
        raise workload.error
    for seq in workload.expected:  # once more, at rest
        workload.verify(seq)
    return workload, report


def check_nothing_lost_or_corrupted(cache: TieredKVCache, workload: VerifyingWorkload, report: object,
                                    migrations: int) -> None:
    assert report.moved >= migrations, report
    assert workload.mismatched == 0
    assert workload.rounds >= 20 and workload.checked > migrations  # the reader really ran alongside
    assert report.reasons.get("gone", 0) + report.reasons.get("not_in_source", 0) > 0  # churn met the daemon
    assert report.evicted > 0
    for seq in workload.expected:  # every block of every live sequence is still in the pool
        for table in cache.seqs[seq].tables:
            assert all(cache.pool.blocks.get(b.id) is b for b in table)
    consistent(cache)
    for placed in cache.verify():  # and its pages are on its tier's node, says the kernel
        assert placed.on_tier == 1.0, placed


def test_thousands_of_migrations_under_concurrent_reads_lose_and_corrupt_nothing(
        make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(8, 8, 12)
    workload, report = checksum_run(cache, migrations=3000, timeout_s=60)
    check_nothing_lost_or_corrupted(cache, workload, report, 3000)
    assert report.failed == 0  # copies between emulated tiers have no kernel to refuse them
    assert all(r.kind == "copy" for r in report.records)


@pytest.mark.numa_vm
def test_page_migrations_between_real_nodes_under_concurrent_reads_lose_and_corrupt_nothing(
        make_cache: Callable[..., TieredKVCache]) -> None:
    if not {0, 1, 2} <= set(discover("/").memory_nodes):
        pytest.skip("needs memory nodes 0, 1 and 2 (the guest of configs/vm/cxl-3node.yaml)")
    cache = make_cache(8, 8, 12)
    # Python runs ~10x slower in the guest: fewer migrations, the same checks.
    workload, report = checksum_run(cache, migrations=400, timeout_s=240)
    check_nothing_lost_or_corrupted(cache, workload, report, 400)
    assert sum(r.kind == "migrate" and r.ok for r in report.records) >= 400 * 2 // 3


# -- the GIL stays free while pages move ---------------------------------------------------------------------------

def counter_share(work: Callable[[], object]) -> float:
    """The share of its free-running pace a pure-Python counter thread keeps while `work` runs in this thread."""
    count = [0]
    stop = threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1

    def pace(run: Callable[[], object]) -> float:
        n0, t0 = count[0], time.perf_counter()
        run()
        return (count[0] - n0) / (time.perf_counter() - t0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # a GIL-holding call then leaks at most about a millisecond to the counter
    thread = threading.Thread(target=counter)
    thread.start()
    try:
        time.sleep(0.02)
        before = pace(lambda: time.sleep(0.05))  # sleeping releases the GIL: the counter's free pace
        during = pace(work)
        after = pace(lambda: time.sleep(0.05))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    return during / max(before, after)  # other load only slows the counter: its best pace is the free one


def test_a_python_thread_keeps_running_while_pages_move_or_blocks_copy(tmp_path: Path) -> None:
    # Best of three: other load on the machine only lowers a share, while a call that holds the GIL cannot leak
    # more than the switch interval. Torch copies on one thread here, so its own threads do not take the
    # counter's core (that would be CPU contention, not the GIL).
    def best(work: Callable[[], object]) -> float:
        return max(counter_share(work) for _ in range(3))

    # The control: a C call through PyDLL keeps the GIL, and the counter stalls.
    usleep = ctypes.PyDLL(None).usleep
    held = best(lambda: usleep(200_000))  # long, so the GIL hand-over before and after it weighs little
    assert held < 0.1, held
    # move_pages of 256 MiB through tieremu's syscalls (~20 ms in the kernel here even when no page has to move).
    region = allocate(256 << 20, (0,))
    pages = page_addresses(region.addr, region.nbytes)
    moving = best(lambda: syscalls.move_pages(pages, discover("/").memory_nodes[0]))
    region.close()
    # A 64 MiB block moved between tiers, back and forth: a copy here, page migration between real nodes.
    big = KVLayout(layers=8, kv_heads=8, head_dim=128, block_tokens=1024, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TieredKVCache(tier_map(tmp_path), big, capacities={"dram": 1, "cxl": 1, "far": 1}) as cache:
            cache.add_sequence(0)
            cache.write(0, 0, 0, torch.ones(1024, 8, 128), torch.ones(1024, 8, 128))
            (block,) = blocks_of(cache, 0)
            copying = best(lambda: cache.move(block, "cxl" if block.tier == "dram" else "dram"))
            assert len(cache.pool.moves) == 3 and all(m.ok and m.bytes == 64 << 20 for m in cache.pool.moves)
    finally:
        torch.set_num_threads(threads)
    assert moving > max(0.3, 5 * held) and copying > max(0.3, 5 * held), (held, moving, copying)


# -- emulated delay: a move pays its own ---------------------------------------------------------------------------

CAL = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                  bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0},
                  latency_by_node={0: 100.0}, read_gbps_by_node={0: 20.0})


def test_a_move_pays_its_own_emulated_delay_and_leaves_the_readers_debt_to_the_reader(
        tmp_path: Path, make_cache: Callable[..., TieredKVCache]) -> None:
    resolved = tier_map(tmp_path, calibration=CAL)
    models = [t.timing for t in resolved.tiers if t.timing is not None]
    if {m.tier for m in models} != {"cxl", "far"}:
        pytest.skip("needs cxl and far emulated (a one-node machine)")
    injector = DelayInjector(models, CAL)
    cache = make_cache(1, 16, 16, injector=injector, resolved=resolved)
    fill(cache, reference(), 0, 9 * BT)  # dram, then 8 blocks in cxl
    injector.settle()
    before = injector.audits["cxl"].owed_ns
    cache.read(0, 0)  # the model's read of 8 cxl blocks: owed until its next layer_start
    owed = injector.audits["cxl"].owed_ns - before
    assert owed > 0
    record = cache.move(blocks_of(cache, 0)[2], "far")  # as a daemon thread would, between the two
    assert record.injected_seconds > 0
    # The move paid for itself only: the read's debt is still there for the reader's thread to pay (a move that
    # settled everything would leave 0 here).
    assert injector.settle() > 0.5 * owed


# -- layer-ahead prefetch ------------------------------------------------------------------------------------------

def decode(cache: TieredKVCache, steps: int, *, daemon: MigrationDaemon | None = None,
           start: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """The tiny model (4 layers) prefilling three prompts and decoding `steps` tokens over the cache, and the same
    over contiguous KV; logits of each step, both ways, and the log position where decode began."""
    config = with_overrides(preset("tiny"), layers=4)
    model = LlamaModel(config, seed=0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab, (n,), generator=g) for n in (70, 90, 100)]
    seqs = [0, 1, 2]
    ref = ContiguousKV.for_model(config, max_len=256)
    for s in seqs:
        cache.add_sequence(s)
    got, want = [model.prefill(cache, seqs, prompts)], [model.prefill(ref, seqs, prompts)]
    cache.end_step()
    mark = cache.log.mark
    if daemon is not None and start:
        daemon.start()
    tokens, lengths = want[0].argmax(-1), [p.numel() for p in prompts]
    for step in range(steps):
        positions = [n + step for n in lengths]
        got.append(model.decode_step(cache, seqs, tokens, positions))
        want.append(model.decode_step(ref, seqs, tokens, positions))
        cache.end_step()
        tokens = want[-1].argmax(-1)
    return got, want, mark


def fast_share_by_layer(cache: TieredKVCache, mark: int) -> dict[int, float]:
    log = cache.log.since(mark)
    return {layer: float(np.mean(log.tier[log.layer == layer] == 0)) for layer in range(cache.layout.layers)}


def kv_layout(kind: str = "per-layer") -> KVLayout:
    config = preset("tiny")
    return KVLayout(4, config.kv_heads, config.head_dim, BT, torch.float32, kind)


def test_layer_ahead_serves_the_next_layer_from_the_fast_tier(tmp_path: Path) -> None:
    # 3 sequences x 4 layers x 5-7 blocks; dram holds about two layers' worth.
    caps = {"dram": 40, "cxl": 96, "far": 96}
    shares = {}
    for name in ("none", "layerahead"):
        with TieredKVCache(tier_map(tmp_path), kv_layout(), capacities=caps) as cache:
            daemon = MigrationDaemon(cache, get_policy(name)) if name != "none" else None
            got, want, mark = decode(cache, 6, daemon=daemon)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b)  # blocks moved between layers, attention still exact
            shares[name] = fast_share_by_layer(cache, mark)
            if daemon is not None:
                report = daemon.stop()
                assert report.moved > 0 and report.failed == 0 and cache.on_layer_start is None
                assert any(r.target == "dram" for r in report.records)
    later = (1, 2, 3)
    without = float(np.mean([shares["none"][layer] for layer in later]))
    with_prefetch = float(np.mean([shares["layerahead"][layer] for layer in later]))
    assert with_prefetch > without + 0.3, shares
    assert min(shares["layerahead"][layer] for layer in later) > max(shares["none"][layer] for layer in (2, 3)), shares


def test_layer_ahead_in_the_background_keeps_decode_exact(tmp_path: Path) -> None:
    caps = {"dram": 40, "cxl": 96, "far": 96}
    with TieredKVCache(tier_map(tmp_path), kv_layout(), capacities=caps) as cache:
        daemon = MigrationDaemon(cache, LayerAhead(), epoch_s=0.002)
        got, want, _ = decode(cache, 8, daemon=daemon, start=True)
        report = daemon.stop()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        assert report.epochs > 0 and report.moved > 0 and report.failed == 0
        assert report.cpu_seconds > 0 and report.wall_seconds > 0
        consistent(cache)


# -- the daemon's life ---------------------------------------------------------------------------------------------

def test_a_started_daemon_runs_epochs_until_stopped_and_reports_them(
        make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 8, 8)
    ref = reference()
    fill(cache, ref, 0, 6 * BT)
    policy = get_policy("lru-epoch", {"promote_quota": 2})
    daemon = MigrationDaemon(cache, policy, epoch_s=0.005)
    daemon.start()
    with pytest.raises(TieremuError, match="already running"):
        daemon.start()
    deadline = time.monotonic() + 10
    while daemon.report().moved < 8 and time.monotonic() < deadline:
        for layer in (0, 1):
            cache.read(0, layer)  # hits in cxl: LRU promotes them
        cache.end_step()
        time.sleep(0.005)
    report = daemon.stop()
    assert not daemon.running
    assert report.epochs >= 2 and report.moved >= 8 and report.bytes == report.moved * cache.layout.block_bytes
    assert report.migration_gbps == pytest.approx(report.bytes / report.wall_seconds / 1e9)
    assert report.cpu_seconds > 0 and report.wall_seconds >= report.epochs * 0.005 * 0.5
    assert report.to_dict()["records"] == len(report.records) == report.moved
    assert intact(cache, ref, [0])


def test_between_steps_the_daemon_runs_an_epoch_only_when_one_is_due(
        make_cache: Callable[..., TieredKVCache]) -> None:
    """step(): called between the workload's steps, an epoch runs when its period has passed, in the caller's
    thread, with every access since the last epoch in one batch; missed epochs are not made up."""
    cache = make_cache(2, 8, 8)
    ref = reference()
    fill(cache, ref, 0, 6 * BT)
    daemon = MigrationDaemon(cache, get_policy("lru-epoch", {"promote_quota": 8}), epoch_s=0.05)
    assert daemon.step() is None  # the first call starts the clock
    for layer in (0, 1):
        cache.read(0, layer)  # hits in cxl: LRU promotes them
    cache.end_step()
    assert daemon.step() is None and daemon.report().epochs == 0  # not due yet
    time.sleep(0.12)  # two periods pass: one epoch runs, the missed one is not made up
    outcome = daemon.step()
    assert outcome is not None and outcome.moved > 0 and daemon.report().epochs == 1
    assert daemon.step() is None
    report = daemon.stop()
    assert report.moved == outcome.moved and not daemon.running
    assert intact(cache, ref, [0])


def test_an_error_in_the_daemon_thread_is_raised_by_stop(make_cache: Callable[..., TieredKVCache]) -> None:
    cache = make_cache(2, 2, 4)
    fill(cache, reference(), 0, 2 * BT)

    class Broken(Scripted):
        def plan(self, view: BlockView, now: float) -> Plan:
            return Plan([Move(next(iter(view.blocks_in("dram"))), "dram", "nowhere", "demote")])

    daemon = MigrationDaemon(cache, Broken(), epoch_s=0.001)
    daemon.start()
    deadline = time.monotonic() + 10
    while daemon.running and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(PolicyError, match="named tier 'nowhere'"):
        daemon.stop()
    with pytest.raises(ConfigError, match="epoch_s=0 must be positive"):
        MigrationDaemon(cache, Broken(), epoch_s=0)
    with pytest.raises(ConfigError, match="budget_gbps=-1 must be positive"):
        MigrationDaemon(cache, Broken(), budget_gbps=-1)
