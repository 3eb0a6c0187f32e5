"""Regions on a node, viewed as torch tensors, placement asked of the kernel (runs on one node)."""

from __future__ import annotations

import gc
import zlib

import numpy as np
import pytest
import torch

from tieremu.errors import InvalidNodeError, NodeFullError, PlacementError
from tieremu.numa import pages
from tieremu.numa.syscalls import Policy
from tieremu.numa.topology import discover
from tieremu.tiers.region import allocate, placement_of

MIB = 1 << 20


def test_256_mib_tensor_bound_to_node_has_all_pages_there_and_survives_migration(
        memory_nodes: tuple[int, ...]) -> None:
    node = memory_nodes[0]
    region = allocate(256 * MIB, (node,))
    x = region.tensor(torch.float16, (128, 1024, 1024))
    # Random content, cheaply: one random MiB repeated, each copy tagged so no two MiB are alike.
    x.view(256, -1).copy_(torch.randn(1, MIB // 2, generator=torch.Generator().manual_seed(1)).half())
    x.view(256, -1)[:, 0] = torch.arange(256, dtype=torch.float16)
    before = zlib.crc32(region.array)

    placed = placement_of(x)
    assert placed.pages == 256 * MIB // pages.PAGE_SIZE
    assert placed.by_node == {node: placed.pages} and placed.fraction_on((node,)) == 1.0

    result = region.migrate(memory_nodes[-1])
    assert result.pages == placed.pages and result.ok
    assert result.moved + result.already == result.pages
    assert zlib.crc32(region.array) == before
    assert region.placement().fraction_on((memory_nodes[-1],)) == 1.0


def test_binding_a_missing_node_names_the_valid_nodes(missing_node: int, memory_nodes: tuple[int, ...]) -> None:
    with pytest.raises(InvalidNodeError) as info:
        allocate(MIB, (missing_node,))
    msg = str(info.value)
    assert f"node {missing_node} does not exist" in msg
    if len(memory_nodes) == 1:
        assert msg.endswith(f"the only valid node: {memory_nodes[0]}")


def test_tensor_is_a_zero_copy_view_of_any_dtype_and_shape(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(MIB, memory_nodes[:1])
    t = region.tensor(torch.bfloat16, (16, 1024), offset=4096)
    t.fill_(1.5)
    assert t.data_ptr() == region.addr + 4096
    # bfloat16 1.5 is 0x3fc0, stored little-endian
    assert bytes(region.array[4096:4100]) == b"\xc0\x3f\xc0\x3f"
    assert region.array[4096 + 16 * 1024 * 2] == 0
    with pytest.raises(PlacementError, match="needs 2097152 bytes at offset 0, but the region holds 1048576"):
        region.tensor(torch.float32, (512, 1024))


def test_views_keep_the_mapping_alive_and_close_refuses_while_they_exist(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(MIB, memory_nodes[:1])
    t = region.tensor(torch.int32, (256, 1024))
    t.fill_(7)
    with pytest.raises(PlacementError, match="live tensor views"):
        region.close()
    assert int(t.sum()) == 7 * 256 * 1024  # still mapped and usable after the refused close
    del region
    gc.collect()
    assert int(t[255, 1023]) == 7  # the tensor alone keeps the memory mapped
    assert placement_of(t).fraction_on(memory_nodes[:1]) == 1.0


def test_close_unmaps_once_views_are_gone(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(MIB, memory_nodes[:1])
    t = region.tensor(torch.uint8, (MIB,))
    del t
    region.close()
    with pytest.raises(PlacementError, match="closed"):
        _ = region.addr


def test_placement_is_asked_not_assumed_untouched_pages_are_absent(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(MIB, memory_nodes[:1], populate=False)
    try:
        p = region.placement()
        assert p.by_node == {} and p.absent == {"ENOENT": MIB // pages.PAGE_SIZE}
        assert p.fraction_on(memory_nodes) == 0.0
        region.array[: MIB // 2] = 3
        assert region.placement().fraction_on(memory_nodes[:1]) == 0.5
    finally:
        region.close()


def test_placement_of_any_torch_tensor(memory_nodes: tuple[int, ...]) -> None:
    x = torch.ones(1 << 20)  # not ours, not page aligned
    p = placement_of(x)
    assert p.pages in (1024, 1025)  # 4 MiB from an unaligned start spans one extra page
    assert p.present == p.pages and set(p.by_node) <= set(memory_nodes)
    assert placement_of(x[::2]).pages == p.pages  # strided views span the same memory
    assert placement_of(torch.empty(0)).pages == 0


def test_interleave_over_the_nodes_there_are(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(4 * MIB, memory_nodes, Policy.INTERLEAVE)
    try:
        p = region.placement()
        assert p.fraction_on(memory_nodes) == 1.0
        share = p.pages // len(memory_nodes)
        assert all(abs(p.by_node[n] - share) <= 1 for n in memory_nodes)
    finally:
        region.close()


def test_huge_page_region_is_aligned_and_migrates_without_failures(memory_nodes: tuple[int, ...]) -> None:
    region = allocate(8 * MIB, memory_nodes[:1], hugepages=True)
    try:
        assert region.addr % (2 * MIB) == 0
        if discover("/").knobs.thp_enabled in ("always", "madvise"):
            assert _anon_huge_kib(region.addr) > 0
        result = region.migrate(memory_nodes[-1])
        assert result.ok and result.moved + result.already == result.pages
    finally:
        region.close()


def test_bind_larger_than_free_memory_is_refused_up_front(memory_nodes: tuple[int, ...]) -> None:
    free = discover("/").free_bytes(memory_nodes[:1])
    assert free is not None
    with pytest.raises(NodeFullError, match="MiB free there; pick a smaller size"):
        allocate(free + 1024 * MIB, memory_nodes[:1])


def test_bad_ranges_and_sizes_are_refused(memory_nodes: tuple[int, ...]) -> None:
    with pytest.raises(PlacementError, match="must be positive"):
        allocate(0, memory_nodes[:1])
    region = allocate(MIB, memory_nodes[:1])
    try:
        with pytest.raises(PlacementError, match="outside the region"):
            region.placement(MIB - 4096, 8192)
    finally:
        region.close()


def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages of the mapping that holds addr, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_placement_counts_from_status() -> None:
    status = np.array([0, 0, 1, -2, -14, 1, 0], dtype=np.int32)
    p = pages.Placement.from_status(status)
    assert p.by_node == {0: 3, 1: 2} and p.absent == {"ENOENT": 1, "EFAULT": 1}
    assert p.fraction_on([1]) == pytest.approx(2 / 7) and p.present == 5
    assert "node 0: 3 (42.9%)" in p.describe()
