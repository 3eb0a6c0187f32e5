"""Linux's own tiering (numa_balancing=2 + demotion) as a baseline policy of decode jobs: `policies: [kernel]`.

On one node it is refused at planning with the reason; the lab profile that holds its knobs for a run is applied and
restored byte for byte (on the fake kernel's fixture tree); inside the multi-node QEMU guest (marked numa_vm) a decode
runs under it with the knobs on, its rows labelled kernel-tiering with the kernel's vmstat deltas, and every knob is
back to its old value afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures.lab.fakekernel import make_lab

from tieremu.daemon.kernel import KernelTiering
from tieremu.errors import ConfigError, WorkloadError
from tieremu.lab.held import profile_held
from tieremu.numa.topology import discover
from tieremu.runner.kernel_baseline import kernel_policy_problem, run_environment
from tieremu.runner.spec import load_experiment
from tieremu.workloads.jobs import _KernelRun

REPO = Path(__file__).resolve().parents[1]
CXL_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
NUMA_BALANCING = "proc/sys/kernel/numa_balancing"
DEMOTION = "sys/kernel/mm/numa/demotion_enabled"
ONE_TIER = KernelTiering().applicability().applicable is False


@pytest.mark.skipif(not ONE_TIER, reason="this machine has memory tiers: the kernel baseline is accepted here")
def test_policy_kernel_is_refused_at_planning_where_the_kernel_has_no_tiers(tmp_path: Path) -> None:
    spec = tmp_path / "k.yaml"
    spec.write_text(f"name: k\ntiers: {CXL_MAP}\njobs:\n  - {{kind: decode, policies: [kernel]}}\n")
    with pytest.raises(ConfigError, match=r"policy 'kernel' \(Linux's own tiering.*kernel-tiering\) cannot act "
                                          r"here: (one memory node|memory nodes .* are all in one memory tier)"):
        load_experiment(spec)
    assert kernel_policy_problem() is not None
    with pytest.raises(WorkloadError, match=r"kernel-tiering.*cannot act here"):
        _KernelRun.start()  # the job refuses too, when run without the runner's check


def test_a_replay_job_does_not_take_the_kernel_policy(tmp_path: Path) -> None:
    spec = tmp_path / "r.yaml"
    spec.write_text(f"name: r\ntiers: {CXL_MAP}\njobs:\n  - {{kind: replay, generate: {{kind: chat, requests: 5}}, "
                    "policies: [kernel]}\n")
    with pytest.raises(ConfigError, match="unknown policy 'kernel'"):
        load_experiment(spec)


def test_the_kernel_tiering_profile_is_held_for_a_run_and_restored_exactly(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the fake kernel's tree stands for the machine
    lab = make_lab(tmp_path)
    assert (lab.fs.value(NUMA_BALANCING), lab.fs.value(DEMOTION)) == ("1", "false")
    with profile_held("kernel-tiering", lab.fs, lab.state) as held:
        assert held.applied and held.writes == 2
        assert (lab.fs.value(NUMA_BALANCING), lab.fs.value(DEMOTION)) == ("2", "true")
        assert KernelTiering(lab.root).knobs().ready
    assert lab.changes() == [] and not (lab.state / "kernel-tiering.json").exists()
    # Restored when the run fails, too.
    with pytest.raises(RuntimeError, match="the run failed"), profile_held("kernel-tiering", lab.fs, lab.state):
        assert lab.fs.value(NUMA_BALANCING) == "2"
        raise RuntimeError("the run failed")
    assert lab.changes() == []


def test_an_active_kernel_tiering_profile_is_used_as_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    lab = make_lab(tmp_path)
    with profile_held("kernel-tiering", lab.fs, lab.state):
        during = lab.changes()
        with profile_held("kernel-tiering", lab.fs, lab.state) as inner:
            assert not inner.applied and "used as found" in inner.note
        assert lab.changes() == during  # the inner run restored nothing
    assert lab.changes() == []


def test_other_policies_need_nothing_of_the_machine() -> None:
    with run_environment("lru"), run_environment(None):
        pass


@pytest.mark.numa_vm
def test_a_decode_under_kernel_tiering_in_the_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("TIEREMU_IN_VM") != "1" or os.geteuid() != 0:
        pytest.skip("turns kernel knobs on as root: runs only inside the QEMU guest (tieremu vm run)")
    if kernel_policy_problem() is not None:
        pytest.skip(f"{kernel_policy_problem()} (the guest kernel needs HMAT memory tiers: 6.12)")
    monkeypatch.setenv("TIEREMU_LAB_STATE", str(tmp_path / "lab-state"))  # the guest's / is read-only
    from tieremu.runner.jobs import RunContext
    from tieremu.tiers.config import load_tier_map
    from tieremu.tiers.resolve import resolve
    from tieremu.workloads.jobs import DecodeJob, DecodeParams

    tiering = KernelTiering()
    knobs_before = tiering.knobs()
    resolved = resolve(load_tier_map(CXL_MAP), discover("/"))
    assert all(t.timing is None for t in resolved.tiers)  # nodes 0-2 are real in the guest: no emulation
    # Small: Python runs ~10x slower in the guest. 0.0625 MiB of fast tier is 2 blocks: the rest goes to cxl.
    params = DecodeParams(preset="tiny", batch=2, prompt_tokens=64, shared_prefix_tokens=16, decode_steps=2,
                          block_tokens=16, layout="all-layers", fast_capacity_mib=0.0625, epoch_ms=10.0,
                          budget_gbps=None, seed=0, threads=1)
    ctx = RunContext("decode-kernel-r0", "decode", "kernel", 0, 0, resolved, None, tmp_path)
    with run_environment("kernel"):
        assert tiering.knobs().ready
        rows = DecodeJob.run(params, ctx)
    after = tiering.knobs()
    assert (after.numa_balancing, after.demotion_enabled) == (knobs_before.numa_balancing,
                                                              knobs_before.demotion_enabled)
    assert all(r.params["tiering"] == "kernel-tiering" for r in rows)
    kernel = {r.metric: r for r in rows if r.metric.startswith("kernel_")}
    assert set(kernel) == {"kernel_promoted_pages", "kernel_demoted_pages"}
    assert kernel["kernel_promoted_pages"].params["knobs"]["ready"] is True
    assert kernel["kernel_promoted_pages"].origin == "vm"
    # Blocks were placed down the tiers and the kernel was asked where they are.
    placed = {(r.tier, r.phase): r for r in rows if r.metric == "placement_fraction"}
    assert ("cxl", "start") in placed and placed[("cxl", "start")].params["pages"] > 0
