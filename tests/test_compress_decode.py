"""Compressed tiers in the paged KV cache: blocks held compressed in their tier's memory, read through a staging
buffer within the codec's bound, counted at compressed size, restored when moved out; decode error reported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tieremu.daemon.daemon import MigrationDaemon
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.compress import Codec
from tieremu.kv.compress_store import TierCompression
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Vector
from tieremu.numa.topology import discover
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import Compression, load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.compress_decode import compression_accuracy
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.decode import DecodeSpec, run_decode
from tieremu.workloads.llama import LlamaModel, preset, with_overrides

REPO = Path(__file__).resolve().parents[1]
CAPS = {"dram": 64, "cxl": 64, "far": 64}


def tiers(cxl: str = "int8", layout: str = "block", calibration: Calibration | None = None) -> ResolvedTierMap:
    """cxl-expander with the cxl tier compressed (every tier emulated on node 0 where nodes are missing)."""
    m = load_tier_map(REPO / "configs/tiers/cxl-expander.yaml")
    changed = tuple(dataclasses.replace(t, compression=Compression(cxl, layout)) if t.name == "cxl" else t
                    for t in m.tiers)
    return resolve(dataclasses.replace(m, tiers=changed), discover("/"), calibration=calibration)


def kv_layout(kind: str = "all-layers") -> KVLayout:
    return KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=16, layout=kind)


def fill(cache: TieredKVCache, ref: ContiguousKV, n: int) -> None:
    g = torch.Generator().manual_seed(5)
    for layer in range(cache.layout.layers):
        k, v = torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
        cache.write(0, layer, 0, k, v)
        ref.write(0, layer, 0, k, v)


def slot_bytes(cache: TieredKVCache, block: object, li: int, n: int) -> torch.Tensor:
    """A copy of the first n bytes of a block's layer slice in its arena (no view of the arena outlives the call)."""
    view = cache.pool.arenas[block.arena].blocks[block.slot, li]  # type: ignore[attr-defined]
    return view.reshape(-1).view(torch.uint8)[:n].clone()


@pytest.mark.parametrize("kind", ["all-layers", "per-layer"])
@pytest.mark.parametrize(("fmt", "scales"), [("int8", "block"), ("int4", "kivi"), ("fp8", "block")])
def test_blocks_in_a_compressed_tier_are_held_compressed_and_read_within_the_bound(kind: str, fmt: str,
                                                                                   scales: str) -> None:
    lay = kv_layout(kind)
    codec = Codec(fmt, scales, 16, 2, 64)
    ref = ContiguousKV(2, 2, 64, max_len=256)
    with TieredKVCache(tiers(fmt, scales), lay, capacities=CAPS, placement=Vector({"dram": 0.5, "cxl": 0.5})) as cache:
        hook = TierCompression.attach(cache)
        assert hook is not None and cache.compression is hook and hook.state == "staging"
        cache.add_sequence(0)
        fill(cache, ref, 70)  # 4 full blocks and a partial one
        for layer in range(2):
            k, v = cache.read(0, layer)
            rk, rv = ref.read(0, layer)
            for i, block in enumerate(cache.seqs[0].tables[layer]):
                rows = slice(16 * i, min(16 * (i + 1), 70))
                li = 0 if lay.per_layer else layer
                held = (block.id, li) in hook.slices
                # Full blocks on the compressed tier are held compressed; dram's and the partial one exactly as written.
                assert held == (block.tier == "cxl" and i < 4), (i, block.tier)
                if not held:
                    assert torch.equal(k[rows], rk[rows]) and torch.equal(v[rows], rv[rows])
                    continue
                original = torch.stack([rk[rows], rv[rows]])
                bound = codec.error_bound(original)
                assert ((torch.stack([k[rows], v[rows]]) - original).abs() <= bound).all()
                assert not torch.equal(k[rows], rk[rows])  # really compressed: lossy
                # The tier's memory holds the compressed bytes: decompressing the slot gives what the read returned.
                again = codec.decompress(slot_bytes(cache, block, li, codec.compressed_bytes))
                assert torch.equal(again[0], k[rows])
        # The read from cxl was counted at compressed size, dram's at full size.
        traffic = cache.stats.traffic
        per_block = lay.layer_slice_bytes
        cxl_blocks = traffic["cxl"].blocks_read
        assert cxl_blocks > 0 and traffic["cxl"].bytes_read < cxl_blocks * per_block
        assert traffic["dram"].bytes_read == traffic["dram"].blocks_read * per_block
        assert hook.stats.slices_compressed > 0 and hook.stats.compress_ns > 0 and hook.stats.decompress_ns > 0


