"""Replay at fixed bytes per tier: a compressed tier holds ratio-times more blocks, and its hits are charged the
compressed bytes plus the measured dequantization."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.cli.replay import replay
from tieremu.kv.compress import decompress_gbps, reference_codec
from tieremu.kv.compress_tiers import (
    TierCodec,
    capacity_blocks,
    compressed_block_bytes,
    effective_read_gbps,
    move_cost,
)
from tieremu.policy import get_policy
from tieremu.tiers.config import Compression, TierSpec, load_tier_map
from tieremu.workloads.simulate import SimTier, _settings, policy_context, simulate
from tieremu.workloads.trace import read_trace

REPO = Path(__file__).resolve().parents[1]
SMALL_TRACE = REPO / "configs" / "traces" / "small.jsonl"  # 300 requests, 1753 distinct blocks
MIB = 1 << 20


def tier_map(tmp_path: Path, slow: str) -> Path:
    p = tmp_path / f"{slow}.yaml"
    p.write_text("name: t\ntiers:\n  - {name: dram, nodes: [0], capacity_mib: 3200}\n"
                 "  - {name: cxl, nodes: [1], allow_emulation: true, capacity_mib: 6400, compression: " + slow +
                 ", emulate: {bandwidth_gbps: 5}}\n")
    return p


def run(tiers: Path) -> dict:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(tiers), "--policy", "lru", "--block-mib",
                                      "16", "--local-gbps", "30", "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_int8_on_the_slow_tier_raises_the_total_hit_ratio_at_fixed_bytes(tmp_path: Path) -> None:
    none, int8 = run(tier_map(tmp_path, "none")), run(tier_map(tmp_path, "int8"))
    # Same bytes per tier: 3200 MiB and 6400 MiB of 16 MiB blocks; the int8 tier stores each at 1/ratio the size.
    ratio = reference_codec("int8").ratio  # type: ignore[union-attr]
    assert [t["capacity_blocks"] for t in none["tiers"]] == [200, 400]
    assert int8["tiers"][0]["capacity_blocks"] == 200
    assert int8["tiers"][1]["capacity_blocks"] == int(6400 * MIB // -(-16 * MIB // ratio))
    assert int8["tiers"][1]["capacity_blocks"] >= 1.8 * 400
    # The fast tier's hits are the same policy over the same capacity; the slow tier now holds more of the trace.
    assert int8["hit_ratio"] > none["hit_ratio"] + 0.05, (none["hit_ratio"], int8["hit_ratio"])
    assert int8["tiers"][1]["hits"] > none["tiers"][1]["hits"]
    # STAR (share of hits served below the fastest tier) rises with the slow tier's share of hits.
    assert int8["star"] > none["star"]
    # A hit in the int8 tier is charged its compressed read plus the dequantization, not the raw read.
    assert none["tiers"][1]["read_gbps"] == 5.0
    expected = 1 / (1 / (ratio * 5.0) + 1 / decompress_gbps("int8"))
    assert abs(int8["tiers"][1]["read_gbps"] - expected) < 1e-9
    # Every move here is between dram and cxl: with int8 on cxl each carries the compressed block, else the raw one.
    codec = reference_codec("int8")
    assert codec is not None
    for result, size in ((none, 16 * MIB), (int8, -(-16 * MIB * codec.compressed_bytes // codec.raw_bytes))):
        moves = result["promotions"] + result["demotions"] + result["prefetches"]
        assert moves > 0 and result["migration_bytes"] == moves * size


def test_capacity_arithmetic_by_hand() -> None:
    base = TierSpec("cxl", "numa", (1,), None, None, True, None, capacity_mib=100)  # type: ignore[arg-type]
    int4 = TierSpec("cxl", "numa", (1,), None, None, True, None, capacity_mib=100,  # type: ignore[arg-type]
                    compression=Compression("int4"))
    codec = reference_codec("int4")
    assert codec is not None
    # The reference block (16 tokens x 8 KV heads x 64, bf16): 32768 bytes; int4 packs each of K and V's 8192 values
    # in 4096 bytes plus a 2-byte scale per 64 values.
    assert codec.raw_bytes == 32768 and codec.compressed_bytes == 2 * (4096 + 128 * 2)
    assert compressed_block_bytes(base, MIB) == MIB
    assert compressed_block_bytes(int4, MIB) == -(-MIB * 8704 // 32768)
    assert capacity_blocks(base, MIB) == 100 and capacity_blocks(int4, MIB) == 100 * MIB // -(-MIB * 8704 // 32768)
    assert capacity_blocks(TierSpec("x", "numa", (0,), None, None, False, None), MIB) is None  # type: ignore[arg-type]
    # An uncompressed tier, and a tier with no rate, keep their rate.
    assert effective_read_gbps({"cxl": base}, {"cxl": 5.0, "gone": 3.0}) == {"cxl": 5.0, "gone": 3.0}
    assert effective_read_gbps({"cxl": int4}, {"cxl": None}) == {"cxl": None}


def test_shipped_compressed_map_replays(tmp_path: Path) -> None:
    spec = load_tier_map(REPO / "configs" / "tiers" / "cxl-compressed.yaml")
    data = run(REPO / "configs" / "tiers" / "cxl-compressed.yaml")
    assert [t["capacity_blocks"] for t in data["tiers"]] == [capacity_blocks(t, 16 * MIB) for t in spec.tiers]
    assert data["tiers"][0]["capacity_blocks"] == 256 // 16


def test_execute_mode_refuses_compressed_tiers_before_any_work(tmp_path: Path) -> None:
    out = CliRunner().invoke(replay, [str(SMALL_TRACE), "--tiers", str(tier_map(tmp_path, "int4")), "--policy", "lru",
                                      "--mode", "execute"])
    assert out.exit_code != 0
    message = str(out.exception or out.output)
    assert "tier(s) cxl of t are compressed: execute mode stores blocks uncompressed" in message


def test_moves_into_and_out_of_a_compressed_tier_cost_its_compressed_bytes_in_both_cores() -> None:
    # Fixed codec figures (not measured) so the arithmetic can be checked by hand: a move between dram and the int8
    # tier carries the compressed block over the raw pair rate, and pays compressing (down) or decompressing (up).
    codec = reference_codec("int8")
    assert codec is not None
    requests = read_trace(SMALL_TRACE)
    block = 16 * MIB
    int8 = TierCodec("int8", "block", codec.raw_bytes, codec.compressed_bytes, compress_gbps=4.0,
                     decompress_gbps=8.0, read_gbps=5.0)
    small = -(-block * codec.compressed_bytes // codec.raw_bytes)
    assert move_cost(block, None, None) == (block, 0.0)
    assert move_cost(block, None, int8) == (small, block / 4e9)
    assert move_cost(block, int8, None) == (small, block / 8e9)
    assert move_cost(block, int8, dataclasses.replace(int8, read_gbps=1.0)) == (small, 0.0)  # same format: as is
    tiers = [SimTier("dram", 100), SimTier("cxl")]
    results = {}
    for name, codecs in (("none", {}), ("int8", {"cxl": int8})):
        for core in ("python", "native"):
            results[name, core] = simulate(requests, tiers, get_policy("lru", {}, policy_context(requests)),
                                           block_bytes=block, tier_read_gbps={"dram": 30.0, "cxl": 5.0},
                                           tier_codecs=codecs, core=core)
    for name in ("none", "int8"):
        python, native = results[name, "python"], results[name, "native"]
        assert native.migration_bytes == python.migration_bytes and native.ttft_ms == python.ttft_ms
    none, compressed = results["none", "python"], results["int8", "python"]
    moves = none.promotions + none.demotions
    assert moves > 0 and compressed.promotions + compressed.demotions == moves  # lru decides the same moves
    assert none.migration_bytes == moves * block
    assert compressed.migration_bytes == moves * small < none.migration_bytes / 1.8
    # The move's time, by hand: compressed bytes at the pair's raw rate (the lower: cxl's 5 GB/s) plus the codec.
    settings = _settings(tiers, get_policy("lru"), 1.0, block, {"dram": 30.0, "cxl": 5.0}, 1.0, 512, 1, True, None,
                         {"cxl": int8})
    assert settings.move_s[0][1] == pytest.approx(small / 5e9 + block / 4e9)
    assert settings.move_s[1][0] == pytest.approx(small / 5e9 + block / 8e9)
    assert settings.bytes_of(0, 1) == settings.bytes_of(1, 0) == small
