"""The tier store behind the engine connector (tieremu.engines.store), without an engine: blocks admitted by the
policy down the tier order, loads read back exactly what was saved and are counted per tier, emulated tiers pay."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tieremu.engines.store import TierStore, check_capacities
from tieremu.errors import ConfigError
from tieremu.kv.layout import KVLayout
from tieremu.numa.topology import discover
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import resolve
from tieremu.tiers.timing import Calibration

REPO = Path(__file__).resolve().parents[1]
CXL_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
CAL = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                  bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0},
                  latency_by_node={0: 100.0}, read_gbps_by_node={0: 20.0})
LAYOUT = KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=16, dtype=torch.bfloat16)  # 16 KiB per block


def block_of(key: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(key)
    return torch.randn(LAYOUT.block_shape, generator=generator).to(torch.bfloat16)


@pytest.fixture
def store() -> Iterator[TierStore]:
    resolved = resolve(load_tier_map(CXL_MAP), discover("/"), calibration=CAL)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    s = TierStore(resolved, LAYOUT, get_policy("lru"), injector=injector, capacities={"dram": 2, "cxl": 2, "far": 8})
    yield s
    s.close()


def test_saved_blocks_spill_down_and_load_back_exactly_with_hits_per_tier(store: TierStore) -> None:
    for key in range(6):
        store.save(key, block_of(key), request=key)
    assert sum(store.resident().values()) == 6 and store.resident()["dram"] <= 2
    keys = list(range(6))
    assert store.matched(keys, request=6) == 6
    layers = store.load(keys, request=6)
    for layer, (k, v) in enumerate(layers):
        for i, key in enumerate(keys):
            want = block_of(key)[layer]
            assert torch.equal(k[i * 16:(i + 1) * 16], want[0]) and torch.equal(v[i * 16:(i + 1) * 16], want[1])
    hits = store.stats.hits_by_tier
    assert sum(hits.values()) == 6 and hits["cxl"] + hits["far"] > 0
    assert store.stats.loaded_blocks == 6 and store.stats.stored_blocks == 6
    audits = store.cache.injector.audits
    assert audits["far"].charged_bytes > 0  # the emulated tier was charged for what it served


def test_a_lookup_stops_at_the_first_missing_block_and_saving_twice_stores_once(store: TierStore) -> None:
    store.save(1, block_of(1), request=0)
    assert store.save(1, block_of(1), request=1) is None
    assert store.matched([1, 2, 1], request=2) == 1
    store.release([1])
    assert store.stats.stored_blocks == 1


def test_tiers_that_cannot_hold_one_block_are_named() -> None:
    with pytest.raises(ConfigError, match="tier 'dram' has no capacity_mib"):
        check_capacities(load_tier_map(CXL_MAP), LAYOUT.block_bytes, 16)


def test_a_demand_caches_load_below_the_fastest_tier_is_promoted_and_its_victim_pushed_down(
        store: TierStore) -> None:
    """lru is a demand cache: as in simulate and execute-mode replay, a block loaded from a slower tier moves to the
    fastest after the load, the policy's victim going one tier down; its bytes are intact where it lands."""
    for key in range(6):
        store.save(key, block_of(key), request=key)
    slow = next(k for k in range(6) if store.view.tier_of(k) == "far")
    before = store.resident()
    assert store.matched([slow], request=6) == 1
    store.load([slow], request=6)
    assert store.view.tier_of(slow) == "dram" and store.stats.promotions == 1
    assert store.resident() == before  # a swap down the chain: every tier as full as it was
    assert store.matched([slow], request=7) == 1
    k, v = store.load([slow], request=7)[0]
    assert torch.equal(k[:16], block_of(slow)[0][0]) and torch.equal(v[:16], block_of(slow)[0][1])
    assert store.stats.hits_by_tier["dram"] == 1 and store.stats.hits_by_tier["far"] == 1
