"""A decode over four tiers (HBM, DRAM, CXL, NVMe) with small capacities: blocks fill the tiers in order and spill
to the file tier, attention reads every tier where its blocks live (the file tier's through the file), bytes are
counted per tier and step, and the emulated GPU's PCIe link is charged its model's time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from experiment_runs import run_jobs

from tieremu.errors import ConfigError
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Vector
from tieremu.numa import syscalls
from tieremu.numa.pages import PAGE_SIZE, page_addresses
from tieremu.numa.topology import discover
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import Backing, ResolvedTierMap, resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.decode import DecodeSpec, run_decode
from tieremu.workloads.llama import LlamaModel, preset

REPO = Path(__file__).resolve().parents[1]
FOUR_TIER = REPO / "configs" / "tiers" / "four-tier.yaml"
TIERS = ("hbm", "dram", "cxl", "nvme")
CAL = Calibration(machine="test", created_utc="", node=0, latency_ns=100.0,
                  bandwidth_gbps={"read": 10.0, "write": 8.0, "copy": 7.0}, latency_by_node={0: 100.0},
                  read_gbps_by_node={0: 10.0})


def four_tier_map(tmp_path: Path) -> Path:
    """The shipped map with its NVMe directory under the test's own folder."""
    text = FOUR_TIER.read_text().replace("/var/tmp/tieremu-nvme", str(tmp_path / "nvme"))
    assert str(tmp_path) in text
    path = tmp_path / "four-tier.yaml"
    path.write_text(text)
    return path


def resolved_here(tmp_path: Path) -> ResolvedTierMap:
    # cuda_devices=0: the HBM tier is the emulated one on every machine (this test is about its model).
    return resolve(load_tier_map(four_tier_map(tmp_path)), discover("/"), vm=False, calibration=CAL,
                   cuda_devices=0)


def test_a_four_tier_decode_reads_every_tier_and_charges_the_emulated_link(tmp_path: Path) -> None:
    resolved = resolved_here(tmp_path)
    backing = {t.name: t.backing for t in resolved.tiers}
    assert backing["hbm"] == Backing.EMULATED and backing["nvme"] == Backing.REAL
    assert backing["cxl"] == (Backing.REAL if 1 in discover("/").memory_nodes else Backing.EMULATED)
    hbm = resolved.tier("hbm")
    assert hbm.timing is not None and hbm.timing.link is not None
    config = preset("tiny")
    layout = KVLayout(config.layers, config.kv_heads, config.head_dim, 128, torch.float32)  # 256 KiB blocks
    spec = DecodeSpec(batch=4, prompt_tokens=512, shared_prefix_tokens=128, decode_steps=4, seed=3)
    model = LlamaModel(config, seed=0)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    with TieredKVCache(resolved, layout, injector=injector) as cache:  # capacities: the map's capacity_mib
        assert cache.pool.capacity == {"hbm": 4, "dram": 4, "cxl": 4, "nvme": 256}
        result = run_decode(model, cache, spec)
        used = {t: cache.pool.used(t) for t in TIERS}
        # Filled in order, each up to its capacity, the rest spilled to NVMe.
        assert used["hbm"] == used["dram"] == used["cxl"] == 4 and used["nvme"] > 0, used
        dram_blocks = cache.pool.on("dram")
        dram_addrs = np.concatenate([page_addresses(cache.pool.arenas[b.arena].addr(b.slot), layout.block_bytes)
                                     for b in dram_blocks])
        # The kernel, asked directly (move_pages with no target), has every DRAM block's pages on node 0.
        nodes = syscalls.query_pages(dram_addrs)
        link = injector.link_audits["hbm"]
        io = cache.file_io()["nvme"]
    for tier in TIERS:
        assert result.kv_bytes_read[tier] > 0, (tier, result.kv_bytes_read)
        assert all(step[tier] > 0 for step in result.kv_bytes_read_by_step), tier
    assert len(result.kv_bytes_read_by_step) == spec.decode_steps
    for tier in TIERS:
        assert sum(step[tier] for step in result.kv_bytes_read_by_step) == result.kv_bytes_read[tier]
    # Each step reads every resident block of every sequence once per layer: bytes = blocks x layer slice.
    assert all(b % layout.layer_slice_bytes == 0 for b in result.kv_bytes_read.values())
    assert len(nodes) == 4 * layout.block_bytes // PAGE_SIZE and set(nodes.tolist()) == {0}
    [dram] = [p for p in result.placement_end if p.tier == "dram"]
    assert dram.pages == len(nodes) and dram.on_tier == 1.0 and dram.by_node == {0: len(nodes)}
    # The link model, computed independently: every crossing costs 2 us plus its bytes at 25 GB/s.
    assert link.gbps == 25 and link.latency_ns == 2000
    assert link.owed_ns == pytest.approx(link.transfers * 2000 + link.charged_bytes / 25.0)
    off_gpu = sum(result.kv_bytes_read[t] for t in ("dram", "cxl", "nvme"))
    # Paid by the busy-wait: never less than owed (a preempted spin can only overshoot on a loaded machine).
    assert link.charged_bytes >= off_gpu and link.owed_ns > 0 and link.injected_ns >= 0.99 * link.owed_ns
    assert result.kv_bytes_staged["hbm"] == 0 and result.kv_bytes_staged["nvme"] == result.kv_bytes_read["nvme"]
    # The NVMe blocks were really read through the file during decode: one pread per block and layer.
    assert result.file_io["nvme"].reads > 0 and result.file_io["nvme"].bytes_read >= result.kv_bytes_read["nvme"]
    assert io.read_s > 0
    # And the tokens are those of the same decode with every block in one DRAM tier.
    plain = resolve(load_tier_map(REPO / "configs" / "tiers" / "single-node.yaml"), discover("/"))
    with TieredKVCache(plain, layout, capacities={"dram": 256}, placement=Vector({"dram": 1.0})) as cache:
        reference = run_decode(model, cache, spec)
    assert torch.equal(result.generated, reference.generated)


