"""Binding, interleaving and migrating across real kernel NUMA nodes: runs inside the multi-node QEMU guest.

Written for configs/vm/cxl-3node.yaml (node 0 with the CPUs, CPU-less nodes 1 and 2 of 512 MiB). Figures
of speed inside the guest are emulation artefacts; these tests assert placement and data only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tieremu.errors import InvalidNodeError, NodeFullError
from tieremu.numa.pages import PAGE_SIZE
from tieremu.numa.syscalls import Policy
from tieremu.numa.topology import discover
from tieremu.tiers.region import allocate

pytestmark = pytest.mark.numa_vm

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
WEIGHTS = Path("/sys/kernel/mm/mempolicy/weighted_interleave")


@pytest.fixture(scope="module", autouse=True)
def three_nodes() -> None:
    nodes = discover("/").memory_nodes
    if not {0, 1, 2} <= set(nodes):
        pytest.skip(f"written for the 3-node guest (configs/vm/cxl-3node.yaml); memory nodes here: {nodes}")


def _fill(region_array) -> int:  # type: ignore[no-untyped-def]
    """Distinct content per page, then its checksum."""
    import numpy as np

    pages = region_array.reshape(-1, PAGE_SIZE)
    pages[:] = np.arange(PAGE_SIZE, dtype=np.uint8)
    pages[:, :8] = np.arange(len(pages), dtype=np.uint64).view(np.uint8).reshape(-1, 8)
    return zlib.crc32(region_array)


def test_tensor_bound_to_node_1_then_migrated_to_node_2_keeps_every_page_and_byte() -> None:
    import torch

    region = allocate(64 * MIB, (1,))
    kv = region.tensor(torch.float16, (32, 1024, 1024))
    kv.copy_(torch.arange(1024, dtype=torch.float16).expand(32, 1024, 1024))
    before = zlib.crc32(region.array)
    assert region.placement().by_node == {1: 64 * MIB // PAGE_SIZE}

    result = region.migrate(2)
    assert result.ok and result.moved == result.pages == 64 * MIB // PAGE_SIZE and result.already == 0
    assert region.placement().by_node == {2: result.pages}
    assert zlib.crc32(region.array) == before
    assert float(kv[31, 1023, 1023]) == 1023.0


def test_interleave_splits_pages_evenly() -> None:
    region = allocate(4 * MIB, (1, 2), Policy.INTERLEAVE)
    try:
        by_node = region.placement().by_node
        assert set(by_node) == {1, 2} and sum(by_node.values()) == 1024
        assert abs(by_node[1] - 512) <= 1 and abs(by_node[2] - 512) <= 1
    finally:
        region.close()


@pytest.fixture
def weights_3_to_1() -> Iterator[None]:
    if not (WEIGHTS / "node1").exists():
        pytest.skip("this kernel has no weighted interleave (needs 6.9+)")
    saved = {n: (WEIGHTS / f"node{n}").read_text() for n in (1, 2)}
    try:
        (WEIGHTS / "node1").write_text("3")
        (WEIGHTS / "node2").write_text("1")
        yield
    finally:
        for n, value in saved.items():
            (WEIGHTS / f"node{n}").write_text(value)


def test_weighted_interleave_splits_pages_by_weight(weights_3_to_1: None) -> None:
    region = allocate(4 * MIB, (1, 2), Policy.WEIGHTED_INTERLEAVE)
    try:
        by_node = region.placement().by_node
        assert sum(by_node.values()) == 1024
        # 3:1 over 1024 pages; a stride is 4 pages, so allow one stride's worth per node.
        assert abs(by_node[1] - 768) <= 4 and abs(by_node[2] - 256) <= 4, by_node
    finally:
        region.close()


def test_huge_page_region_migrates_with_no_failures_after_ebusy_recheck() -> None:
    if discover("/").knobs.thp_enabled == "never":
        pytest.skip("transparent huge pages are disabled in this guest")
    region = allocate(32 * MIB, (1,), hugepages=True)
    try:
        checksum = _fill(region.array)
        result = region.migrate(2)
        assert result.failed == {} and result.moved == result.pages, result
        assert region.placement().by_node == {2: result.pages}
        assert zlib.crc32(region.array) == checksum
    finally:
        region.close()


def test_unknown_node_is_a_clear_error_and_the_process_carries_on() -> None:
    with pytest.raises(InvalidNodeError, match="node 3 does not exist or has no memory on this machine; "
                                               "valid nodes: 0-2"):
        allocate(MIB, (3,))
    region = allocate(MIB, (2,))
    assert region.placement().by_node == {2: 256}
    region.close()


def test_binding_more_than_a_node_holds_is_refused_and_the_process_carries_on() -> None:
    with pytest.raises(NodeFullError, match=r"cannot bind 1024 MiB to node 1: only \d+ MiB free there"):
        allocate(1024 * MIB, (1,))
    region = allocate(8 * MIB, (1,))
    assert region.placement().fraction_on((1,)) == 1.0
    region.close()


CAPSH = shutil.which("capsh")


@pytest.mark.skipif(CAPSH is None, reason="capsh (libcap2-bin) missing; bootstrap installs it")
def test_missing_capability_is_named() -> None:
    code = (
        "from tieremu.numa import syscalls, pages\n"
        "from tieremu.tiers.region import allocate\n"
        "from tieremu.errors import CapabilityError\n"
        "r = allocate(4096, (1,))\n"
        "try:\n"
        "    syscalls.move_pages(pages.page_addresses(r.addr, 4096), 2, move_all=True)\n"
        "except CapabilityError as e:\n"
        "    print('refused:', e)\n"
        "print('still running')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIEREMU_TEST_CODE": code, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([str(CAPSH), "--drop=cap_sys_nice", "--", "-c", f"{sys.executable} -c \"$TIEREMU_TEST_CODE\""],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "CAP_SYS_NICE" in out.stdout and "still running" in out.stdout


def test_every_tier_of_the_cxl_map_is_enforced_and_labelled_vm() -> None:
    from tieremu.tiers.check import check_tiers
    from tieremu.tiers.config import load_tier_map
    from tieremu.tiers.resolve import resolve

    checks = check_tiers(resolve(load_tier_map(REPO / "configs/tiers/cxl-expander.yaml"), discover("/")), MIB)
    assert [(c.tier, c.status, c.backing) for c in checks] == [
        ("dram", "enforced", "vm" if os.environ.get("TIEREMU_IN_VM") == "1" else "real"),
        ("cxl", "enforced", checks[0].backing), ("far", "enforced", checks[0].backing)]


def test_default_round_trip_really_moves_pages(tmp_path: Path) -> None:
    from tieremu.runner.experiment import run_experiment
    from tieremu.runner.spec import load_experiment

    spec = tmp_path / "rt.yaml"
    spec.write_text(f"name: rt\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\n"
                    "jobs:\n  - {kind: roundtrip, route: [dram, cxl, far], size_mib: 16, check_mib: 1,\n"
                    "     repetitions: 1}\n")  # one pass of the route (timing jobs repeat 3x by default)
    result = run_experiment(load_experiment(spec), tmp_path / "out", report=False)
    rows = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    hops = sorted((r for r in rows if r["metric"] == "migration_gbps"), key=lambda r: r["seq"])
    assert [(h["params"]["target_node"], h["params"]["moved"], h["params"]["already"]) for h in hops] == [
        (1, 4096, 0), (2, 4096, 0), (0, 4096, 0)]
    assert all(r["value"] == 1.0 for r in rows if r["metric"] == "checksum_ok")
    assert {h["origin"] for h in hops} == {"measured"}


def test_placement_bench_measures_every_node_pair() -> None:
    from tieremu.bench.placement import bench_placement

    bench = bench_placement(discover("/"), 4 * MIB, repeats=2)
    assert {(m.source, m.target) for m in bench.migrations} == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert all(m.failed_pages == 0 and m.gb_per_s.median > 0 for m in bench.migrations)
