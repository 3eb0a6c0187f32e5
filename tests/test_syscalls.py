"""The ctypes syscall layer against the real kernel (one node is enough for these)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from tieremu.errors import CapabilityError, InvalidNodeError, NumaError
from tieremu.numa import pages, syscalls
from tieremu.numa.syscalls import Policy
from tieremu.tiers.region import allocate


def test_policy_names_round_trip_and_bad_name_lists_valid() -> None:
    assert Policy.from_name("weighted-interleave") is Policy.WEIGHTED_INTERLEAVE
    assert Policy.from_name("Preferred_Many") is Policy.PREFERRED_MANY
    assert [int(p) for p in Policy] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="valid: default, preferred, bind, interleave, local"):
        Policy.from_name("spread")


def test_node_mask_round_trip() -> None:
    nodes = (0, 3, 63, 64, 1023)
    assert syscalls.mask_nodes(syscalls.node_mask(nodes)) == nodes
    with pytest.raises(InvalidNodeError, match="node 1024 is out of range"):
        syscalls.node_mask([1024])


def test_mbind_then_get_mempolicy_reports_policy_of_the_range(memory_nodes: tuple[int, ...]) -> None:
    node = memory_nodes[0]
    region = allocate(1 << 20, (node,), Policy.BIND, populate=False)
    try:
        assert syscalls.get_mempolicy(region.addr) == (Policy.BIND, (node,))
        syscalls.mbind(region.addr, region.nbytes, Policy.PREFERRED, (node,))
        assert syscalls.get_mempolicy(region.addr) == (Policy.PREFERRED, (node,))
        syscalls.mbind(region.addr, region.nbytes, Policy.INTERLEAVE, memory_nodes)
        assert syscalls.get_mempolicy(region.addr) == (Policy.INTERLEAVE, memory_nodes)
        # Asking for the policy must not fault pages in: they are still absent.
        assert region.placement().absent == {"ENOENT": region.nbytes // pages.PAGE_SIZE}
    finally:
        region.close()


def test_every_policy_mode_is_accepted_by_the_kernel(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(1 << 20, (), Policy.DEFAULT, populate=False)
    try:
        for policy in Policy:
            nodes = memory_nodes if policy.takes_nodes else ()
            if policy is Policy.PREFERRED:
                nodes = memory_nodes[:1]
            syscalls.mbind(region.addr, region.nbytes, policy, nodes)
            got, _ = syscalls.get_mempolicy(region.addr)
            # LOCAL is reported as itself on current kernels; older ones report PREFERRED with no nodes.
            assert got is policy or (policy is Policy.LOCAL and got is Policy.PREFERRED)
    finally:
        region.close()


def test_set_mempolicy_is_per_thread_and_restorable(memory_nodes: tuple[int, ...]) -> None:
    seen: list[tuple[Policy, tuple[int, ...]]] = []

    def worker() -> None:
        syscalls.set_mempolicy(Policy.BIND, memory_nodes[:1])
        seen.append(syscalls.get_mempolicy())
        syscalls.set_mempolicy(Policy.DEFAULT)
        seen.append(syscalls.get_mempolicy())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(Policy.BIND, memory_nodes[:1]), (Policy.DEFAULT, ())]
    assert syscalls.get_mempolicy() == (Policy.DEFAULT, ())  # this thread untouched


def test_bad_node_names_the_call_the_node_and_the_valid_nodes(missing_node: int,
                                                              memory_nodes: tuple[int, ...]) -> None:
    region = allocate(1 << 20, memory_nodes[:1], populate=False)
    try:
        with pytest.raises(InvalidNodeError) as info:
            syscalls.mbind(region.addr, region.nbytes, Policy.BIND, (missing_node,))
        msg = str(info.value)
        assert msg.startswith("mbind(bind)")
        assert f"node {missing_node} does not exist" in msg
        assert str(memory_nodes[0]) in msg.split("valid node")[1]
        assert info.value.errno == errno.EINVAL and info.value.nodes == (missing_node,)
        with pytest.raises(InvalidNodeError, match=f"move_pages\\(to node {missing_node}"):
            syscalls.move_pages(pages.page_addresses(region.addr, 4096), missing_node)
        with pytest.raises(InvalidNodeError):
            syscalls.set_mempolicy(Policy.BIND, (missing_node,))
    finally:
        region.close()


def test_query_reports_absent_zero_and_present_pages(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(3 * pages.PAGE_SIZE, memory_nodes[:1], populate=False)
    try:
        region.array[0] = 1  # written: a real page
        _ = region.array[pages.PAGE_SIZE]  # read only: the shared zero page
        status = syscalls.query_pages(pages.page_addresses(region.addr, region.nbytes))
        assert status[0] == memory_nodes[0]
        assert status[1] == -errno.EFAULT
        assert status[2] == -errno.ENOENT
    finally:
        region.close()


def test_migrate_pages_of_own_process_to_same_node_moves_nothing(memory_nodes: tuple[int, ...]) -> None:
    import os

    assert syscalls.migrate_pages(os.getpid(), memory_nodes[:1], memory_nodes[:1]) == 0


def test_move_pages_status_for_pages_already_in_place(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(64 * pages.PAGE_SIZE, memory_nodes[:1])
    try:
        status = syscalls.move_pages(pages.page_addresses(region.addr, region.nbytes), memory_nodes[0])
        assert np.all(status == memory_nodes[0])
    finally:
        region.close()


def test_errno_becomes_typed_error_with_the_reason() -> None:
    with pytest.raises(CapabilityError, match="CAP_SYS_NICE"):
        syscalls._raise("move_pages", errno.EPERM, (0,))
    with pytest.raises(NumaError, match="Device or resource busy") as info:
        syscalls._raise("mbind(bind)", errno.EBUSY, (0,))
    assert info.value.call == "mbind(bind)"


CAPSH = shutil.which("capsh")


@pytest.mark.skipif(CAPSH is None, reason="capsh (libcap2-bin) is not installed; scripts/bootstrap.sh installs it")
def test_missing_cap_sys_nice_is_detected_and_named() -> None:
    """Without CAP_SYS_NICE, MPOL_MF_MOVE_ALL is refused with EPERM; the error says what is missing."""
    code = (
        "from tieremu.numa import syscalls, pages\n"
        "from tieremu.tiers.region import allocate\n"
        "from tieremu.errors import CapabilityError\n"
        "print('cap', syscalls.has_cap_sys_nice())\n"
        "r = allocate(4096, (0,))\n"
        "try:\n"
        "    syscalls.move_pages(pages.page_addresses(r.addr, 4096), 0, move_all=True)\n"
        "except CapabilityError as e:\n"
        "    print('refused:', e)\n"
    )
    cmd = f"{sys.executable} -c \"$TIEREMU_TEST_CODE\""
    out = subprocess.run([CAPSH, "--drop=cap_sys_nice", "--", "-c", cmd], capture_output=True, text=True,
                         env={"TIEREMU_TEST_CODE": code, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cap False" in out.stdout
    assert "refused:" in out.stdout and "CAP_SYS_NICE" in out.stdout
