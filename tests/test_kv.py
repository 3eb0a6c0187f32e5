"""The paged, tiered KV cache: block tables over per-tier arenas, prefix reuse, placement, moves between tiers
(page migration or copy, file tiers included), eviction, the access log, and attention through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tieremu.errors import KVError
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import PinnedLayers, Vector, placement_from
from tieremu.numa.topology import discover
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.llama import LlamaModel, preset

REPO = Path(__file__).resolve().parents[1]


def tier_map(tmp_path: Path, *, file_tier: bool = False) -> ResolvedTierMap:
    """Three memory tiers on whatever nodes exist here (missing ones emulated), optionally an NVMe directory."""
    text = REPO.joinpath("configs/tiers/cxl-expander.yaml").read_text()
    if file_tier:
        text += f"  - name: nvme\n    kind: file\n    path: {tmp_path / 'nvme'}\n"
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    return resolve(load_tier_map(path), discover("/"))


def layout(kind: str = "all-layers", block_tokens: int = 16, layers: int = 2) -> KVLayout:
    return KVLayout(layers=layers, kv_heads=2, head_dim=64, block_tokens=block_tokens, dtype=torch.float32,
                    layout=kind)


def fill(cache: TieredKVCache, ref: ContiguousKV, seq: int, n: int, start: int = 0, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + seq)
    for layer in range(cache.layout.layers):
        k = torch.randn(n, 2, 64, generator=g)
        v = torch.randn(n, 2, 64, generator=g)
        cache.write(seq, layer, start, k, v)
        ref.write(seq, layer, start, k, v)


def same_as_reference(cache: TieredKVCache, ref: ContiguousKV, seq: int) -> bool:
    return all(all(torch.equal(a, b) for a, b in zip(cache.read(seq, layer), ref.read(seq, layer), strict=True))
               for layer in range(cache.layout.layers))


def test_blocks_that_cannot_move_by_page_are_refused_with_a_size_that_works() -> None:
    with pytest.raises(KVError, match="use block_tokens that is a multiple of 4"):
        KVLayout(layers=1, kv_heads=2, head_dim=64, block_tokens=2, dtype=torch.float32)
    with pytest.raises(KVError, match="valid: all-layers, per-layer"):
        layout("by-head")


@pytest.mark.parametrize("kind", ["all-layers", "per-layer"])
@pytest.mark.parametrize("block_tokens", [8, 32])
def test_paged_reads_equal_what_was_written_across_tiers(tmp_path: Path, kind: str, block_tokens: int) -> None:
    lay = layout(kind, block_tokens)
    spread = Vector({"dram": 0.5, "cxl": 0.3, "far": 0.2})
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 64, "cxl": 64, "far": 64},
                       placement=spread) as cache:
        ref = ContiguousKV(lay.layers, 2, 64, max_len=512)
        for seq, n in enumerate([1, 37, 200]):
            cache.add_sequence(seq)
            fill(cache, ref, seq, n)
        fill(cache, ref, 2, 5, start=200, seed=1)  # decode-like appends into a partial block
        for seq in range(3):
            assert same_as_reference(cache, ref, seq)
        used = {t: cache.pool.used(t) for t in ("dram", "cxl", "far")}
        assert all(used.values()), used  # the vector spread blocks over every tier
        assert used["dram"] >= used["cxl"] >= used["far"]


def test_blocks_moved_between_tiers_keep_their_data_and_the_kernel_agrees(tmp_path: Path) -> None:
    lay = layout()
    with TieredKVCache(tier_map(tmp_path, file_tier=True), lay,
                       capacities={"dram": 32, "cxl": 32, "far": 32, "nvme": 32}) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        cache.add_sequence(0)
        fill(cache, ref, 0, 300)
        blocks = list(cache.seqs[0].tables[0])
        for i, block in enumerate(blocks):
            cache.move(block, ("cxl", "far", "nvme", "dram")[i % 4])
        assert {b.tier for b in blocks} == {"dram", "cxl", "far", "nvme"}
        assert cache.pool.used("nvme") == sum(1 for b in blocks if b.tier == "nvme")
        on_file = cache.pool.used("nvme")
        assert same_as_reference(cache, ref, 0)  # blocks on the file tier are read through the file, in place
        assert cache.pool.used("nvme") == on_file == 5
        io = cache.file_io()["nvme"]
        # One pread per block and layer read (two layers), of the layer's page-aligned span (16 KiB here).
        assert io.reads == on_file * 2 and io.bytes_read == on_file * 2 * lay.layer_slice_bytes
        assert cache.stats.traffic["nvme"].bytes_read == on_file * 2 * lay.layer_slice_bytes
        cache.move(blocks[-1], "nvme")  # a partly filled tail block on the file tier: appends go through the file
        written = io.bytes_written
        fill(cache, ref, 0, 20, start=300, seed=1)
        assert cache.file_io()["nvme"].bytes_written > written
        assert same_as_reference(cache, ref, 0)
        blocks = list(cache.seqs[0].tables[0])
        kinds = {(m.source, m.target): m.kind for m in cache.pool.moves}
        assert kinds[("dram", "nvme")] == "copy" and all(m.ok for m in cache.pool.moves)
        for placed in cache.verify():
            assert placed.on_tier == 1.0, placed
        assert sum(p.blocks for p in cache.verify()) == len(blocks)


def test_a_repeated_prompt_prefix_is_reused_and_says_which_tier_served_it(tmp_path: Path) -> None:
    lay = layout(block_tokens=16)
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 8, "cxl": 64, "far": 64}) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        prompt = list(range(100))  # 6 full blocks and a partial one
        assert cache.add_sequence(0, prompt).tokens == 0
        fill(cache, ref, 0, 100)
        hit = cache.add_sequence(1, prompt[:80] + [7] * 30)
        assert hit.tokens == 80 and sum(hit.blocks_by_tier.values()) == 5
        assert hit.blocks_by_tier == {"dram": 5}
        # The second sequence sees the shared prefix and appends its own tail after it.
        shared = cache.seqs[1].tables[0]
        assert all(b.refs == 2 for b in shared)
        with pytest.raises(KVError, match="write at position 0, but 80 tokens are written"):
            cache.write(1, 0, 0, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
        cache.free_sequence(0)
        cache.free_sequence(1)
        # Freed prefix blocks stay cached for the next request with the same prompt.
        assert cache.add_sequence(2, prompt).tokens == 96


def test_every_tier_full_evicts_cached_prefixes_then_refuses(tmp_path: Path) -> None:
    lay = layout(block_tokens=16)
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 2, "cxl": 2, "far": 0}) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        cache.add_sequence(0, list(range(64)))
        fill(cache, ref, 0, 64)  # 4 keyed blocks fill dram then spill to cxl
        assert (cache.pool.used("dram"), cache.pool.used("cxl")) == (2, 2)
        with pytest.raises(KVError, match="KV pool full: every block is in use"):
            cache.add_sequence(1)
            fill(cache, ref, 1, 16)
        cache.free_sequence(0)
        cache.free_sequence(1)
        cache.add_sequence(2, list(range(1000, 1064)))
        fill(cache, ref, 2, 64)
        assert cache.pool.evictions == 4


def test_layers_pinned_to_tiers_in_the_per_layer_layout(tmp_path: Path) -> None:
    lay = layout("per-layer", layers=4)
    pinned = placement_from({"pinned_layers": {"dram": [0, 1], "cxl": [2, 3]}}, ["dram", "cxl", "far"], 4)
    assert isinstance(pinned, PinnedLayers)
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 64, "cxl": 64, "far": 64},
                       placement=pinned) as cache:
        ref = ContiguousKV(4, 2, 64, max_len=512)
        cache.add_sequence(0)
        fill(cache, ref, 0, 70)
        tiers = [{b.tier for b in cache.seqs[0].tables[layer]} for layer in range(4)]
        assert tiers == [{"dram"}, {"dram"}, {"cxl"}, {"cxl"}]
    with pytest.raises(KVError, match="leaves layers \\[3\\] without a tier"):
        placement_from({"pinned_layers": {"dram": [0, 1, 2]}}, ["dram", "cxl"], 4)
    with pytest.raises(KVError, match=r"fractions sum to 0\.9"):
        placement_from({"vector": {"dram": 0.5, "cxl": 0.4}}, ["dram", "cxl"], 4)


def test_the_access_log_records_every_block_read_per_layer(tmp_path: Path) -> None:
    lay = layout(block_tokens=16)
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 64, "cxl": 64, "far": 64}) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        cache.add_sequence(0)
        fill(cache, ref, 0, 40)  # 3 blocks
        for layer in range(2):
            cache.read(0, layer)
        cache.end_step()
        cache.read(0, 1)
        log = cache.log.since()
        assert len(log) == 9 and list(log.step) == [0] * 6 + [1] * 3 and list(log.layer[:3]) == [0, 0, 0]
        assert cache.stats.traffic["dram"].blocks_read == 9
        assert cache.stats.traffic["dram"].bytes_read == 9 * lay.layer_slice_bytes


@pytest.mark.parametrize("kind", ["all-layers", "per-layer"])
def test_attention_over_paged_tiers_matches_contiguous_even_after_migration(tmp_path: Path, kind: str) -> None:
    config = preset("tiny")
    model = LlamaModel(config, seed=0)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16, torch.float32, kind)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab, (n,), generator=g) for n in (21, 64, 90)]
    seqs = [0, 1, 2]
    ref = ContiguousKV.for_model(config, max_len=256)
    spread = Vector({"dram": 0.4, "cxl": 0.4, "far": 0.2})
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 256, "cxl": 256, "far": 256},
                       placement=spread) as cache:
        for s in seqs:
            cache.add_sequence(s)
        got, want = model.prefill(cache, seqs, prompts), model.prefill(ref, seqs, prompts)
        torch.testing.assert_close(got, want)
        tokens, lengths = want.argmax(-1), [p.numel() for p in prompts]
        for step in range(6):
            if step == 3:  # mid-decode: move every other block one tier down (wrapping), then keep decoding
                for block in list(cache.pool.blocks.values())[::2]:
                    order = ["dram", "cxl", "far"]
                    cache.move(block, order[(order.index(block.tier) + 1) % 3])
            positions = [n + step for n in lengths]
            got = model.decode_step(cache, seqs, tokens, positions)
            want = model.decode_step(ref, seqs, tokens, positions)
            cache.end_step()
            torch.testing.assert_close(got, want)
            tokens = want.argmax(-1)
        assert cache.pool.moves and all(m.ok for m in cache.pool.moves)
        # And both equal a plain full-sequence forward.
        full = torch.cat([prompts[0], torch.tensor([0])])[:-1]
        torch.testing.assert_close(model.reference_logits(full)[-1], model.prefill(ContiguousKV.for_model(
            config, max_len=256), [9], [full])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("kind", "block_tokens", "group"), [("all-layers", 16, 2), ("per-layer", 32, 4),
                                                             ("all-layers", 64, 1)])
def test_the_paged_kernel_equals_sdpa_over_the_gathered_kv(tmp_path: Path, kind: str, block_tokens: int,
                                                           group: int) -> None:
    lay = layout(kind, block_tokens)
    spread = Vector({"dram": 0.4, "cxl": 0.4, "far": 0.2})
    with TieredKVCache(tier_map(tmp_path), lay, capacities={"dram": 64, "cxl": 64, "far": 64},
                       placement=spread) as cache:
        ref = ContiguousKV(lay.layers, 2, 64, max_len=1024)
        g = torch.Generator().manual_seed(3)
        for seq, n in enumerate([1, block_tokens, 333]):
            cache.add_sequence(seq)
            fill(cache, ref, seq, n)
        for rnd in range(2):
            if rnd:  # and again after moving every block one tier down
                for block in list(cache.pool.blocks.values()):
                    cache.move(block, {"dram": "cxl", "cxl": "far", "far": "dram"}[block.tier])
            for seq in range(3):
                for layer in range(lay.layers):
                    q = torch.randn(2 * group, 64, generator=g)
                    got = cache.attend(seq, layer, q, 0.125)
                    k, v = cache.read(seq, layer)
                    want = torch.nn.functional.scaled_dot_product_attention(
                        q.reshape(1, 2, group, 64), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                        scale=0.125).reshape(2 * group, 64)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
