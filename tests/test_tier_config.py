"""Tier maps: the shipped ones load; every bad input names the file, the key path, the value and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.numa.syscalls import Policy
from tieremu.tiers.config import TimingTarget, load_tier_map

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiers"


def test_shipped_tier_maps_load() -> None:
    names = {p.stem: load_tier_map(p) for p in CONFIGS.glob("*.yaml")}
    assert {"single-node", "two-socket-cpuless", "cxl-expander", "gpu-hbm"} <= set(names)
    cxl = names["cxl-expander"]
    assert cxl.names == ("dram", "cxl", "far")
    assert cxl.tier("cxl").nodes == (1,) and cxl.tier("cxl").policy is Policy.BIND
    assert cxl.tier("cxl").allow_emulation and cxl.tier("cxl").emulate == TimingTarget(latency_ratio=2.2,
                                                                                       bandwidth_ratio=0.8)
    assert not cxl.tier("dram").allow_emulation and cxl.tier("dram").emulate is None


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tiers.yaml"
    p.write_text(text)
    return p


GOOD_TIER = "  - name: dram\n    nodes: [0]\n"


@pytest.mark.parametrize(("body", "message"), [
    ("name: x\ntiers:\n" + GOOD_TIER + "    polcy: bind\n",
     "tiers[0].polcy: unknown key; valid keys here: allow_emulation, capacity_mib, compression, description, emulate, "
     "kind, name, nodes, policy, shape, weights"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    shape: true\n",
     "tiers[0].shape: shaping a real node needs emulate targets"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    policy: spread\n",
     "tiers[0].policy: 'spread' is not valid; valid: preferred, bind, interleave, preferred_many, "
     "weighted_interleave"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    kind: gpu\n", "tiers[0].kind: 'gpu' is not valid; valid: numa, file, cuda"),
    ("name: x\ntiers:\n  - name: a\n    nodes: [-1]\n", "tiers[0].nodes: [-1]: give one or more node ids"),
    ("name: x\ntiers:\n  - name: a\n    nodes: zero\n", "tiers[0].nodes: expected list or int, got 'zero'"),
    ("name: x\ntiers:\n" + GOOD_TIER + GOOD_TIER, "tiers[1].name: duplicate tier name 'dram'"),
    ("name: x\ntiers: []\n", "tiers: a tier map needs at least one tier"),
    ("tiers:\n" + GOOD_TIER, "name: required key is missing"),
    ("name: x\ntiers:\n  - name: a\n    nodes: [0, 1]\n    policy: weighted_interleave\n    weights: [3]\n",
     "tiers[0].weights: (3,): weighted_interleave needs one weight (1..255) per node of [0, 1]"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    weights: [1]\n",
     "tiers[0].weights: only valid with policy weighted_interleave, not bind"),
    ("name: x\ntiers:\n  - name: a\n    nodes: [0, 1]\n    policy: preferred\n",
     "tiers[0].nodes: [0, 1]: policy preferred takes exactly one node"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    emulate: {latency_ratio: -2}\n",
     "tiers[0].emulate.latency_ratio: -2.0: must be a finite number > 0"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    emulate: {latency_ratio: 2, latency_ns: 200}\n",
     "tiers[0].emulate.latency_ns: give latency_ns or latency_ratio, not both"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    emulate: {write_bandwidth_ratio: 0.5, write_bandwidth_gbps: 3}\n",
     "tiers[0].emulate.write_bandwidth_gbps: give write_bandwidth_gbps or write_bandwidth_ratio, not both"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    emulate: {access_overhead_ns: -1}\n",
     "tiers[0].emulate.access_overhead_ns: -1.0: must be a finite number >= 0"),
    ("name: x\ntiers:\n" + GOOD_TIER + "    allow_emulation: yes please\n",
     "tiers[0].allow_emulation: expected bool, got 'yes please'"),
    ("- just\n- a list\n", "expected a mapping at the top level, got list"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_tier_maps_are_refused_with_the_key_path(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_tier_map(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_tier_map(tmp_path / "nope.yaml")


def test_weighted_interleave_and_single_node_int(tmp_path: Path) -> None:
    tm = load_tier_map(_write(tmp_path, "name: x\ntiers:\n  - name: mix\n    nodes: [0, 1]\n"
                                        "    policy: weighted_interleave\n    weights: [3, 1]\n"
                                        "  - name: one\n    nodes: 2\n"))
    assert tm.tier("mix").weights == (3, 1) and tm.tier("mix").policy is Policy.WEIGHTED_INTERLEAVE
    assert tm.tier("one").nodes == (2,)