def test_a_link_model_belongs_to_an_emulated_gpu_tier_only(tmp_path: Path) -> None:
    text = FOUR_TIER.read_text().replace("      latency_ratio: 2.2\n",
                                         "      latency_ratio: 2.2\n      link: {gbps: 10}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"tiers\[2\]\.emulate\.link.*only for kind: cuda"):
        load_tier_map(path)
    path.write_text(FOUR_TIER.read_text().replace("gbps: 25", "gbps: 0"))
    with pytest.raises(ConfigError, match=r"emulate\.link\.gbps"):
        load_tier_map(path)


def test_the_four_tier_decode_job_labels_every_tier(tmp_path: Path) -> None:
    rows = run_jobs(tmp_path, four_tier_map(tmp_path),
                    "  - {kind: decode, policies: [lru], prompt_tokens: 512, shared_prefix_tokens: 128,\n"
                    "     decode_steps: 3, block_tokens: 128}\n")
    lru = [r for r in rows if "lru" in r["run"]]
    read = {r["tier"]: r for r in lru if r["metric"] == "kv_bytes_read"}
    assert set(read) == set(TIERS) and all(r["value"] > 0 for r in read.values()), read
    assert {t: read[t]["origin"] for t in TIERS} == {"hbm": "emulated", "dram": "measured",
                                                     "cxl": "emulated", "nvme": "measured"}
    steps = [r for r in lru if r["metric"] == "kv_step_bytes_read" and r["tier"] == "nvme"]
    assert [r["seq"] for r in steps] == [0, 1, 2] and sum(r["value"] for r in steps) == read["nvme"]["value"]
    placed = [r for r in lru if r["metric"] == "placement_fraction" and r["tier"] == "dram"]
    assert {r["phase"] for r in placed} == {"start", "end"}
    assert all(r["value"] == 1.0 and r["params"]["pages"] > 0 and r["origin"] == "measured" for r in placed)
    [link] = [r for r in lru if r["metric"] == "link_delay_s"]
    assert link["origin"] == "emulated" and link["tier"] == "hbm" and link["value"] > 0
    assert link["params"]["gbps"] == 25 and link["params"]["latency_us"] == 2
    [io] = [r for r in lru if r["metric"] == "file_read_gbps"]
    assert io["tier"] == "nvme" and io["value"] > 0 and io["params"]["bytes_read"] > 0
    # The slowest bound holds everything on NVMe: every byte read comes through the file.
    slow = {r["metric"]: r["value"] for r in rows if "all-slowest" in r["run"] and r["metric"] == "star"}
    assert slow == {"star": 1.0}
    slow_read = {r["tier"]: r["value"] for r in rows if "all-slowest" in r["run"] and r["metric"] == "kv_bytes_read"}
    assert slow_read["nvme"] > 0 and not any(slow_read[t] for t in ("hbm", "dram", "cxl"))


def test_a_block_moved_into_or_out_of_the_emulated_hbm_crosses_the_link(tmp_path: Path) -> None:
    resolved = resolved_here(tmp_path)
    layout = KVLayout(2, 2, 64, 128, torch.float32)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    with TieredKVCache(resolved, layout, injector=injector, placement=Vector({"dram": 1.0})) as cache:
        cache.add_sequence(0)
        cache.write(0, 0, 0, torch.ones(8, 2, 64), torch.ones(8, 2, 64))
        [block] = cache.seqs[0].tables[0]
        link = injector.link_audits["hbm"]
        before = (link.transfers, link.charged_bytes)
        owed_before = link.owed_ns  # the write itself crossed already (new KV leaves the GPU for dram)
        up = cache.move(block, "hbm")
        assert (link.transfers - before[0], link.charged_bytes - before[1]) == (1, layout.block_bytes)
        want_ns = 2000 + layout.block_bytes / 25.0  # 2 us + 256 KiB at 25 GB/s
        assert link.owed_ns - owed_before == pytest.approx(want_ns)
        assert up.injected_seconds >= 0.99 * want_ns / 1e9  # the busy-wait paid it (overshoot only if preempted)
        cache.move(block, "cxl")  # out of HBM: across again
        assert link.transfers - before[0] == 2
        cache.move(block, "nvme")  # host tier to file: no GPU end, no link
        assert link.transfers - before[0] == 2
        assert torch.equal(cache.read(0, 0)[0], torch.ones(8, 2, 64))


def test_a_decode_that_cannot_fit_the_capacities_of_every_tier_is_refused_before_any_work(tmp_path: Path) -> None:
    tiers = four_tier_map(tmp_path)
    tiers.write_text(tiers.read_text().replace("capacity_mib: 64", "capacity_mib: 1"))
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: e\ntiers: {tiers}\njobs:\n  - {{kind: decode, policies: [lru], batch: 64}}\n")
    with pytest.raises(ConfigError, match=r"holds 128 KV blocks .*capacity_mib hbm 1, dram 1, cxl 1, nvme 1"):
        expand(load_experiment(spec))
    assert not (tmp_path / "nvme").exists()


def test_the_shipped_four_tier_experiment_plans_its_arms() -> None:
    runs = expand(load_experiment(REPO / "configs" / "experiments" / "four-tier.yaml"))
    assert {r.policy for r in runs} == {"lru-epoch", "all-fastest", "all-slowest"} and len(runs) == 9
