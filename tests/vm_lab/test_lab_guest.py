"""Pond's CPU-less node made for real: the cxl-cpuless-node1 profile applied and torn down on a live kernel.

Runs only inside the two-socket QEMU guest, where offlining a CPU harms nothing:

    tieremu vm run --topology configs/vm/two-socket.yaml --timeout 300 -- \
        .venv/bin/python -m pytest -p no:cacheprovider -m numa_vm_lab tests/vm_lab -rs
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tieremu.cli import main
from tieremu.lab.journal import Journal
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import SHIPPED
from tieremu.numa.topology import discover

pytestmark = pytest.mark.numa_vm_lab

PROFILE = SHIPPED / "cxl-cpuless-node1.yaml"


@pytest.fixture
def guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The journal dir (the guest's / is read-only); skips unless this is the guest with node 1 CPUs."""
    if os.environ.get("TIEREMU_IN_VM") != "1":
        pytest.skip("offlines real CPUs as root: runs only inside the QEMU guest (tieremu vm run --topology "
                    "configs/vm/two-socket.yaml -- .venv/bin/python -m pytest -m numa_vm_lab tests/vm_lab)")
    if os.geteuid() != 0:
        pytest.skip(f"changes kernel knobs and needs root; this guest job runs as uid {os.geteuid()}")
    topo = discover("/")
    if 1 not in topo.nodes or not topo.nodes[1].cpus:
        found = {n.id: n.cpus for n in topo.nodes.values()}
        pytest.skip(f"needs node 1 with a CPU to offline (configs/vm/two-socket.yaml); nodes and CPUs here: {found}")
    state = tmp_path / "lab-state"
    monkeypatch.setenv("TIEREMU_LAB_STATE", str(state))
    monkeypatch.delenv("TIEREMU_SYSFS_ROOT", raising=False)
    return state


def lab(*args: str) -> Result:
    return CliRunner().invoke(main, ["lab", *args, "--sysfs-root", "/"])


def test_cxl_profile_makes_node1_cpuless_and_teardown_restores_every_knob(guest: Path) -> None:
    before = discover("/")
    node1_cpus = before.nodes[1].cpus

    applied = lab("apply", str(PROFILE))
    assert applied.exit_code == 0, applied.output
    try:
        journal = Journal.load(guest / "cxl-cpuless-node1.json")
        assert journal.applied_utc is not None
        offlined = [e.step.target for e in journal.entries if e.action.endswith("node_cpus")]
        assert offlined == [f"sys/devices/system/cpu/cpu{c}/online" for c in node1_cpus]

        during = discover("/")
        assert during.cpuless_nodes == (1,)
        topo = CliRunner().invoke(main, ["topo", "--json", "--sysfs-root", "/"])
        assert topo.exit_code == 0, topo.output
        data = json.loads(topo.output)
        assert data["cpuless_nodes"] == [1]
        assert data["nodes"]["1"]["cpus"] == [] and data["nodes"]["1"]["cpuless"] is True

        status = lab("status", str(PROFILE))
        assert status.exit_code == 0, status.output
        assert "every knob holds the profile's value" in status.output
    finally:
        torn = lab("teardown", str(PROFILE))
    assert torn.exit_code == 0, torn.output
    assert "warning" not in torn.output, torn.output

    after = discover("/")
    assert after.nodes[1].cpus == node1_cpus
    assert after.cpuless_nodes == before.cpuless_nodes
    assert after.knobs == before.knobs
    fs = KernelFS("/")
    for entry in journal.entries:
        step = entry.step
        assert step.restored(fs), f"{step.target}: recorded {step.shown_old}, now {step.now(fs)}"
    assert not (guest / "cxl-cpuless-node1.json").exists()