def test_attention_on_compressed_blocks_goes_through_staging_not_the_in_place_kernel() -> None:
    with TieredKVCache(tiers(), kv_layout(), capacities=CAPS, placement=Vector({"cxl": 1.0})) as cache:
        TierCompression.attach(cache)
        cache.add_sequence(0)
        fill(cache, ContiguousKV(2, 2, 64, max_len=64), 40)
        q = torch.randn(4, 64)
        assert cache.attend(0, 0, q, 0.125) is None  # read() dequantizes; the model then attends itself


def test_blocks_moved_out_are_restored_and_moved_in_are_compressed() -> None:
    ref = ContiguousKV(2, 2, 64, max_len=64)
    with TieredKVCache(tiers(), kv_layout(), capacities=CAPS, placement=Vector({"dram": 1.0})) as cache:
        hook = TierCompression.attach(cache)
        assert hook is not None
        cache.add_sequence(0)
        fill(cache, ref, 32)
        assert all(torch.equal(a, b) for a, b in zip(cache.read(0, 0), ref.read(0, 0), strict=True))
        assert not hook.slices
        block = cache.seqs[0].tables[0][0]
        cache.pool.move(block, "cxl")  # as the daemon moves blocks: through the pool, not the cache
        assert (block.id, 0) in hook.slices and (block.id, 1) in hook.slices  # compressed by the move itself
        k, _ = cache.read(0, 0)
        assert not torch.equal(k[:16], ref.read(0, 0)[0][:16])
        compressed = k[:16].clone()
        cache.move(block, "far")  # out of the compressed tier: dequantized into its new slot by the move
        assert (block.id, 0) not in hook.slices and hook.stats.slices_restored == 2
        k2, _ = cache.read(0, 0)
        assert torch.equal(k2[:16], compressed)


def test_moves_into_and_out_of_a_compressed_tier_carry_compressed_bytes_and_a_plain_map_is_unchanged() -> None:
    # A demotion into int8 writes only the compressed bytes into the target, a promotion out of it reads only those:
    # the move log, and the emulated tier's charge for the move, count them; (de)compression is timed on the move.
    cal = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                      bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0}, latency_by_node={0: 100.0},
                      read_gbps_by_node={0: 20.0})
    codec = Codec("int8", "block", 16, 2, 64)
    lay = kv_layout()
    for fmt in ("int8", "none"):
        resolved = tiers(fmt, calibration=cal)
        injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], cal)
        with TieredKVCache(resolved, lay, capacities=CAPS, placement=Vector({"dram": 1.0}),
                           injector=injector) as cache:
            hook = TierCompression.attach(cache)
            cache.add_sequence(0)
            fill(cache, ContiguousKV(2, 2, 64, max_len=64), 40)  # 2 full blocks and a partial one
            full, partial = cache.seqs[0].tables[0][0], cache.seqs[0].tables[0][2]
            charged = injector.audits["cxl"].charged_bytes
            down, down_partial = cache.pool.move(full, "cxl"), cache.pool.move(partial, "cxl")
            charged_down = injector.audits["cxl"].charged_bytes - charged
            up = cache.pool.move(full, "dram")
            assert [m.bytes for m in cache.pool.moves] == [down.bytes, down_partial.bytes, up.bytes]
            assert down_partial.bytes == lay.block_bytes and down_partial.compress_seconds == 0  # stays raw
            if fmt == "none":
                assert hook is None
                assert down.bytes == up.bytes == down.raw_bytes == lay.block_bytes
                assert down.compress_seconds == up.decompress_seconds == 0
                assert charged_down == 2 * lay.block_bytes
                continue
            assert hook is not None
            assert down.bytes == up.bytes == 2 * codec.compressed_bytes < lay.block_bytes / 1.8
            assert down.raw_bytes == lay.block_bytes
            assert down.compress_seconds > 0 and up.decompress_seconds > 0 and down.decompress_seconds == 0
            assert down.seconds >= down.compress_seconds
            assert charged_down == down.bytes + lay.block_bytes  # the written compressed block, the raw partial
            assert not any(k[0] == full.id for k in hook.slices)  # promoted: held raw again


def test_a_map_without_compression_attaches_nothing() -> None:
    with TieredKVCache(tiers("none"), kv_layout(), capacities=CAPS) as cache:
        assert TierCompression.attach(cache) is None and cache.compression is None


