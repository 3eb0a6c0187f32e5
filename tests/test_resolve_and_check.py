"""Tier resolution against fixture machines, and the placement check on this one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_paths import fixture_root

from tieremu.errors import CapabilityError, ResolutionError
from tieremu.numa.topology import discover
from tieremu.tiers import check as check_mod
from tieremu.tiers.check import check_tiers
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import Backing, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiers"
CXL = load_tier_map(CONFIGS / "cxl-expander.yaml")


def test_on_one_node_missing_tiers_become_emulated_on_node_0_and_say_why() -> None:
    resolved = resolve(CXL, discover(fixture_root("one-node-vm")), vm=False)
    assert [(t.name, t.backing, t.nodes) for t in resolved.tiers] == [
        ("dram", Backing.REAL, (0,)), ("cxl", Backing.EMULATED, (0,)), ("far", Backing.EMULATED, (0,))]
    cxl = resolved.tier("cxl")
    assert cxl.backing.origin == "emulated" and cxl.label == "emulated"
    assert cxl.reason == ("node 1 missing (memory nodes: 0); emulated on node 0 "
                          "(latency 2.2x local, bandwidth 0.8x local)")
    assert resolved.any_emulated


def test_on_the_cxl_server_every_tier_is_real() -> None:
    resolved = resolve(CXL, discover(fixture_root("cxl-expander")), vm=False)
    assert [t.backing for t in resolved.tiers] == [Backing.REAL] * 3
    assert not resolved.any_emulated and resolved.tier("far").nodes == (2,)


def test_inside_the_guest_real_nodes_are_labelled_vm() -> None:
    resolved = resolve(CXL, discover(fixture_root("cxl-expander")), vm=True)
    assert {t.label for t in resolved.tiers} == {"vm"}
    assert all(t.backing.origin == "measured" for t in resolved.tiers)


def test_cpuless_node_of_a_two_socket_server_is_a_real_tier() -> None:
    tm = load_tier_map(CONFIGS / "two-socket-cpuless.yaml")
    topo = discover(fixture_root("two-socket-cpuless"))
    assert topo.cpuless_nodes == (1,)
    assert resolve(tm, topo, vm=False).tier("remote").backing is Backing.REAL


def test_missing_node_without_allow_emulation_is_an_error_naming_nodes(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("name: strict\ntiers:\n  - name: cxl\n    nodes: [5]\n")
    with pytest.raises(ResolutionError) as info:
        resolve(load_tier_map(p), discover(fixture_root("two-socket-cpuless")), vm=False)
    msg = str(info.value)
    assert "tier 'cxl': node 5 does not exist" in msg and "(memory nodes: 0-1)" in msg
    assert "allow_emulation: true" in msg


def test_unknown_tier_name_lists_tiers() -> None:
    resolved = resolve(CXL, discover(fixture_root("cxl-expander")), vm=False)
    with pytest.raises(ResolutionError, match=r"no tier 'hbm'.*tiers: dram, cxl, far"):
        resolved.tier("hbm")


def test_check_on_this_machine_enforces_real_and_labels_emulated(memory_nodes: tuple[int, ...]) -> None:
    checks = check_tiers(resolve(CXL, discover("/"), vm=False), 1 << 20)
    by_tier = {c.tier: c for c in checks}
    assert by_tier["dram"].status == "enforced" and by_tier["dram"].achieved_fraction == 1.0
    assert by_tier["dram"].placement is not None and by_tier["dram"].placement.by_node == {0: 256}
    for name, node in (("cxl", 1), ("far", 2)):
        expected = "enforced" if node in memory_nodes else "emulated"
        assert by_tier[name].status == expected and by_tier[name].achieved_fraction == 1.0


def test_check_reports_not_enforced_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise CapabilityError("mbind(bind) (nodes 0) failed: Operation not permitted", call="mbind", errno=1)

    monkeypatch.setattr(check_mod, "allocate", refuse)
    [c] = check_tiers(resolve(load_tier_map(CONFIGS / "single-node.yaml"), discover("/"), vm=False))
    assert c.status == "not enforced" and c.achieved_fraction == 0.0
    assert c.reason.startswith("no CAP_SYS_NICE: mbind(bind)")
