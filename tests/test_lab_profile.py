"""Lab profiles are read strictly: every mistake names the key path, the bad value and what is valid."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.lab.actions import KINDS
from tieremu.lab.actions.cgroup import Cgroup
from tieremu.lab.actions.cpus import NodeCpus
from tieremu.lab.actions.knobs import Smt
from tieremu.lab.actions.uncore import Uncore
from tieremu.lab.profile import load_profile, resolve_profile, shipped_profiles


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_profile(write(tmp_path, text))
    return str(exc.value)


def test_misspelt_action_key_names_the_path_and_the_valid_keys(tmp_path: Path) -> None:
    msg = error(tmp_path, "name: x\nactions:\n  - kind: node_cpus\n    node: 1\n    onlin: false\n")
    assert "actions[0].onlin: unknown key for kind node_cpus" in msg
    assert "valid keys here: kind, required, node, online" in msg


def test_misspelt_top_level_key_names_the_valid_keys(tmp_path: Path) -> None:
    msg = error(tmp_path, "name: x\ndescripton: y\nactions:\n  - {kind: aslr, value: 0}\n")
    assert "descripton: unknown key; valid keys here: actions, description, name" in msg


def test_unknown_kind_lists_every_kind(tmp_path: Path) -> None:
    msg = error(tmp_path, "name: x\nactions:\n  - {kind: cpu_offline, node: 1}\n")
    assert "actions[0].kind: 'cpu_offline' is not valid; valid: " in msg
    assert all(kind in msg for kind in KINDS)


@pytest.mark.parametrize(("entry", "expected"), [
    ("{kind: numa_balancing, value: 5}", "actions[0].value: 5 is not valid; valid: 0, 1, 2, 3"),
    ("{kind: thp, enabled: sometimes}", "actions[0].enabled: 'sometimes' is not valid; valid: always, madvise, never"),
    ("{kind: thp}", "actions[0].enabled: a thp action sets enabled, defrag or both"),
    ("{kind: smt, control: maybe}", "actions[0].control: 'maybe' is not valid; valid: on, off"),
    ("{kind: uncore_freq, package: 1, max_khz: slowest}", "expected kHz or one of: lowest, highest"),
    ("{kind: uncore_freq, package: 1}", "an uncore_freq action sets min_khz, max_khz or both"),
    ("{kind: resctrl_mba, group: ../etc, node: 0, percent: 50}", "actions[0].group: '../etc': must be letters"),
    ("{kind: resctrl_mba, group: info, node: 0, percent: 50}", "is a name resctrl uses for its own files"),
    ("{kind: resctrl_mba, group: g, node: 0, cpus: 0-3, percent: 50}", "give exactly one of node"),
    ("{kind: resctrl_mba, group: g, node: 0, percent: 150}", "actions[0].percent: 150: must be 1..100"),
    ("{kind: cgroup, name: w, memory_max: lots}", "actions[0].memory_max: 'lots': expected bytes, a size"),
    ("{kind: cgroup, name: w}", "a cgroup action sets memory_max, memory_high, cpus or mems"),
    ("{kind: governor, governor: performance, cpus: 3-x}", "expected a CPU list such as 0-3,8"),
    ("{kind: swap, enabled: true}", "a profile can only turn swap off"),
    ("{kind: hugepages, node: 0, size_kb: 3000, pages: 1}", "must be a power of two"),
    ("{kind: node_cpus, node: 1, online: false, required: maybe}", "actions[0].required: expected bool"),
])
def test_bad_values_are_named_with_what_is_valid(tmp_path: Path, entry: str, expected: str) -> None:
    assert expected in error(tmp_path, f"name: x\nactions:\n  - {entry}\n")


def test_profile_without_actions_is_an_error(tmp_path: Path) -> None:
    assert "actions: a profile needs at least one action" in error(tmp_path, "name: x\nactions: []\n")


def test_profile_name_must_be_usable_as_a_journal_file_name(tmp_path: Path) -> None:
    assert "name: '../x': must be letters" in error(tmp_path, "name: ../x\nactions:\n  - {kind: aslr, value: 0}\n")


def test_values_are_parsed_into_typed_actions(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, """\
name: typed
actions:
  - {kind: node_cpus, node: 1, online: false, required: false}
  - {kind: uncore_freq, package: 1, min_khz: lowest, max_khz: 1800000}
  - {kind: cgroup, name: w, memory_max: 1G, memory_high: 1000001, cpus: 4, mems: 0-1}
"""))
    assert profile.actions[0] == NodeCpus(node=1, online=False, required=False)
    assert profile.actions[1] == Uncore(package=1, min_khz="lowest", max_khz=1800000, required=True)
    page = resource.getpagesize()
    assert profile.actions[2] == Cgroup(name="w", memory_max=str(1 << 30), memory_high=str(1000001 // page * page),
                                        cpus=(4,), mems=(0, 1), required=True)


def test_bare_yaml_on_and_off_mean_the_words_for_smt(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "name: s\nactions:\n  - {kind: smt, control: off}\n"))
    assert profile.actions[0] == Smt(control="off", required=True)


def test_shipped_profiles_load() -> None:
    assert set(shipped_profiles()) >= {"hygiene", "cxl-cpuless-node1", "remote-throttled", "kernel-tiering"}
    for name in shipped_profiles():
        profile = resolve_profile(name)
        assert profile.name == name and profile.actions


def test_cxl_profile_requires_only_the_cpu_offlining() -> None:
    profile = resolve_profile("cxl-cpuless-node1")
    assert [a.kind for a in profile.actions if a.required] == ["node_cpus"]
    assert profile.actions[0] == NodeCpus(node=1, online=False, required=True)


def test_unknown_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"no lab profile 'nope'.*cxl-cpuless-node1.*hygiene"):
        resolve_profile("nope")
