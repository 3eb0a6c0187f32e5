"""The engine connector's store on a tier map with a compressed tier: blocks put or moved there are held compressed
(within the codec's documented bound when loaded back), counted at their compressed size, their (de)compression
timed per tier. Without vLLM; the engine run on such a map is in test_engine_vllm.py's style below (slow)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from vllm_guard import need_vllm

from tieremu.cli import main
from tieremu.engines.replay import compare_outputs
from tieremu.engines.store import TierStore
from tieremu.kv.compress import codec_for
from tieremu.kv.layout import KVLayout
from tieremu.numa.topology import discover
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import resolve
from tieremu.tiers.timing import Calibration

CAL = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                  bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0},
                  latency_by_node={0: 100.0}, read_gbps_by_node={0: 20.0})
LAYOUT = KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=16, dtype=torch.float32)  # 32 KiB per block
BT = LAYOUT.block_tokens
MAP = """
name: store-int8
tiers:
  - name: dram
    nodes: [0]
    capacity_mib: 1
  - name: cxl
    nodes: [1]
    allow_emulation: true
    emulate: {latency_ratio: 2.2, bandwidth_ratio: 0.8}
    capacity_mib: 1
    compression: int8
"""
CODEC = codec_for("int8", "block", block_tokens=BT, kv_heads=2, head_dim=64, dtype=torch.float32)


def block_of(key: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(key)
    block = torch.randn(LAYOUT.block_shape, generator=generator)
    block[0, 0, 3, 1, 7] = 40.0  # an outlier: its row's scale grows, the bound with it
    return block


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TierStore]:
    path = tmp_path / "tiers.yaml"
    path.write_text(MAP)
    resolved = resolve(load_tier_map(path), discover("/"), calibration=CAL)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    s = TierStore(resolved, LAYOUT, get_policy("lru"), injector=injector, capacities={"dram": 2, "cxl": 6})
    yield s
    s.close()


def _check_within_bound(layers: list[tuple[torch.Tensor, torch.Tensor]], keys: list[int],
                        exact: set[int]) -> None:
    assert CODEC is not None
    for layer, (k, v) in enumerate(layers):
        for i, key in enumerate(keys):
            want = block_of(key)[layer]
            got = torch.stack([k[i * BT:(i + 1) * BT], v[i * BT:(i + 1) * BT]])
            if key in exact:
                assert torch.equal(got, want), key
            else:
                err = (got - want).abs()
                assert bool((err <= CODEC.error_bound(want)).all()), (key, float(err.max()))
                assert float(err.max()) > 0  # it really went through int8


def test_blocks_in_the_compressed_tier_are_held_compressed_and_load_back_within_the_bound(store: TierStore) -> None:
    assert CODEC is not None
    for key in range(5):
        assert store.save(key, block_of(key), request=key) is not None
    hook = store.compression
    assert hook is not None and set(hook.codecs) == {"cxl"}
    on_cxl = [b for b in store.cache.pool.blocks.values() if b.tier == "cxl"]
    on_dram = [b for b in store.cache.pool.blocks.values() if b.tier == "dram"]
    assert len(on_cxl) == 3 and len(on_dram) == 2  # lru: the newest two in dram, the three before pushed down
    # Held compressed in the arena (every layer), demoted ones included; dram's blocks as written.
    assert all(hook.slices.get((b.id, li)) == CODEC for b in on_cxl for li in range(LAYOUT.layers))
    assert not any((b.id, li) in hook.slices for b in on_dram for li in range(LAYOUT.layers))
    stats = store.stats
    c = stats.compression["cxl"]
    assert (c.format, c.layout) == ("int8", "block") and c.ratio == pytest.approx(CODEC.ratio)
    assert c.block_bytes == CODEC.compressed_bytes * LAYOUT.layers < LAYOUT.block_bytes == c.raw_block_bytes
    assert c.blocks_compressed == 3 and c.compress_s > 0
    assert stats.stored_by_tier == {"dram": 5, "cxl": 0}  # every save lands in dram first
    assert stats.stored_bytes_by_tier == {"dram": 5 * LAYOUT.block_bytes, "cxl": 0}

    keys = [k for k in range(5) if store.view.tier_of(k) == "cxl"]
    assert store.matched(keys, request=9) == len(keys) == 3
    layers = store.load(keys, request=9)
    _check_within_bound(layers, keys, exact=set())
    assert stats.hits_by_tier["cxl"] == 3
    # Loads counted at compressed size, per tier, and the read path charged the emulated tier that size.
    assert stats.loaded_bytes_by_tier["cxl"] == c.bytes_loaded == 3 * c.block_bytes
    assert store.cache.stats.traffic["cxl"].bytes_read == 3 * c.block_bytes
    assert c.bytes_saved == 3 * (c.raw_block_bytes - c.block_bytes)
    assert c.decompress_s > 0
    assert hook.stats.slices_dequantized == 3 * LAYOUT.layers


def test_a_save_into_the_compressed_tier_is_written_at_compressed_size(tmp_path: Path) -> None:
    """all-slowest admits straight into the last tier: the save's bytes and its emulated write are compressed."""
    path = tmp_path / "tiers.yaml"
    path.write_text(MAP)
    resolved = resolve(load_tier_map(path), discover("/"), calibration=CAL)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    s = TierStore(resolved, LAYOUT, get_policy("all-slowest"), injector=injector, capacities={"dram": 8, "cxl": 8})
    try:
        assert s.save(1, block_of(1), request=0) == "cxl"
        c = s.stats.compression["cxl"]
        assert s.stats.stored_bytes_by_tier["cxl"] == c.bytes_stored == c.block_bytes
        assert s.cache.stats.traffic["cxl"].bytes_written == c.block_bytes
        assert injector.audits["cxl"].charged_bytes == c.block_bytes  # the tier's write charge: compressed bytes
        assert c.bytes_saved == c.raw_block_bytes - c.block_bytes
        assert s.matched([1], request=1) == 1
        _check_within_bound(s.load([1], request=1), [1], exact=set())
    finally:
        s.close()