def test_decode_over_a_compressed_tier_reports_small_errors_against_uncompressed() -> None:
    config = with_overrides(preset("tiny"), layers=2)
    model = LlamaModel(config, seed=0)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16)
    spec = DecodeSpec(batch=2, prompt_tokens=48, shared_prefix_tokens=16, decode_steps=4)
    errors = {}
    for fmt in ("int8", "int4"):
        with TieredKVCache(tiers(fmt), lay, capacities=CAPS, placement=Vector({"cxl": 1.0}), stage=True) as cache:
            errors[fmt] = compression_accuracy(model, cache, spec)
    int8, int4 = errors["int8"], errors["int4"]
    assert int8.state == "staging" and int8.steps == 4 and int8.slices_compressed > 0
    assert 0 < int8.attention_mean_abs <= int8.attention_max_abs < 0.1
    assert 0 < int8.logits_mean_abs <= int8.logits_max_abs
    # Fewer bits, more error.
    assert int4.attention_mean_abs > int8.attention_mean_abs and int4.logits_mean_abs > int8.logits_mean_abs
    assert int8.token_agreement >= 0.75
    # And the ordinary decode runs over the compressed tier too (the same model, the in-place kernel off for it).
    with TieredKVCache(tiers("int8"), lay, capacities=CAPS, placement=Vector({"cxl": 1.0})) as cache:
        TierCompression.attach(cache)
        result = run_decode(model, cache, spec)
        assert result.kv_bytes_read["cxl"] > 0
        assert result.kv_bytes_read["cxl"] < cache.stats.traffic["cxl"].blocks_read * lay.layer_slice_bytes


def test_the_decode_job_reports_compression_rows_per_run(tmp_path: Path) -> None:
    from experiment_runs import run_jobs

    rows = run_jobs(tmp_path, REPO / "configs/tiers/cxl-compressed.yaml",
                    "  - {kind: decode, policies: [lru], prompt_tokens: 64, shared_prefix_tokens: 16,\n"
                    "     decode_steps: 3, fast_capacity_mib: 0.25}\n")
    by_run: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"].split("-r0")[0], {})[r["metric"]] = r
    # all-fastest keeps every block in uncompressed dram: nothing compressed, but the hook reports its state.
    slowest = by_run["decode-all-slowest"]  # everything on `far`: int4 with KIVI scales
    assert slowest["attention_error_max"]["value"] > 0 and slowest["attention_error_max"]["params"]["state"] == \
        "staging"
    # The tiny model's fp32 layer slice: 16 tokens x 2 KV heads x 64, K and V.
    assert slowest["attention_error_max"]["params"]["formats"] == {
        "cxl": "int8 (block scales): 4224 of 16384 bytes, 3.88x",
        "far": "int4 (kivi scales): 2368 of 16384 bytes, 6.92x"}
    assert slowest["logits_error_max"]["value"] > 0 and 0 <= slowest["token_agreement"]["value"] <= 1
    assert slowest["compress_us_per_slice"]["params"]["slices"] > 0
    assert slowest["kv_bytes_saved_on_read"]["value"] > 0
    # all-fastest keeps every block in uncompressed dram: nothing read compressed.
    assert by_run["decode-all-fastest"]["kv_bytes_saved_on_read"]["value"] == 0


def test_shared_prefixes_and_reused_sequence_ids_read_what_was_written() -> None:
    # Sequence 1 shares sequence 0's compressed prefix block; then sequence 0 is freed and its id reused for KV
    # placed on uncompressed dram: no plan of an earlier table may leak into a later read.
    lay = KVLayout(layers=1, kv_heads=2, head_dim=64, block_tokens=16)
    codec = Codec("int8", "block", 16, 2, 64)
    g = torch.Generator().manual_seed(9)
    tokens = list(range(40))
    with TieredKVCache(tiers(), lay, capacities=CAPS, placement=Vector({"cxl": 1.0})) as cache:
        TierCompression.attach(cache)
        k, v = torch.randn(40, 2, 64, generator=g), torch.randn(40, 2, 64, generator=g)
        cache.add_sequence(0, tokens)
        cache.write(0, 0, 0, k, v)
        first, _ = cache.read(0, 0)
        hit = cache.add_sequence(1, tokens[:32] + [99] * 8)
        assert hit.tokens == 32  # two full blocks reused, held compressed
        cache.write(1, 0, 32, k[32:], v[32:])
        shared, _ = cache.read(1, 0)
        assert torch.equal(shared[:32], first[:32])
        for b in (0, 16):
            bound = codec.error_bound(torch.stack([k[b:b + 16], v[b:b + 16]]))[0]
            assert ((first[b:b + 16] - k[b:b + 16]).abs() <= bound).all()
        cache.free_sequence(0)
        cache.free_sequence(1)
        cache.pool.placement = Vector({"dram": 1.0})
        k2, v2 = torch.randn(40, 2, 64, generator=g), torch.randn(40, 2, 64, generator=g)
        cache.add_sequence(0)
        cache.write(0, 0, 0, k2, v2)
        again, vagain = cache.read(0, 0)
        assert torch.equal(again, k2) and torch.equal(vagain, v2)


