"""Fixtures for tests that run inside the tieremu QEMU guest (`tieremu vm run`, scripts/test.sh's VM stage).

The guest's runner says what it booted through TIEREMU_VM_* variables; outside the guest (a real multi-node
machine) the tests that compare against the configured layout skip with that reason.
"""

from __future__ import annotations

import os

import pytest

from tieremu.numa.topology import Topology, discover
from tieremu.vm.topology import VmTopology, load_topology


@pytest.fixture(scope="session")
def vm_topology() -> VmTopology:
    """The layout the guest was booted with."""
    if os.environ.get("TIEREMU_IN_VM") != "1" or "TIEREMU_VM_TOPOLOGY" not in os.environ:
        pytest.skip("compares the machine with the configured guest layout: runs only inside `tieremu vm run`")
    return load_topology(os.environ["TIEREMU_VM_TOPOLOGY"])


@pytest.fixture(scope="session")
def guest_topology(vm_topology: VmTopology) -> Topology:
    """What the guest kernel publishes in sysfs."""
    return discover("/")


@pytest.fixture(scope="session")
def hmat_tiers() -> None:
    """Skip unless the booted kernel builds memory tiers from HMAT (6.12+; the 6.1 fallback does not)."""
    if os.environ.get("TIEREMU_VM_HMAT_TIERS") != "1":
        pytest.skip(f"kernel {os.environ.get('TIEREMU_VM_KERNEL', '?')} is the fallback and keeps every node in "
                    "one memory tier; run `tieremu vm prepare` where bookworm-backports is reachable")
