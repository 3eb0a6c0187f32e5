"""Every lab action applies, verifies and restores byte for byte on a fixture tree with kernel semantics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures.lab.fakekernel import Lab, make_lab, snapshot

from tieremu.errors import LabError, LabWriteError
from tieremu.lab.applier import Applier, teardown
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import load_profile
from tieremu.lab.swapcall import SWAP_FLAG_PREFER, real_swap_syscall, swap_flags
from tieremu.lab.values import parse_swaps
from tieremu.numa.topology import discover

# One profile entry per action kind, each changing something on the two-socket fixture.
ACTIONS = {
    "node_cpus": "{kind: node_cpus, node: 1, online: false}",
    "uncore_lowest": "{kind: uncore_freq, package: 1, min_khz: lowest, max_khz: lowest}",
    "uncore_band": "{kind: uncore_freq, package: 0, min_khz: 1200000, max_khz: 2000000}",
    "resctrl_mba": "{kind: resctrl_mba, group: tieremu-test, node: 1, percent: 30}",
    "numa_balancing": "{kind: numa_balancing, value: 2}",
    "demotion": "{kind: demotion, enabled: true}",
    "thp": "{kind: thp, enabled: never, defrag: defer+madvise}",
    "hugepages": "{kind: hugepages, node: 1, size_kb: 1048576, pages: 4}",
    "nmi_watchdog": "{kind: nmi_watchdog, enabled: false}",
    "aslr": "{kind: aslr, value: 0}",
    "ksm": "{kind: ksm, run: 2}",
    "smt": "{kind: smt, control: 'off'}",
    "turbo": "{kind: turbo, enabled: false}",
    "governor": "{kind: governor, governor: performance}",
    "swap": "{kind: swap, enabled: false}",
    "cgroup": "{kind: cgroup, name: tieremu-test, memory_max: 8G, memory_high: 6G, cpus: 0-3, mems: 0}",
}


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return make_lab(tmp_path)


def one_action(lab: Lab, entry: str) -> Applier:
    path = lab.profile_file(f"name: one\nactions:\n  - {entry}\n")
    return Applier(load_profile(path), lab.fs, lab.state)


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_each_action_applies_verifies_and_restores_byte_for_byte(lab: Lab, name: str) -> None:
    applier = one_action(lab, ACTIONS[name])
    report = applier.apply()
    assert report.writes > 0
    assert lab.changes(), "the action changed nothing in the tree"
    action = applier.profile.actions[0]
    assert action.verify(lab.fs) == []
    assert action.plan(lab.fs) == [], "a second apply would write again"
    result = teardown("one", lab.fs, lab.state)
    assert not result.failures and not result.not_restored
    assert lab.changes() == []
    assert list(lab.state.iterdir()) == []


def test_offlined_node_becomes_cpuless_and_comes_back(lab: Lab) -> None:
    one_action(lab, ACTIONS["node_cpus"]).apply()
    topo = discover(lab.root)
    assert topo.cpuless_nodes == (1,)
    assert topo.nodes[1].cpus == ()
    # cpulist no longer names the CPUs: restore must come from the journal.
    assert (lab.root / "sys/devices/system/node/node1/cpulist").read_text() == "\n"
    teardown("one", lab.fs, lab.state)
    assert discover(lab.root).nodes[1].cpus == (4, 5, 6, 7)


def test_boot_cpu_without_online_file_makes_offlining_its_node_unsupported(lab: Lab) -> None:
    action = load_profile(lab.profile_file("name: n0\nactions:\n  - {kind: node_cpus, node: 0, online: false}\n"))
    reason = action.actions[0].unsupported(lab.fs)
    assert reason is not None and "cpu0" in reason


def test_thp_writes_the_bare_word_and_reads_the_bracket(lab: Lab) -> None:
    one_action(lab, "{kind: thp, enabled: never}").apply()
    assert (lab.root / "sys/kernel/mm/transparent_hugepage/enabled").read_text() == "always madvise [never]\n"
    assert ("write", "sys/kernel/mm/transparent_hugepage/enabled", "never") in lab.fs.log


def test_thp_mode_the_kernel_does_not_offer_is_an_error(lab: Lab) -> None:
    (lab.root / "sys/kernel/mm/transparent_hugepage/defrag").write_text("always defer [madvise] never\n")
    with pytest.raises(LabError, match=r"offers always, defer, madvise, never, not defer\+madvise"):
        one_action(lab, "{kind: thp, defrag: defer+madvise}").plan()


def test_uncore_raising_min_above_current_max_writes_max_first(lab: Lab) -> None:
    die = lab.root / "sys/devices/system/cpu/intel_uncore_frequency/package_00_die_00"
    (die / "max_freq_khz").write_text("1000000\n")
    lab.before = snapshot(lab.root)
    one_action(lab, "{kind: uncore_freq, package: 0, min_khz: 2000000, max_khz: highest}").apply()
    writes = [t.rsplit("/", 1)[1] for op, t, _ in lab.fs.log if op == "write"]
    assert writes == ["max_freq_khz", "min_freq_khz"]
    assert (die / "min_freq_khz").read_text() == "2000000\n"
    teardown("one", lab.fs, lab.state)
    assert lab.changes() == []


def test_uncore_value_outside_hardware_range_is_refused(lab: Lab) -> None:
    with pytest.raises(LabError, match=r"5000000 kHz is outside .*package_01_die_00's hardware range 800000..2400000"):
        one_action(lab, "{kind: uncore_freq, package: 1, max_khz: 5000000}").plan()


def test_mba_percentage_off_the_granularity_is_refused_with_the_valid_ones(lab: Lab) -> None:
    with pytest.raises(LabError, match=r"takes MBA percentages 10, 20, .*, 100, not 55"):
        one_action(lab, "{kind: resctrl_mba, group: g, cpus: 0-1, percent: 55}").plan()


def test_mba_group_holds_the_cpus_and_the_throttle_then_goes(lab: Lab) -> None:
    one_action(lab, "{kind: resctrl_mba, group: tieremu-test, node: 1, percent: 30, domains: [1]}").apply()
    group = lab.root / "sys/fs/resctrl/tieremu-test"
    assert (group / "cpus_list").read_text() == "4-7\n"
    assert (group / "schemata").read_text() == "L3:0=7ff;1=7ff\nMB:0=100;1= 30\n"
    assert (lab.root / "sys/fs/resctrl/cpus_list").read_text() == "0-3\n"
    teardown("one", lab.fs, lab.state)
    assert not group.exists()
    assert lab.changes() == []


def test_mba_group_that_exists_with_other_settings_is_not_touched(lab: Lab) -> None:
    lab.fs.mkdir("sys/fs/resctrl/tieremu-test")
    with pytest.raises(LabError, match="already exists with other settings"):
        one_action(lab, "{kind: resctrl_mba, group: tieremu-test, node: 1, percent: 30}").plan()


def test_cgroup_enables_missing_controllers_and_restores_subtree_control(lab: Lab) -> None:
    one_action(lab, ACTIONS["cgroup"]).apply()
    assert (lab.root / "sys/fs/cgroup/cgroup.subtree_control").read_text() == "cpuset cpu io memory pids\n"
    group = lab.root / "sys/fs/cgroup/tieremu-test"
    assert (group / "memory.max").read_text() == f"{8 << 30}\n"
    assert (group / "memory.high").read_text() == f"{6 << 30}\n"
    assert (group / "cpuset.cpus").read_text() == "0-3\n"
    teardown("one", lab.fs, lab.state)
    assert lab.changes() == []


def test_hugepages_shortfall_fails_the_apply_and_rolls_back(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, hugepage_limit={1: 10})
    with pytest.raises(LabError, match="reserved 10 of 64"):
        one_action(lab, "{kind: hugepages, node: 1, pages: 64}").apply()
    assert lab.changes() == []
    assert list(lab.state.iterdir()) == []


def test_swap_areas_come_back_with_their_priorities_and_order(lab: Lab) -> None:
    original = parse_swaps((lab.root / "proc/swaps").read_text())
    assert [a.priority for a in original] == [-2, 5, -3]
    one_action(lab, ACTIONS["swap"]).apply()
    assert parse_swaps((lab.root / "proc/swaps").read_text()) == []
    teardown("one", lab.fs, lab.state)
    assert parse_swaps((lab.root / "proc/swaps").read_text()) == original
    swapons = [(t, int(v)) for op, t, v in lab.fs.log if op == "swapon"]
    # Listing order (the slots) and automatic priorities both come back only in this order.
    assert swapons == [("/swapfile", 0), ("/dev/nvme0n1p3", SWAP_FLAG_PREFER | 5), ("/var/swap file", 0)]


def test_governor_only_touches_cpus_online_when_it_runs(lab: Lab) -> None:
    path = lab.profile_file("name: two\nactions:\n  - " + ACTIONS["node_cpus"] + "\n  - " + ACTIONS["governor"] + "\n")
    Applier(load_profile(path), lab.fs, lab.state).apply()
    governors = {c: (lab.root / f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor").read_text().strip()
                 for c in range(8)}
    assert governors == {**dict.fromkeys(range(4), "performance"), **dict.fromkeys(range(4, 8), "powersave")}
    teardown("two", lab.fs, lab.state)
    assert lab.changes() == []


def test_turbo_uses_boost_where_there_is_no_intel_pstate(lab: Lab) -> None:
    pstate = lab.root / "sys/devices/system/cpu/intel_pstate"
    for f in pstate.iterdir():
        f.unlink()
    pstate.rmdir()
    (lab.root / "sys/devices/system/cpu/cpufreq").mkdir()
    (lab.root / "sys/devices/system/cpu/cpufreq/boost").write_text("1\n")
    lab.before = snapshot(lab.root)
    one_action(lab, ACTIONS["turbo"]).apply()
    assert (lab.root / "sys/devices/system/cpu/cpufreq/boost").read_text() == "0\n"
    teardown("one", lab.fs, lab.state)
    assert lab.changes() == []


def test_kernel_fs_refuses_paths_outside_the_known_set(lab: Lab) -> None:
    for rel in ("etc/passwd", "sys/fs/cgroup/../../etc/x/memory.max", "proc/sys/vm/drop_caches",
                "sys/devices/system/cpu/cpu1/online/../../cpu2/online"):
        with pytest.raises(LabError, match="refusing"):
            lab.fs.write(rel, "1")
    for rel in ("sys/fs/resctrl/info", "sys/fs/cgroup/a/b", "sys/kernel/mm/x", "sys/fs/resctrl/.."):
        with pytest.raises(LabError, match="refusing"):
            lab.fs.mkdir(rel)
    assert lab.changes() == []


def test_real_kernel_fs_never_creates_a_missing_file(lab: Lab) -> None:
    fs = KernelFS(lab.root)
    target = lab.root / "sys/kernel/mm/numa/demotion_enabled"
    target.unlink()
    with pytest.raises(LabWriteError, match="ENOENT"):
        fs.write("sys/kernel/mm/numa/demotion_enabled", "true")
    assert not target.exists()


def test_real_kernel_fs_writes_the_value_with_a_newline(lab: Lab) -> None:
    KernelFS(lab.root).write("proc/sys/kernel/numa_balancing", "0")
    assert (lab.root / "proc/sys/kernel/numa_balancing").read_text() == "0\n"


def test_swap_flags_carry_an_explicit_priority_only() -> None:
    assert swap_flags(None) == 0
    assert swap_flags(5) == SWAP_FLAG_PREFER | 5
    with pytest.raises(ValueError):
        swap_flags(-2)


def test_real_swapoff_of_a_path_that_is_no_swap_area_raises_oserror() -> None:
    with pytest.raises(OSError) as exc:
        real_swap_syscall("off", "/nonexistent-tieremu-swap-area", 0)
    assert exc.value.errno != 0


def test_missing_node_is_unsupported_and_names_the_nodes(lab: Lab) -> None:
    profile = load_profile(lab.profile_file("name: n3\nactions:\n  - {kind: node_cpus, node: 3, online: false}\n"))
    assert profile.actions[0].unsupported(lab.fs) == "there is no node 3 (nodes: 0, 1)"