def test_blocks_going_back_and_forth_are_restored_exactly_and_recompressed_within_the_bound() -> None:
    # Moving out restores exactly what the compressed tier held; each move back compresses those values again and so
    # adds at most one more bound (no more: the error does not compound faster than one bound per compression).
    ref = ContiguousKV(2, 2, 64, max_len=128)
    codec = Codec("int8", "block", 16, 2, 64)
    with TieredKVCache(tiers("int8"), kv_layout(), capacities=CAPS, placement=Vector({"cxl": 1.0})) as cache:
        hook = TierCompression.attach(cache)
        assert hook is not None
        cache.add_sequence(0)
        fill(cache, ref, 64)
        previous = [cache.read(0, layer) for layer in range(2)]
        originals = [torch.stack(ref.read(0, layer)) for layer in range(2)]  # [2, 64, heads, dim]
        bounds = [torch.cat([codec.error_bound(o[:, i:i + 16]) for i in range(0, 64, 16)], dim=1) for o in originals]
        compressions = 1
        for round_ in range(4):
            to_plain = round_ % 2 == 0
            for block in list(cache.pool.blocks.values()):
                cache.pool.move(block, "dram" if to_plain else "cxl")
            compressions += 0 if to_plain else 1
            for layer in range(2):
                got = torch.stack(cache.read(0, layer))
                if to_plain:
                    assert torch.equal(got, torch.stack(previous[layer])), (round_, layer)
                assert ((got - originals[layer]).abs() <= compressions * bounds[layer]).all(), (round_, layer)
                previous[layer] = tuple(got)
        assert hook.stats.slices_restored == 2 * 4 * 2 and hook.stats.slices_compressed == 2 * 4 * 3


def test_decode_with_blocks_migrating_between_compressed_and_plain_tiers_mid_run() -> None:
    config = with_overrides(preset("tiny"), layers=2)
    model = LlamaModel(config, seed=0)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16)
    spec = DecodeSpec(batch=2, prompt_tokens=48, shared_prefix_tokens=16, decode_steps=6)
    with TieredKVCache(tiers("int8"), lay, capacities=CAPS, placement=Vector({"dram": 1.0})) as cache:
        hook = TierCompression.attach(cache)
        assert hook is not None

        def shuffle(step: int) -> None:  # every other step, every block to the other tier (as a daemon would)
            if step % 2:
                for block in list(cache.pool.blocks.values()):
                    cache.pool.move(block, "cxl" if block.tier == "dram" else "dram")

        result = run_decode(model, cache, spec, on_step=shuffle)
    assert hook.stats.slices_compressed > 0 and hook.stats.slices_restored > 0
    assert result.generated.shape == (2, 7) and result.moves > 0


def test_the_daemons_moves_out_of_a_compressed_tier_are_counted_at_compressed_size() -> None:
    # The daemon's executor, its report (bytes, migration_gbps) and the placement engine see the pool's records.
    codec = Codec("int8", "block", 16, 2, 64)
    with TieredKVCache(tiers("int8"), kv_layout(), capacities=CAPS, placement=Vector({"cxl": 1.0})) as cache:
        hook = TierCompression.attach(cache)
        assert hook is not None
        cache.add_sequence(0)
        fill(cache, ContiguousKV(2, 2, 64, max_len=64), 32)
        cache.read(0, 0), cache.read(0, 1)  # both full blocks compressed in place in the cxl tier
        daemon = MigrationDaemon(cache, get_policy("lru"))
        for block in list(cache.seqs[0].tables[0]):
            assert daemon.promote(block.id, "cxl", "dram").moved == 1
        report = daemon.report()
    assert report.moved == 2 and report.bytes == 2 * 2 * codec.compressed_bytes  # 2 blocks of 2 layer slices
    assert all(r.bytes == 2 * codec.compressed_bytes and r.decompress_seconds > 0 for r in report.records)