def test_a_block_promoted_out_of_the_compressed_tier_is_restored_there(store: TierStore) -> None:
    """lru promotes a load from cxl to dram: the block is decompressed in place (its slices no longer compressed),
    and a later load from dram returns the same (int8-rounded) values with no further dequantization."""
    for key in range(5):
        store.save(key, block_of(key), request=key)
    key = next(k for k in range(5) if store.view.tier_of(k) == "cxl")
    store.matched([key], request=9)
    first = store.load([key], request=9)
    assert store.view.tier_of(key) == "dram" and store.stats.promotions == 1
    hook = store.compression
    assert hook is not None
    block = store.cache.pool.by_key(key)
    assert block is not None and not any((block.id, li) in hook.slices for li in range(LAYOUT.layers))
    dequantized = hook.stats.slices_dequantized
    store.matched([key], request=10)
    again = store.load([key], request=10)
    assert hook.stats.slices_dequantized == dequantized and hook.stats.slices_restored == LAYOUT.layers
    for (k1, v1), (k2, v2) in zip(first, again, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # The victim pushed down to make room is compressed on arrival.
    assert all(hook.slices.get((b.id, 0)) is not None for b in store.cache.pool.blocks.values() if b.tier == "cxl")


# -- the outputs check ---------------------------------------------------------------------------------------------


def test_the_outputs_check_gives_each_requests_first_divergence() -> None:
    check = compare_outputs([[1, 2, 3], [4, 5, 6], [7, 8], [9]], [[1, 2, 3], [4, 0, 6], [7, 8, 1], [0]])
    assert [(r.match, r.first_divergence) for r in check.requests] == [(True, None), (False, 1), (False, 2),
                                                                       (False, 0)]
    assert (check.identical, check.diverged, check.earliest_divergence) == (1, 3, 0)
    same = compare_outputs([[1, 2]], [[1, 2]])
    assert (same.identical, same.diverged, same.earliest_divergence) == (1, 0, None)


# -- vLLM on a map whose slower tier is int8 -----------------------------------------------------------------------

ENGINE_MAP = """
name: engine-int8
tiers:
  - name: dram
    nodes: [0]
    capacity_mib: 1
  - name: cxl
    nodes: [1]
    allow_emulation: true
    emulate: {latency_ratio: 2.2, bandwidth_ratio: 0.8}
    capacity_mib: 64
    compression: int8
"""
ENGINE_BT = 64


def _trace(path: Path) -> None:
    """Four requests of 8 blocks, the last three sharing the first one's first 6 blocks (loaded from the store)."""
    rows = [{"timestamp": 0, "input_length": 8 * ENGINE_BT, "output_length": 16, "hash_ids": list(range(8))}]
    for i in range(1, 4):
        rows.append({"timestamp": 2000 * i, "input_length": 8 * ENGINE_BT, "output_length": 16,
                     "hash_ids": [*range(6), 100 * i, 100 * i + 1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vllm_loads_from_an_int8_tier_are_dequantized_counted_compressed_and_outputs_compared(
        tmp_path: Path) -> None:
    """all-slowest puts every block in the int8 tier: the three later requests load their 6 shared blocks from it.
    Whether int8 changes the generated tokens is reported (not asserted); the fields must be consistent."""
    need_vllm()
    tiers, trace = tmp_path / "tiers.yaml", tmp_path / "trace.jsonl"
    tiers.write_text(ENGINE_MAP)
    _trace(trace)
    result = CliRunner().invoke(main, ["engine", "replay", str(trace), "--tiers", str(tiers), "--policy",
                                       "all-slowest", "--block-tokens", str(ENGINE_BT), "--time-scale", "0.5",
                                       "--check-outputs", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    conn = out["connector"]
    assert out["compressed_tiers"] == ["cxl"]
    loaded = conn["loaded_blocks"]  # 18 (6 for each later request) unless one arrived before the first was saved
    assert conn["hits_by_tier"] == {"dram": 0, "cxl": loaded} and loaded > 0 and loaded % 6 == 0
    c = conn["compression"]["cxl"]
    assert (c["format"], c["layout"]) == ("int8", "block") and c["ratio"] > 3.5  # float32 KV: 4 bytes -> ~1
    assert c["block_bytes"] < c["raw_block_bytes"] == 4 * 2 * 2 * 64 * 4 * ENGINE_BT
    stored = conn["stored_by_tier"]["cxl"]
    assert stored == conn["stored_blocks"] == c["blocks_compressed"] == 8 + 3 * 2  # a block is stored once
    assert conn["stored_bytes_by_tier"]["cxl"] == c["bytes_stored"] == stored * c["block_bytes"]
    assert conn["loaded_bytes_by_tier"]["cxl"] == c["bytes_loaded"] == loaded * c["block_bytes"]
    assert c["bytes_saved"] == (stored + loaded) * (c["raw_block_bytes"] - c["block_bytes"])
    assert c["compress_s"] > 0 and c["decompress_s"] > 0
    assert out["computed_drop_equals_loaded"] is True
    check = out["outputs_check"]
    rows = check["requests"]
    assert len(rows) == 4 and check["identical"] + check["diverged"] == 4
    for row in rows:
        assert row["match"] == (row["first_divergence"] is None)
        assert row["tokens"] == row["baseline_tokens"] == 16
        if not row["match"]:
            assert 0 <= row["first_divergence"] < 16
    assert rows[0]["match"]  # the first request loads nothing: its tokens cannot differ
    firsts = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
    assert check["earliest_divergence"] == (min(firsts) if firsts else None)
    assert out["outputs_match"] == (check["diverged"] == 0)
    assert out["mismatched_requests"] == [r["request"] for r in rows if not r["match"]]
    print(f"int8 tier: {check['identical']} of 4 requests identical, earliest divergence "
          f"{check['earliest_divergence']}; {c['ratio']:.2f}x, {c['bytes_saved']} bytes saved")


def test_a_running_servers_compression_figures_subtract_counters_and_keep_the_format() -> None:
    from tieremu.engines.drive import delta

    tier = {"format": "int8", "layout": "block", "ratio": 3.9, "block_bytes": 100, "raw_block_bytes": 390,
            "bytes_loaded": 500, "compress_s": 0.5}
    after = {"compression": {"cxl": tier}}
    before = {"compression": {"cxl": tier | {"bytes_loaded": 200, "compress_s": 0.25}}}
    assert delta(after, before) == {"compression": {"cxl": tier | {"bytes_loaded": 300, "compress_s": 0.25}}}
