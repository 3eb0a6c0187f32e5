"""`tieremu daemon --pid` for real: a child process's pages move between the guest's NUMA nodes, asked of the kernel
by pid; and the kernel's own tiering (numa_balancing=2 with demotion) counted through /proc/vmstat.

Written for configs/vm/cxl-3node.yaml (node 0 with the CPUs, CPU-less nodes 1 and 2 of 512 MiB). The child is the
one of tests/test_attach.py (standard library only: imports are slow in the guest). Speeds inside the guest are
emulation artefacts; these tests assert placement, counts and data only.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_attach import CHUNK, PAGES_PER_CHUNK, Child, spawn_child, stop_child

from tieremu.cli import main
from tieremu.daemon.attach import AttachConfig, AttachResult, KernelPages, attach
from tieremu.daemon.kernel import KernelTiering
from tieremu.daemon.proctrack import TargetGoneError
from tieremu.lab.profile import SHIPPED
from tieremu.numa.topology import discover

pytestmark = pytest.mark.numa_vm

MIB = 1 << 20
CGROUP = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module", autouse=True)
def three_nodes() -> None:
    nodes = discover("/").memory_nodes
    if not {0, 1, 2} <= set(nodes):
        pytest.skip(f"written for the 3-node guest (configs/vm/cxl-3node.yaml); memory nodes here: {nodes}")
    if os.geteuid() != 0:
        pytest.skip(f"moving another process's pages needs CAP_SYS_NICE; this job runs as uid {os.geteuid()}")


def nodes_of(child: Child, name: str) -> dict[int, int]:
    """Where the kernel says each page of a region is, asked by the child's pid."""
    status = KernelPages().query(child.pid, child.pages(name))
    values, counts = np.unique(status, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def last_target_by_chunk(result: AttachResult) -> dict[int, int]:
    return {m.chunk: m.target_node for m in result.migrations}


def test_hotcold_moves_a_childs_hot_region_to_node_0_and_its_cold_region_to_node_1(tmp_path: Path) -> None:
    child = spawn_child(16, 32)
    try:
        hot, cold = child.chunks("hot"), child.chunks("cold")
        tier_file = tmp_path / "tiers.yaml"
        tier_file.write_text("name: attach-test\ntiers:\n  - {name: dram, nodes: [0], capacity_mib: 16}\n"
                             "  - {name: cxl, nodes: [1]}\n")
        daemon = attach(AttachConfig(pid=child.pid, policy="hotcold", params={"target_util": 1.0, "quota": 64},
                                     tier_file=tier_file, min_region_bytes=16 * MIB, sample_pages=0))
        assert nodes_of(child, "hot") == {0: 16 * MIB // 4096} and nodes_of(child, "cold") == {0: 32 * MIB // 4096}
        daemon.start()
        for _ in range(4):
            assert child.ask("read hot") == "ok"
            daemon.epoch()
        result = daemon.finish("stopped")

        # only the child's two regions are 16 MiB or more: the daemon tracked exactly their chunks
        assert result.chunks_seen == hot | cold
        assert nodes_of(child, "hot") == {0: 16 * MIB // 4096}
        assert nodes_of(child, "cold") == {1: 32 * MIB // 4096}
        assert child.ask("crc") == str(child.crc)  # every byte survived the moves

        # the cold chunks admitted first filled dram, the rest went down; then the 8 hot chunks were promoted and
        # the 8 cold ones in dram demoted, and the records say so page for page
        assert result.failed_pages == {} and all(m.outcome == "moved" for m in result.migrations)
        assert sorted(m.chunk for m in result.migrations if m.reason == "promote") == sorted(hot)
        assert all((m.source_node, m.target_node, m.moved) == (1, 0, PAGES_PER_CHUNK)
                   for m in result.migrations if m.reason == "promote")
        assert last_target_by_chunk(result) == {**{c: 1 for c in cold}, **{c: 0 for c in hot}}
        assert result.moved_pages == (len(cold) + 2 * len(hot)) * PAGES_PER_CHUNK
        assert [e.migrations for e in result.epochs[1:]] == [0, 0, 0]  # settled: no ping-pong after the first epoch
        assert result.ping_pongs == len(hot)  # but each hot chunk, admitted down to cxl, came back up within it
        assert result.epochs[-1].chunks_by_tier == {"dram": len(hot), "cxl": len(cold)}
    finally:
        stop_child(child)


def test_all_slowest_moves_a_child_to_the_farthest_node_within_the_budget() -> None:
    child = spawn_child(4, 4)
    try:
        ours = child.chunks("hot") | child.chunks("cold")
        epoch_s = 0.5
        daemon = attach(AttachConfig(pid=child.pid, policy="all-slowest", epoch_s=epoch_s,
                                     budget_gbps=1.5 * CHUNK / epoch_s / 1e9, min_region_bytes=4 * MIB))
        assert [t.nodes for t in daemon.tiers] == [(0,), (1,), (2,)]
        daemon.start()
        for _ in range(40):
            daemon.epoch()
            if nodes_of(child, "hot").keys() == {2} and nodes_of(child, "cold").keys() == {2}:
                break
        result = daemon.finish("stopped")
        assert nodes_of(child, "hot") == {2: 4 * MIB // 4096} and nodes_of(child, "cold") == {2: 4 * MIB // 4096}
        assert child.ask("crc") == str(child.crc)
        # one chunk per epoch at most: the bucket holds 1.5 chunks
        assert max(e.moved_bytes for e in result.epochs) <= CHUNK
        assert {m.chunk for m in result.migrations} >= ours
        assert all(m.target_node == 2 and m.source_node == 0 for m in result.migrations if m.chunk in ours)
        assert result.skipped["budget"] > 0
    finally:
        stop_child(child)


def test_a_child_that_exits_is_named_and_the_daemon_stops() -> None:
    child = spawn_child(2, 2)
    daemon = attach(AttachConfig(pid=child.pid, policy="lru"))
    daemon.start()
    daemon.epoch()
    stop_child(child)
    with pytest.raises(TargetGoneError, match=rf"process {child.pid} exited while it was tracked"):
        daemon.epoch()


# -- the kernel's own tiering ----------------------------------------------------------------------------------


@pytest.fixture
def kernel_tiering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hmat_tiers: None) -> Iterator[None]:
    """The lab profile kernel-tiering applied (numa_balancing=2, demotion on), torn down after."""
    monkeypatch.setenv("TIEREMU_LAB_STATE", str(tmp_path / "lab-state"))
    monkeypatch.delenv("TIEREMU_SYSFS_ROOT", raising=False)
    profile = str(SHIPPED / "kernel-tiering.yaml")
    applied = CliRunner().invoke(main, ["lab", "apply", profile, "--sysfs-root", "/"])
    assert applied.exit_code == 0, applied.output
    try:
        yield
    finally:
        torn = CliRunner().invoke(main, ["lab", "teardown", profile, "--sysfs-root", "/"])
        assert torn.exit_code == 0, torn.output


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A cgroup v2 group with the memory controller, so that reclaim (and so demotion) can be asked of it."""
    controllers = CGROUP / "cgroup.controllers"
    if not controllers.exists() or "memory" not in controllers.read_text().split():
        pytest.skip("needs cgroup v2 with the memory controller at /sys/fs/cgroup")
    enabled_here = "memory" not in (CGROUP / "cgroup.subtree_control").read_text().split()
    if enabled_here:
        (CGROUP / "cgroup.subtree_control").write_text("+memory")
    group = CGROUP / "tieremu-attach-test"
    group.mkdir()
    try:
        if not (group / "memory.reclaim").exists():
            pytest.skip("this kernel has no memory.reclaim (needs 5.19+)")
        yield group
    finally:
        group.rmdir()
        if enabled_here:
            (CGROUP / "cgroup.subtree_control").write_text("-memory")


def test_kernel_baseline_counts_the_demotion_and_promotion_of_a_childs_pages(
        kernel_tiering: None, memory_cgroup: Path) -> None:
    child = spawn_child(8, 8, before_alloc=lambda pid: (memory_cgroup / "cgroup.procs").write_text(str(pid)))
    try:
        ours = child.chunks("hot") | child.chunks("cold")
        daemon = attach(AttachConfig(pid=child.pid, policy="kernel", sample_pages=0, min_region_bytes=8 * MIB))
        assert daemon.policy is None
        daemon.start()
        assert daemon.epoch().chunks_by_tier["node0"] >= len(ours)
        kernel = KernelTiering("/")
        before = kernel.snapshot()

        try:  # proactive reclaim of the child's group: with demotion on, its cold pages go down a tier
            (memory_cgroup / "memory.reclaim").write_text(str(16 * MIB))
        except OSError as exc:
            if exc.errno != errno.EAGAIN:  # EAGAIN: less than asked was reclaimed
                raise
        demoted = sum(c for name in ("hot", "cold") for n, c in nodes_of(child, name).items() if n > 0)
        after_reclaim = kernel.delta(before, kernel.snapshot())
        assert demoted > 0, "reclaim demoted none of the child's pages"
        assert after_reclaim.demoted >= demoted  # the kernel's counters cover what we see moved
        seen = daemon.epoch()
        assert seen.moved_by_others >= 1 and seen.migrations == 0

        # numa_balancing=2 promotes the pages the child keeps reading back to node 0: read the region reclaim
        # demoted more of
        region = max(("hot", "cold"), key=lambda name: sum(c for n, c in nodes_of(child, name).items() if n > 0))
        on_slow = nodes_of(child, region)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            assert child.ask(f"spin {region} 2") == "ok"
            if nodes_of(child, region).get(0, 0) > on_slow.get(0, 0):
                break
        promoted = nodes_of(child, region).get(0, 0) - on_slow.get(0, 0)
        total = kernel.delta(before, kernel.snapshot())
        assert promoted > 0, f"no page of the child came back to node 0 in 45 s: {nodes_of(child, region)}"
        assert total.promoted >= promoted and total.knobs.ready
        result = daemon.finish("stopped")
        assert result.kernel is not None and result.kernel.demoted >= demoted and result.migrations == []
        assert child.ask("crc") == str(child.crc)
    finally:
        stop_child(child)
