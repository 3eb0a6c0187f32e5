"""The GPU HBM tier (`kind: cuda`) and host-to-device staging of KV blocks.

Without a GPU the device-side code still runs here: a real cuda tier is resolved with `cuda_devices=1` (no CUDA
touched), then its torch device is set to the CPU, which stands in for the GPU (a device arena in CPU memory,
a staging buffer whose host side is not pinned). Tests that need the real thing are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixture_paths import fixture_root

from tieremu.cli import main
from tieremu.errors import ConfigError, KVError, ResolutionError, WorkloadError
from tieremu.kv.arena import DeviceArena, NumaArena
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Vector
from tieremu.kv.staging import StagingBuffer
from tieremu.numa.topology import discover
from tieremu.tiers import resolve as resolve_mod
from tieremu.tiers.check import check_tier, check_tiers
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import Backing, ResolvedTierMap, probe_cuda, resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.decode import DecodeSpec, run_decode
from tieremu.workloads.jobs import decode_device
from tieremu.workloads.llama import LlamaModel, preset

REPO = Path(__file__).resolve().parents[1]
GPU_HBM = REPO / "configs" / "tiers" / "gpu-hbm.yaml"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; torch.cuda.is_available() is False on "
                                                 "this machine")
no_cuda_here = pytest.mark.skipif(CUDA, reason="checks the behaviour of a machine without CUDA")
ONE_NODE = fixture_root("one-node-vm")
CALIBRATION = Calibration(machine="test", created_utc="", node=0, latency_ns=100.0,
                          bandwidth_gbps={"read": 10.0, "write": 8.0, "copy": 7.0}, latency_by_node={0: 100.0},
                          read_gbps_by_node={0: 10.0})


def write_map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    return path


def hbm_map(tmp_path: Path, hbm: str = "", *, nvme: bool = False) -> Path:
    """gpu-hbm.yaml with extra keys on its hbm tier (and optionally a file tier at the end)."""
    text = GPU_HBM.read_text().replace("    device: 0\n", "    device: 0\n" + hbm)
    if nvme:
        text += f"  - name: nvme\n    kind: file\n    path: {tmp_path / 'nvme'}\n"
    return write_map(tmp_path, text)


def cpu_standing_in_for_gpu(tmp_path: Path | None = None, *, nvme: bool = False) -> ResolvedTierMap:
    """gpu-hbm resolved on this machine as if it had a GPU, with the CPU as that GPU: hbm is a device arena in
    CPU memory, dram and cxl are NUMA arenas."""
    tier_map = load_tier_map(hbm_map(tmp_path, nvme=nvme) if tmp_path is not None else GPU_HBM)
    resolved = resolve(tier_map, discover("/"), vm=False, cuda_devices=1)
    return ResolvedTierMap(resolved.tier_map, tuple(replace(t, device="cpu") if t.device else t
                                                    for t in resolved.tiers))


def layout(kind: str = "all-layers", layers: int = 2) -> KVLayout:
    return KVLayout(layers=layers, kv_heads=2, head_dim=64, block_tokens=16, dtype=torch.float32, layout=kind)


def fill(cache: TieredKVCache, ref: ContiguousKV, seq: int, n: int) -> None:
    g = torch.Generator().manual_seed(100 + seq)
    for layer in range(cache.layout.layers):
        k, v = torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g)
        cache.write(seq, layer, 0, k, v)
        ref.write(seq, layer, 0, k, v)


SPREAD = Vector({"hbm": 0.4, "dram": 0.3, "cxl": 0.3})
ROOMY = {"hbm": 64, "dram": 64, "cxl": 64}


# ---- tier maps --------------------------------------------------------------------------------------------------

def test_the_shipped_gpu_map_has_an_hbm_tier_on_cuda_device_0() -> None:
    tm = load_tier_map(GPU_HBM)
    assert tm.names == ("hbm", "dram", "cxl")
    hbm = tm.tier("hbm")
    assert hbm.kind == "cuda" and hbm.is_cuda and not hbm.is_file
    assert (hbm.device, hbm.capacity_mib, hbm.allow_emulation, hbm.nodes) == (0, 64, True, ())
    assert not tm.tier("dram").is_cuda and tm.tier("dram").device is None


def test_a_cuda_tier_defaults_to_device_0_and_takes_its_own_keys(tmp_path: Path) -> None:
    tm = load_tier_map(write_map(tmp_path, "name: g\ntiers:\n  - name: hbm\n    kind: cuda\n"
                                           "  - {name: hbm1, kind: cuda, device: 1, capacity_mib: 8,\n"
                                           "     emulate: {latency_ratio: 1.5}, description: second GPU}\n"))
    assert tm.tier("hbm").device == 0 and not tm.tier("hbm").allow_emulation
    second = tm.tier("hbm1")
    assert second.device == 1 and second.capacity_mib == 8 and second.description == "second GPU"
    assert second.emulate is not None and second.emulate.latency_ratio == 1.5


@pytest.mark.parametrize(("tier", "message"), [
    ("{name: hbm, kind: cuda, nodes: [0]}",
     "tiers[0].nodes: unknown key; valid keys here: allow_emulation, capacity_mib, compression, description, device, "
     "emulate, kind, name"),
    ("{name: hbm, kind: cuda, policy: bind}", "tiers[0].policy: unknown key"),
    ("{name: hbm, kind: cuda, shape: true}", "tiers[0].shape: unknown key"),
    ("{name: hbm, kind: cuda, device: -1}", "tiers[0].device: -1: must be an integer >= 0 and <= 1023"),
    ("{name: hbm, kind: cuda, device: gpu0}", "tiers[0].device: expected int, got 'gpu0'"),
    ("{name: hbm, kind: cuda, capacity_mib: 0}", "tiers[0].capacity_mib: 0: must be an integer >= 1"),
    ("{name: hbm, kind: cuda, emulate: {bandwidth_ratio: 0.5, bandwidth_gbps: 3}}",
     "tiers[0].emulate.bandwidth_gbps: give bandwidth_gbps or bandwidth_ratio, not both"),
    ("{name: hbm, kind: gpu}", "tiers[0].kind: 'gpu' is not valid; valid: numa, file, cuda"),
])
def test_bad_cuda_tiers_are_refused_with_the_key_and_what_is_valid(tmp_path: Path, tier: str, message: str) -> None:
    path = write_map(tmp_path, f"name: g\ntiers:\n  - {tier}\n")
    with pytest.raises(ConfigError) as info:
        load_tier_map(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


# ---- resolution ---------------------------------------------------------------------------------------------------

def test_without_cuda_an_allowed_hbm_tier_is_emulated_in_host_memory_and_says_so() -> None:
    resolved = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=0)
    hbm = resolved.tier("hbm")
    assert (hbm.backing, hbm.nodes, hbm.device, hbm.describe_backing) == (Backing.EMULATED, (0,), None, "emulated")
    assert hbm.reason == ("no CUDA device here (torch.cuda.is_available() is False); held in host memory on node 0 "
                          "at host speed")
    assert resolved.tier("dram").backing is Backing.REAL and resolved.tier("cxl").backing is Backing.EMULATED


def test_without_cuda_and_without_allow_emulation_the_error_names_tier_device_and_fix(tmp_path: Path) -> None:
    strict = load_tier_map(write_map(tmp_path, "name: g\ntiers:\n  - {name: hbm, kind: cuda, device: 0}\n"))
    with pytest.raises(ResolutionError) as info:
        resolve(strict, discover(ONE_NODE), vm=False, cuda_devices=0)
    msg = str(info.value)
    assert msg.startswith("tier 'hbm': asks for CUDA device 0, but there is no CUDA device here "
                          "(torch.cuda.is_available() is False); CUDA devices here: none.")
    assert "allow_emulation: true" in msg


def test_with_a_gpu_the_hbm_tier_is_real_on_its_device_and_holds_no_numa_node() -> None:
    resolved = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=1)
    hbm = resolved.tier("hbm")
    assert (hbm.backing, hbm.nodes, hbm.device) == (Backing.REAL, (), "cuda:0")
    assert hbm.describe_backing == "real (cuda:0)" and hbm.backing.origin == "measured"
    assert "CUDA device 0 exists" in hbm.reason


def test_a_device_index_past_the_last_gpu_is_emulated_or_refused_naming_the_devices(tmp_path: Path) -> None:
    path = write_map(tmp_path, "name: g\ntiers:\n  - {name: hbm, kind: cuda, device: 2, allow_emulation: true}\n"
                               "  - {name: hbm9, kind: cuda, device: 9}\n")
    tm = load_tier_map(path)
    with pytest.raises(ResolutionError, match=r"tier 'hbm9': asks for CUDA device 9, but there is no CUDA device 9 "
                                              r"here; CUDA devices here: 0-1\..*or change its device"):
        resolve(tm, discover(ONE_NODE), vm=False, cuda_devices=2)
    only_first = replace(tm, tiers=tm.tiers[:1])
    hbm = resolve(only_first, discover(ONE_NODE), vm=False, cuda_devices=2).tier("hbm")
    assert hbm.backing is Backing.EMULATED and hbm.reason.startswith("no CUDA device 2 here; held in host memory")


def test_an_emulated_hbm_tier_runs_at_host_speed_and_cannot_be_made_faster(tmp_path: Path) -> None:
    resolved = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=0,
                       calibration=CALIBRATION)
    model = resolved.tier("hbm").timing
    assert model is not None and model.extra_latency_ns == 0.0 and model.bandwidth_ratio("read") == 1.0
    # Real HBM is faster than DRAM, but an emulated tier can only be slowed down from the memory that holds it.
    fast = load_tier_map(hbm_map(tmp_path, "    emulate: {bandwidth_ratio: 5}\n"))
    with pytest.raises(ResolutionError, match=r"tier 'hbm': target read bandwidth 50\.0 GB/s is above"):
        resolve(fast, discover(ONE_NODE), vm=False, cuda_devices=0, calibration=CALIBRATION)
    # A real one gets no timing model at all: its speed is the device's.
    real = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=1, calibration=CALIBRATION)
    assert real.tier("hbm").timing is None


def test_cuda_is_probed_only_for_maps_with_a_cuda_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def probe() -> resolve_mod.CudaDevices:
        calls.append(1)
        return resolve_mod.CudaDevices(0, "probe says no")

    monkeypatch.setattr(resolve_mod, "probe_cuda", probe)
    resolve(load_tier_map(REPO / "configs/tiers/cxl-expander.yaml"), discover(ONE_NODE), vm=False)
    assert calls == []
    hbm = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False).tier("hbm")
    assert calls == [1] and hbm.reason.startswith("no CUDA device here (probe says no)")
    resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=0)
    assert calls == [1]  # an injected count is taken as it is


def test_the_probe_agrees_with_torch() -> None:
    found = probe_cuda()
    assert found.count == (torch.cuda.device_count() if CUDA else 0)
    assert (found.why_none == "torch.cuda.is_available() is False") == (not CUDA)


# ---- the check command ----------------------------------------------------------------------------------------

def test_check_writes_to_a_device_tier_and_labels_an_emulated_one() -> None:
    emulated = check_tiers(resolve(load_tier_map(GPU_HBM), discover("/"), vm=False, cuda_devices=0), 1 << 20)
    hbm = emulated[0]
    assert (hbm.tier, hbm.backing, hbm.status, hbm.achieved_fraction) == ("hbm", "emulated", "emulated", 1.0)
    assert hbm.reason.startswith("no CUDA device here")
    device_tier = cpu_standing_in_for_gpu().tier("hbm")
    real = check_tier(device_tier, 1 << 20)
    assert (real.backing, real.status, real.nodes, real.achieved_fraction) == ("real (cpu)", "enforced", (), 1.0)
    assert real.reason.startswith("1 MiB written to cpu and read back")


@no_cuda_here
def test_tieremu_check_on_the_gpu_map_here_says_emulated() -> None:
    out = CliRunner().invoke(main, ["check", "--tiers", str(GPU_HBM), "--json"])
    assert out.exit_code == 0, out.output
    assert '"backing": "emulated"' in out.output and "held in host memory on node 0 at host speed" in out.output


# ---- arenas and moves -----------------------------------------------------------------------------------------------

def test_a_device_arena_hands_out_and_takes_back_slots() -> None:
    tier = cpu_standing_in_for_gpu().tier("hbm")
    arena = DeviceArena(tier, layout(), 3, torch.device("cpu"))
    assert arena.blocks.shape == (3, *layout().block_shape) and arena.blocks.device.type == "cpu"
    assert arena.host_addressable and not bool(arena.blocks.any())
    slots = [arena.take() for _ in range(3)]
    assert slots == [0, 1, 2] and arena.free_slots == 0
    with pytest.raises(KVError, match=r"device tier 'hbm' \(cpu\) has no free slot \(all 3 hold blocks\)"):
        arena.take()
    arena.give_back(1)
    assert arena.take() == 1


def test_the_pool_gives_a_real_cuda_tier_a_device_arena_and_an_emulated_one_numa_memory(tmp_path: Path) -> None:
    with TieredKVCache(cpu_standing_in_for_gpu(), layout(), capacities=ROOMY) as cache:
        arenas = cache.pool.arenas
        assert isinstance(arenas["hbm"], DeviceArena) and arenas["hbm"].slots == 64
        assert isinstance(arenas["dram"], NumaArena) and isinstance(arenas["cxl"], NumaArena)
        assert arenas["dram"].slots == 128  # NUMA arenas reserve room for the NUMA tiers' blocks only
    emulated = resolve(load_tier_map(GPU_HBM), discover("/"), vm=False, cuda_devices=0)
    with TieredKVCache(emulated, layout(), capacities=ROOMY) as cache:
        assert isinstance(cache.pool.arenas["hbm"], NumaArena)


def test_a_block_moved_to_the_device_tier_and_back_keeps_its_bytes_by_copy(tmp_path: Path) -> None:
    lay = layout()
    with TieredKVCache(cpu_standing_in_for_gpu(tmp_path, nvme=True), lay,
                       capacities={"hbm": 8, "dram": 8, "cxl": 8, "nvme": 8}, placement=Vector({"dram": 1.0})) as c:
        ref = ContiguousKV(lay.layers, 2, 64, max_len=128)
        c.add_sequence(0)
        fill(c, ref, 0, 40)  # 3 blocks in dram
        block = c.seqs[0].tables[0][0]
        before = c.pool.arenas["dram"].blocks[block.slot].clone()
        route = ["hbm", "dram", "hbm", "cxl", "hbm", "nvme", "hbm"]
        for target in route:
            record = c.move(block, target)
            assert record.ok and record.kind == "copy" and record.bytes == lay.block_bytes, record
        assert block.tier == "hbm" and block.arena == "hbm"
        assert torch.equal(c.pool.arenas["hbm"].blocks[block.slot], before)
        assert c.pool.used("hbm") == 1 and c.pool.arenas["hbm"].free_slots == 7
        assert [(m.source, m.target) for m in c.pool.moves] == list(zip(["dram", *route], route, strict=False))
        c.move(block, "dram")
        assert torch.equal(c.pool.arenas["dram"].blocks[block.slot], before)
        assert all(torch.equal(a, b) for layer in range(lay.layers)
                   for a, b in zip(c.read(0, layer), ref.read(0, layer), strict=True))


def test_verify_reports_a_device_tier_without_pages_and_the_numa_tiers_by_page(tmp_path: Path) -> None:
    with TieredKVCache(cpu_standing_in_for_gpu(), layout(), capacities=ROOMY, placement=SPREAD) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        cache.add_sequence(0)
        fill(cache, ref, 0, 300)
        placed = {p.tier: p for p in cache.verify()}
        assert placed["hbm"].blocks == cache.pool.used("hbm") > 0
        assert (placed["hbm"].pages, placed["hbm"].on_tier, placed["hbm"].by_node) == (0, 1.0, {})
        assert placed["dram"].pages > 0 and placed["dram"].on_tier == 1.0 and placed["dram"].by_node


# ---- staging ------------------------------------------------------------------------------------------------------

def test_the_staging_buffer_copies_what_was_gathered_and_grows_only_when_needed() -> None:
    buf = StagingBuffer((2, 4), torch.float32, torch.device("cpu"))
    assert not buf.pinned and buf.capacity == 0
    host = buf.host(3)
    host.copy_(torch.arange(24.0).reshape(3, 2, 4))
    across = buf.to_device(3)
    assert torch.equal(across, torch.arange(24.0).reshape(3, 2, 4))
    assert across.data_ptr() != host.data_ptr()  # two buffers, as host and GPU memory are
    assert (buf.capacity, buf.grown) == (3, 1)
    buf.host(2)
    assert (buf.capacity, buf.grown) == (3, 1)  # reused
    buf.host(4)
    assert (buf.capacity, buf.grown) == (6, 2)  # doubled
    with pytest.raises(KVError, match="7 blocks asked to be copied, but only 6 were staged"):
        buf.to_device(7)


@no_cuda_here
def test_a_pinned_staging_buffer_without_cuda_is_refused() -> None:
    with pytest.raises(KVError, match=r"pinned staging buffer needs CUDA \(torch.cuda.is_available\(\) is False\)"):
        StagingBuffer((2, 4), torch.float32, torch.device("cpu"), pin=True)


@pytest.mark.parametrize("kind", ["all-layers", "per-layer"])
def test_a_staged_read_equals_the_direct_read_bit_for_bit_and_counts_host_bytes(kind: str) -> None:
    lay = layout(kind)
    resolved = cpu_standing_in_for_gpu()
    with TieredKVCache(resolved, lay, capacities=ROOMY, placement=SPREAD) as direct, \
            TieredKVCache(resolved, lay, capacities=ROOMY, placement=SPREAD, stage=True) as staged:
        for cache in (direct, staged):
            ref = ContiguousKV(lay.layers, 2, 64, max_len=512)
            for seq, n in enumerate([1, 16, 200]):
                cache.add_sequence(seq)
                fill(cache, ref, seq, n)
        assert {b.tier for b in staged.pool.blocks.values()} == {"hbm", "dram", "cxl"}
        for seq in range(3):
            for layer in range(lay.layers):
                for got, want in zip(staged.read(seq, layer), direct.read(seq, layer), strict=True):
                    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert staged._staging is not None and not staged._staging.pinned
        slice_bytes = lay.layer_slice_bytes
        for tier in ("hbm", "dram", "cxl"):
            read = staged.stats.traffic[tier]
            assert read.bytes_read == direct.stats.traffic[tier].bytes_read > 0
            # Blocks already on the "device" are read in place; the host tiers' are staged, every byte read.
            assert read.bytes_staged == (0 if tier == "hbm" else read.blocks_read * slice_bytes)
            assert direct.stats.traffic[tier].bytes_staged == 0
        # The staged cache leaves attention to the model (the C kernel reads host memory in place).
        assert staged.attend(2, 0, torch.zeros(4, 64), 0.125) is None
        assert direct.attend(2, 0, torch.zeros(4, 64), 0.125) is not None


def test_a_staged_read_stays_valid_after_the_next_read_reuses_the_buffer() -> None:
    lay = layout()
    with TieredKVCache(cpu_standing_in_for_gpu(), lay, capacities=ROOMY, placement=Vector({"dram": 1.0}),
                       stage=True) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=512)
        for seq, n in enumerate([100, 100]):
            cache.add_sequence(seq)
            fill(cache, ref, seq, n)
        first = cache.read(0, 0)
        cache.read(1, 0)
        assert all(torch.equal(a, b) for a, b in zip(first, ref.read(0, 0), strict=True))


def test_attention_over_device_and_numa_arenas_matches_sdpa_over_contiguous_kv() -> None:
    lay = layout()
    g = torch.Generator().manual_seed(5)
    with TieredKVCache(cpu_standing_in_for_gpu(), lay, capacities=ROOMY, placement=SPREAD) as direct, \
            TieredKVCache(cpu_standing_in_for_gpu(), lay, capacities=ROOMY, placement=SPREAD, stage=True) as staged:
        refs = []
        for cache in (direct, staged):
            ref = ContiguousKV(lay.layers, 2, 64, max_len=512)
            for seq, n in enumerate([5, 77, 250]):
                cache.add_sequence(seq)
                fill(cache, ref, seq, n)
            refs.append(ref)
        for block in list(staged.pool.blocks.values())[::3]:  # and some blocks moved by copy onto the device tier
            if block.tier != "hbm":
                staged.move(block, "hbm")
        assert {b.tier for b in direct.pool.blocks.values()} == {"hbm", "dram", "cxl"}
        for seq in range(3):
            for layer in range(lay.layers):
                q = torch.randn(4, 64, generator=g)
                k_ref, v_ref = refs[0].read(seq, layer)
                want = torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(1, 2, 2, 64), k_ref.transpose(0, 1).unsqueeze(0), v_ref.transpose(0, 1).unsqueeze(0),
                    scale=0.125).reshape(4, 64)
                # The C kernel reading the device arena's blocks and the NUMA arenas' blocks where they lie.
                torch.testing.assert_close(direct.attend(seq, layer, q, 0.125), want, rtol=1e-5, atol=1e-5)
                k, v = staged.read(seq, layer)
                got = torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(1, 2, 2, 64), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    scale=0.125).reshape(4, 64)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_through_staged_reads_equals_decode_in_place() -> None:
    config = preset("tiny")
    model = LlamaModel(config, seed=0)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16, torch.float32)
    spec = DecodeSpec(batch=2, prompt_tokens=64, shared_prefix_tokens=16, decode_steps=4)
    results = []
    for stage in (False, True):
        with TieredKVCache(cpu_standing_in_for_gpu(), lay, capacities=ROOMY, placement=SPREAD,
                           stage=stage) as cache:
            results.append(run_decode(model, cache, spec))
    plain, staged = results
    assert torch.equal(plain.generated, staged.generated)
    assert not any(plain.kv_bytes_staged.values())
    assert staged.kv_bytes_staged["hbm"] == 0
    for tier in ("dram", "cxl"):
        assert staged.kv_bytes_staged[tier] == staged.kv_bytes_read[tier] > 0


# ---- the model's device and the decode job ----------------------------------------------------------------------

@no_cuda_here
def test_a_model_on_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(WorkloadError, match=r"device 'cuda': no CUDA device here \(torch.cuda.is_available\(\) is "
                                            r"False\); use cpu"):
        LlamaModel(preset("tiny"), device="cuda")


def test_a_store_on_another_device_than_the_model_is_refused_before_any_work() -> None:
    config = preset("tiny")
    model = LlamaModel(config)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16, torch.float32)
    with TieredKVCache(cpu_standing_in_for_gpu(), lay, capacities=ROOMY) as cache:
        model.device = torch.device("cuda", 0)  # as if the model had been built on a GPU
        with pytest.raises(WorkloadError, match="the model runs on cuda:0 but the KV cache returns K/V on cpu"):
            run_decode(model, cache, DecodeSpec(batch=1, prompt_tokens=32, shared_prefix_tokens=0))
        assert not cache.seqs


def test_the_decode_job_runs_where_the_hbm_tier_is() -> None:
    emulated = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=0)
    real = resolve(load_tier_map(GPU_HBM), discover(ONE_NODE), vm=False, cuda_devices=1)
    assert decode_device("auto", emulated) == "cpu"
    assert decode_device("auto", real) == "cuda:0"
    assert decode_device("cuda", emulated) == "cuda:0"  # model on the GPU, every block staged from host tiers
    assert decode_device("cpu", real) == "cpu"


@no_cuda_here
def test_a_decode_job_asking_for_cuda_here_fails_at_load(tmp_path: Path) -> None:
    from tieremu.runner.spec import load_experiment

    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: g\ntiers: {GPU_HBM}\njobs:\n  - {{kind: decode, policies: [lru], device: cuda}}\n")
    with pytest.raises(ConfigError, match=r"device: 'cuda' asked, but there is no CUDA device here "
                                          r"\(torch.cuda.is_available\(\) is False\); use device: auto"):
        load_experiment(spec)
    spec.write_text(f"name: g\ntiers: {GPU_HBM}\njobs:\n  - {{kind: decode, policies: [lru], device: tpu}}\n")
    with pytest.raises(ConfigError, match="'tpu' is not valid; valid: auto, cpu, cuda"):
        load_experiment(spec)


def test_execute_mode_replay_refuses_cuda_tiers() -> None:
    from tieremu.policy.registry import get_policy
    from tieremu.workloads.execute import execute
    from tieremu.workloads.trace import read_trace

    resolved = resolve(load_tier_map(GPU_HBM), discover("/"), vm=False, cuda_devices=0)
    requests = read_trace(REPO / "configs/traces/small.jsonl")[:2]
    with pytest.raises(ConfigError, match="tier\\(s\\) hbm are cuda tiers; execute-mode replay keeps blocks in NUMA "
                                          "memory tiers only"):
        execute(requests, resolved, get_policy("lru"))


def test_a_decode_job_on_the_gpu_map_runs_here_with_hbm_labelled_emulated(tmp_path: Path) -> None:
    from experiment_runs import run_jobs

    rows = run_jobs(tmp_path, GPU_HBM, "  - {kind: decode, policies: [lru], prompt_tokens: 96, shared_prefix_tokens: "
                    "32,\n     decode_steps: 3, fast_capacity_mib: 0.25}\n")
    assert len([r for r in rows if r["metric"] == "tpot_ms"]) == 3 * 3  # lru and the two bounds
    fastest = [r for r in rows if "all-fastest" in r["run"]]
    hbm_read = [r for r in fastest if r["metric"] == "kv_bytes_per_token" and r["tier"] == "hbm"]
    assert hbm_read and hbm_read[0]["value"] > 0 and hbm_read[0]["origin"] == "emulated"
    assert not [r for r in rows if r["metric"] == "kv_staged_bytes_per_token"]  # the model ran on the CPU here


# ---- on a GPU -------------------------------------------------------------------------------------------------------

@needs_cuda
def test_on_a_gpu_the_pool_puts_hbm_blocks_in_device_memory_and_staging_is_pinned() -> None:
    resolved = resolve(load_tier_map(GPU_HBM), discover("/"))
    assert resolved.tier("hbm").device == "cuda:0"
    lay = layout()
    with TieredKVCache(resolved, lay, capacities=ROOMY, placement=SPREAD) as direct, \
            TieredKVCache(resolved, lay, capacities=ROOMY, placement=SPREAD, device="cuda") as on_gpu:
        arena = on_gpu.pool.arenas["hbm"]
        assert isinstance(arena, DeviceArena) and arena.blocks.device == torch.device("cuda", 0)
        for cache in (direct, on_gpu):
            ref = ContiguousKV(2, 2, 64, max_len=512)
            for seq, n in enumerate([3, 130]):
                cache.add_sequence(seq)
                fill(cache, ref, seq, n)
        for seq in range(2):
            for layer in range(2):
                for got, want in zip(on_gpu.read(seq, layer), direct.read(seq, layer), strict=True):
                    assert got.device == torch.device("cuda", 0) and torch.equal(got.cpu(), want.cpu())
        assert on_gpu._staging is not None and on_gpu._staging.pinned
        assert on_gpu.stats.traffic["dram"].bytes_staged > 0 and on_gpu.stats.traffic["hbm"].bytes_staged == 0
        # A model on the CPU reads the GPU tier's blocks by copying them over (no C kernel over device memory).
        assert direct.attend(1, 0, torch.zeros(4, 64), 0.125) is None
        check = check_tier(resolved.tier("hbm"), 1 << 20)
        assert check.backing == "real (cuda:0)" and check.status == "enforced"


@needs_cuda
def test_on_a_gpu_a_block_moves_to_hbm_and_back_and_to_a_file_tier_intact(tmp_path: Path) -> None:
    resolved = resolve(load_tier_map(hbm_map(tmp_path, nvme=True)), discover("/"))
    lay = layout()
    with TieredKVCache(resolved, lay, capacities={"hbm": 4, "dram": 4, "cxl": 4, "nvme": 4},
                       placement=Vector({"dram": 1.0})) as cache:
        ref = ContiguousKV(2, 2, 64, max_len=64)
        cache.add_sequence(0)
        fill(cache, ref, 0, 16)
        block = cache.seqs[0].tables[0][0]
        before = cache.pool.arenas["dram"].blocks[block.slot].clone()
        for target in ("hbm", "nvme", "hbm", "dram"):
            assert cache.move(block, target).kind == "copy"
        assert torch.equal(cache.pool.arenas["dram"].blocks[block.slot], before)


@needs_cuda
def test_decode_on_a_gpu_matches_decode_on_the_cpu() -> None:
    config = preset("tiny")
    resolved = resolve(load_tier_map(GPU_HBM), discover("/"))
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, 16, torch.float32)
    spec = DecodeSpec(batch=2, prompt_tokens=64, shared_prefix_tokens=16, decode_steps=4)
    results = []
    for device in ("cpu", "cuda"):
        with TieredKVCache(resolved, lay, capacities=ROOMY, placement=SPREAD, device=device) as cache:
            results.append(run_decode(LlamaModel(config, seed=0, device=device), cache, spec))
    cpu, gpu = results
    assert torch.equal(cpu.generated, gpu.generated)
    assert gpu.kv_bytes_staged["dram"] > 0 and not any(cpu.kv_bytes_staged.values())



def test_host_memory_paths_leave_a_gpu_tier_to_its_own_probe_and_the_attach_daemon_refuses_it(tmp_path: Path) -> None:
    """A real GPU tier has no NUMA node: the host-memory probe passes over it and `tieremu daemon --pid`, which
    moves another process's pages between nodes, refuses it by name."""
    from tieremu.daemon.attach import tiers_from_map
    from tieremu.daemon.proctrack import AttachError
    from tieremu.probe.emulated import probe_tiers
    from tieremu.runner.experiment import tier_resolution

    p = tmp_path / "gpu.yaml"
    p.write_text("name: g\ntiers:\n  - {name: hbm, kind: cuda, device: 0}\n  - {name: dram, nodes: [0]}\n")
    tier_map = load_tier_map(p)
    resolved = resolve(tier_map, discover("/"), cuda_devices=1)
    cal = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                      bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0}, latency_by_node={0: 100.0},
                      read_gbps_by_node={0: 20.0})
    rows = probe_tiers(resolved, cal, 0, kernels_=("read",), size=8 << 20, working_set=8 << 20, repeats=1)
    assert [(r.tier, r.metric) for r in rows] == [("dram", "latency_ns"), ("dram", "read_gb_per_s")]
    manifest = {t["tier"]: t for t in tier_resolution(resolved)}
    assert manifest["hbm"]["kind"] == "cuda" and manifest["hbm"]["device"] == "cuda:0"
    assert manifest["dram"]["device"] is None
    with pytest.raises(AttachError, match="tier hbm of g is a cuda tier: another process's pages can only move "
                                          "between NUMA nodes"):
        tiers_from_map(tier_map, discover("/"), 2 << 20)
