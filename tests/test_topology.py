"""The topology reader against fixture sysfs/procfs trees (tests/fixtures/sysfs/*/README.md)."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from fixture_paths import FIXTURES, fixture_root

from tieremu.errors import InvalidNodeError, NumaError, TopologyError
from tieremu.numa.sysfs import ROOT_ENV, SysfsReader, format_list, parse_list, resolve_root
from tieremu.numa.topology import HmatAccess, HugePages, Knobs, Topology, discover

KIB = 1024
NODE = "sys/devices/system/node"
HP_2M = 2048
HP_1G = 1048576


def copy_fixture(name: str, tmp_path: Path) -> Path:
    """A writable copy of a fixture tree."""
    dst = tmp_path / name
    shutil.copytree(fixture_root(name), dst, symlinks=True)
    return dst


def names_list(message: str, ids: str) -> bool:
    """Whether message contains the node list ids as a whole token (so "0" does not match "10" or "0-3")."""
    return re.search(rf"(?<![\d,-]){re.escape(ids)}(?![\d,-])", message) is not None


@pytest.fixture(scope="module")
def one_node() -> Topology:
    return discover(fixture_root("one-node-vm"))


@pytest.fixture(scope="module")
def two_socket() -> Topology:
    return discover(fixture_root("two-socket-cpuless"))


@pytest.fixture(scope="module")
def cxl() -> Topology:
    return discover(fixture_root("cxl-expander"))


@pytest.fixture(scope="module")
def sparse() -> Topology:
    return discover(fixture_root("truncated-missing-optional"))


# --------------------------------------------------------------------------------------------------
# fixture_paths helper


def test_fixture_root_points_at_the_tree_and_rejects_unknown_names():
    assert Path(__file__).parent / "fixtures" / "sysfs" == FIXTURES
    root = fixture_root("one-node-vm")
    assert root == FIXTURES / "one-node-vm"
    assert (root / NODE / "online").is_file()
    with pytest.raises(FileNotFoundError) as exc:
        fixture_root("no-such-tree")
    assert "no-such-tree" in str(exc.value)
    assert "cxl-expander" in str(exc.value)  # names the fixtures that do exist


# --------------------------------------------------------------------------------------------------
# one-node-vm: a snapshot of the development VM


def test_one_node_vm_nodes_and_cpus(one_node):
    assert one_node.root == str(fixture_root("one-node-vm"))
    assert one_node.online == (0,)
    assert one_node.possible == (0,)
    assert list(one_node.nodes) == [0]
    node = one_node.node(0)
    assert node.id == 0
    assert node.cpus == (0, 1)
    assert node.cpuless is False
    assert node.has_memory is True
    assert one_node.cpu_nodes == (0,)
    assert one_node.cpuless_nodes == ()
    assert one_node.memory_nodes == (0,)


def test_one_node_vm_memory(one_node):
    node = one_node.node(0)
    assert node.mem_total_bytes == 5859540 * KIB
    assert node.mem_free_bytes == 5481192 * KIB
    assert one_node.system_mem_total_bytes == 24684092 * KIB
    assert one_node.system_mem_available_bytes == 24306712 * KIB


def test_one_node_vm_free_bytes_uses_mem_available_not_node_meminfo(one_node):
    # Per-node meminfo under-reports on this VM (deferred memory init): the one memory node's free
    # memory is the system's MemAvailable, whatever order or repetition the ids come in.
    assert one_node.free_bytes((0,)) == 24306712 * KIB
    assert one_node.free_bytes([0, 0]) == 24306712 * KIB
    assert one_node.free_bytes((0,)) != one_node.node(0).mem_free_bytes


def test_node_memory_underreported(one_node, two_socket, cxl, sparse):
    # one-node-vm: node 0 says 5859540 kB of a system 24684092 kB (under 90%).
    assert one_node.node_memory_underreported is True
    assert two_socket.node_memory_underreported is False  # the nodes sum to MemTotal exactly
    assert cxl.node_memory_underreported is False
    assert sparse.node_memory_underreported is False  # no /proc/meminfo: cannot tell


def test_node_memory_underreported_needs_every_node_total(tmp_path):
    root = copy_fixture("one-node-vm", tmp_path)
    (root / NODE / "node0" / "meminfo").unlink()
    assert discover(root).node_memory_underreported is False


def test_one_node_vm_distances_hmat_tiers_hugepages(one_node):
    node = one_node.node(0)
    assert node.distances == {0: 10}
    assert one_node.distance(0, 0) == 10
    assert node.access == {}
    assert node.memory_tier == 4
    assert one_node.memory_tiers == {4: (0,)}
    assert node.hugepages == (HugePages(HP_2M, 0, 0, 0), HugePages(HP_1G, 0, 0, 0))


def test_one_node_vm_knobs_ignore_non_node_weight_entries(one_node):
    # weighted_interleave/ holds node0 and "__auto_type" (6.18's name for "auto"): only nodeN counts.
    assert one_node.knobs == Knobs(
        numa_balancing=0, demotion_enabled=False, thp_enabled="madvise", weighted_interleave={0: 1}
    )


def test_one_node_vm_nearest_and_invalid_nodes(one_node):
    assert one_node.nearest_memory_node(0) == 0
    with pytest.raises(InvalidNodeError) as exc:
        one_node.node(1)
    assert isinstance(exc.value, NumaError)
    assert exc.value.nodes == (1,)
    assert exc.value.call == "topology"
    assert "node 1 " in str(exc.value)
    assert names_list(str(exc.value), "0")
    with pytest.raises(InvalidNodeError):
        one_node.nearest_memory_node(1)


def test_one_node_vm_require_memory_nodes(one_node):
    assert one_node.require_memory_nodes((0,), "bind") is None
    assert one_node.require_memory_nodes([], "bind") is None
    with pytest.raises(InvalidNodeError) as exc:
        one_node.require_memory_nodes([0, 1], "bind")
    msg = str(exc.value)
    assert exc.value.nodes == (1,)
    assert exc.value.call == "bind"
    assert msg.startswith("bind: node 1 ")
    assert "the only valid node: 0" in msg


# --------------------------------------------------------------------------------------------------
# two-socket-cpuless: socket 1's CPUs offlined


def test_two_socket_nodes_and_cpus(two_socket):
    assert two_socket.online == (0, 1)
    assert two_socket.possible == (0, 1)
    assert two_socket.node(0).cpus == (*range(0, 16), *range(32, 48))
    assert two_socket.node(1).cpus == ()
    assert two_socket.node(1).cpuless is True
    assert two_socket.node(0).cpuless is False
    assert two_socket.cpu_nodes == (0,)
    assert two_socket.cpuless_nodes == (1,)
    assert two_socket.memory_nodes == (0, 1)


def test_two_socket_memory(two_socket):
    assert two_socket.node(0).mem_total_bytes == 65305720 * KIB
    assert two_socket.node(0).mem_free_bytes == 58214400 * KIB
    assert two_socket.node(1).mem_total_bytes == 66057452 * KIB
    assert two_socket.node(1).mem_free_bytes == 60290284 * KIB
    assert two_socket.system_mem_total_bytes == 131363172 * KIB
    assert two_socket.system_mem_available_bytes == 117964800 * KIB


def test_two_socket_free_bytes_sums_node_meminfo(two_socket):
    # With two memory nodes the per-node MemFree figures are used, not MemAvailable.
    assert two_socket.free_bytes((0, 1)) == (58214400 + 60290284) * KIB
    assert two_socket.free_bytes([1]) == 60290284 * KIB
    assert two_socket.free_bytes([0, 0]) == 58214400 * KIB
    assert two_socket.free_bytes(()) == 0


def test_two_socket_distances_no_hmat_one_tier(two_socket):
    assert {n: node.distances for n, node in two_socket.nodes.items()} == {0: {0: 10, 1: 21}, 1: {0: 21, 1: 10}}
    assert two_socket.distance(0, 1) == 21
    assert two_socket.distance(1, 0) == 21
    assert two_socket.distance(1, 1) == 10
    assert two_socket.node(0).access == {}
    assert two_socket.node(1).access == {}
    assert two_socket.node(0).memory_tier == 4
    assert two_socket.node(1).memory_tier == 4
    assert two_socket.memory_tiers == {4: (0, 1)}


def test_two_socket_hugepages(two_socket):
    assert two_socket.node(0).hugepages == (HugePages(HP_2M, 1024, 1024, 0), HugePages(HP_1G, 0, 0, 0))
    assert two_socket.node(1).hugepages == (HugePages(HP_2M, 512, 496, 0), HugePages(HP_1G, 4, 4, 0))


def test_two_socket_knobs_without_weighted_interleave(two_socket):
    assert two_socket.knobs == Knobs(
        numa_balancing=0, demotion_enabled=False, thp_enabled="always", weighted_interleave=None
    )


def test_two_socket_nearest_and_validation(two_socket):
    assert two_socket.nearest_memory_node(0) == 0
    assert two_socket.nearest_memory_node(1) == 1  # CPU-less but has memory: itself
    assert two_socket.require_memory_nodes((0, 1), "membind") is None
    assert two_socket.require_memory_nodes([1], "membind") is None
    with pytest.raises(InvalidNodeError) as exc:
        two_socket.node(2)
    assert exc.value.nodes == (2,)
    assert names_list(str(exc.value), "0-1")
    with pytest.raises(InvalidNodeError) as exc:
        two_socket.require_memory_nodes([1, 2], "membind")
    assert exc.value.nodes == (2,)
    assert str(exc.value).startswith("membind: node 2 ")
    assert "valid nodes: 0-1" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# cxl-expander: 2 sockets, CXL nodes 2 and 3, generic initiator node 4, HMAT, three tiers

CXL_DISTANCES = [
    [10, 21, 14, 26, 28],
    [21, 10, 24, 16, 18],
    [14, 24, 10, 28, 30],
    [26, 16, 28, 10, 12],
    [28, 18, 30, 12, 10],
]
DRAM0 = HmatAccess((0,), 95, 105, 110000, 90000)
DRAM1 = HmatAccess((1,), 95, 105, 110000, 90000)
CXL2 = HmatAccess((0,), 240, 260, 45000, 35000)
CXL3_ANY = HmatAccess((4,), 150, 170, 30000, 26000)
CXL3_CPU = HmatAccess((1,), 390, 410, 22000, 18000)


def test_cxl_nodes_and_cpus(cxl):
    assert cxl.online == (0, 1, 2, 3, 4)
    assert cxl.possible == tuple(range(8))
    assert list(cxl.nodes) == [0, 1, 2, 3, 4]
    assert cxl.node(0).cpus == (*range(0, 24), *range(48, 72))
    assert cxl.node(1).cpus == (*range(24, 48), *range(72, 96))
    for n in (2, 3, 4):
        assert cxl.node(n).cpus == ()
        assert cxl.node(n).cpuless is True
    assert cxl.cpu_nodes == (0, 1)
    assert cxl.memory_nodes == (0, 1, 2, 3)
    # The generic initiator (node 4) has neither CPUs nor memory: not a CPU-less *memory* node.
    assert cxl.cpuless_nodes == (2, 3)
    assert [cxl.node(n).has_memory for n in range(5)] == [True, True, True, True, False]


def test_cxl_memory(cxl):
    expected = {
        0: (263581328, 235269776),
        1: (264205464, 237982872),
        2: (134217728, 129955840),
        3: (67108864, 67040256),
        4: (0, 0),
    }
    for n, (total, free) in expected.items():
        assert cxl.node(n).mem_total_bytes == total * KIB, n
        assert cxl.node(n).mem_free_bytes == free * KIB, n
    assert cxl.system_mem_total_bytes == 729113384 * KIB
    assert cxl.system_mem_available_bytes == 672612352 * KIB


def test_cxl_free_bytes(cxl):
    assert cxl.free_bytes((0, 1, 2, 3)) == (235269776 + 237982872 + 129955840 + 67040256) * KIB
    assert cxl.free_bytes([2, 3]) == (129955840 + 67040256) * KIB
    assert cxl.free_bytes([3]) == 67040256 * KIB
    assert cxl.free_bytes([4]) == 0
    with pytest.raises(InvalidNodeError):
        cxl.free_bytes([2, 5])


def test_cxl_distance_matrix(cxl):
    assert {n: node.distances for n, node in cxl.nodes.items()} == {
        n: dict(enumerate(row)) for n, row in enumerate(CXL_DISTANCES)
    }
    for a in range(5):
        for b in range(5):
            assert cxl.distance(a, b) == CXL_DISTANCES[a][b]


@pytest.mark.parametrize(
    ("node", "access"),
    [
        (0, {0: DRAM0, 1: DRAM0}),
        (1, {0: DRAM1, 1: DRAM1}),
        (2, {0: CXL2, 1: CXL2}),
        (3, {0: CXL3_ANY, 1: CXL3_CPU}),
        (4, {}),
    ],
)
def test_cxl_hmat_access_classes(cxl, node, access):
    assert cxl.node(node).access == access


def test_cxl_hmat_fields_and_initiators(cxl):
    any_init = cxl.node(3).access[0]
    cpu_init = cxl.node(3).access[1]
    # access0 names the generic initiator (best of any kind), access1 the best CPU node.
    assert any_init.initiators == (4,)
    assert cpu_init.initiators == (1,)
    assert (any_init.read_latency_ns, any_init.write_latency_ns) == (150, 170)
    assert (any_init.read_bandwidth_mbps, any_init.write_bandwidth_mbps) == (30000, 26000)
    assert (cpu_init.read_latency_ns, cpu_init.write_latency_ns) == (390, 410)
    assert (cpu_init.read_bandwidth_mbps, cpu_init.write_bandwidth_mbps) == (22000, 18000)
    assert cxl.node(2).access[1].initiators == (0,)


def test_cxl_memory_tiers(cxl):
    assert [cxl.node(n).memory_tier for n in range(5)] == [4, 4, 28, 90, None]
    assert cxl.memory_tiers == {4: (0, 1), 28: (2,), 90: (3,)}
    assert list(cxl.memory_tiers) == [4, 28, 90]  # fastest first


def test_cxl_fixture_tiers_follow_the_kernel_adistance_formula(cxl):
    """Self-check of the fixture: mm/memory-tiers.c's HMAT-based tier ids from the access1 figures."""
    ref = cxl.node(0).access[1]
    ref_lat = ref.read_latency_ns + ref.write_latency_ns
    ref_bw = ref.read_bandwidth_mbps + ref.write_bandwidth_mbps
    adistance_dram = 4 * 128 + 128 // 2
    for n in (2, 3):
        perf = cxl.node(n).access[1]
        adist = adistance_dram * (perf.read_latency_ns + perf.write_latency_ns) // ref_lat
        adist = adist * ref_bw // (perf.read_bandwidth_mbps + perf.write_bandwidth_mbps)
        assert cxl.node(n).memory_tier == adist // 128
    assert cxl.node(0).memory_tier == cxl.node(1).memory_tier == adistance_dram // 128


def test_cxl_hugepages(cxl):
    assert cxl.node(0).hugepages == (HugePages(HP_2M, 4096, 4000, 0), HugePages(HP_1G, 16, 16, 0))
    assert cxl.node(1).hugepages == (HugePages(HP_2M, 4100, 0, 4), HugePages(HP_1G, 16, 8, 0))
    assert cxl.node(2).hugepages == (HugePages(HP_2M, 2048, 1024, 0), HugePages(HP_1G, 0, 0, 0))
    assert cxl.node(3).hugepages == (HugePages(HP_2M, 0, 0, 0), HugePages(HP_1G, 0, 0, 0))
    assert cxl.node(4).hugepages == ()


def test_cxl_knobs(cxl):
    assert cxl.knobs == Knobs(
        numa_balancing=2,
        demotion_enabled=True,
        thp_enabled="never",
        weighted_interleave={0: 5, 1: 5, 2: 2, 3: 1},
    )


def test_cxl_nearest_memory_node(cxl):
    assert [cxl.nearest_memory_node(n) for n in range(5)] == [0, 1, 2, 3, 3]


def test_cxl_unknown_and_memoryless_nodes(cxl):
    # Node 5 is possible but not online: it does not exist for placement.
    for bad in (5, 9, -1):
        with pytest.raises(InvalidNodeError) as exc:
            cxl.node(bad)
        assert exc.value.nodes == (bad,)
        assert f"node {bad} " in str(exc.value)
        assert names_list(str(exc.value), "0-3")
    assert cxl.node(4).id == 4  # the generic initiator exists ...
    with pytest.raises(InvalidNodeError) as exc:  # ... but cannot hold memory
        cxl.require_memory_nodes([2, 4], "tier cxl")
    assert exc.value.nodes == (4,)
    assert exc.value.call == "tier cxl"
    assert str(exc.value).startswith("tier cxl: node 4 ")
    assert "valid nodes: 0-3" in str(exc.value)
    assert cxl.require_memory_nodes([0, 1, 2, 3], "tier all") is None


def test_cxl_require_memory_nodes_names_every_bad_node(cxl):
    with pytest.raises(InvalidNodeError) as exc:
        cxl.require_memory_nodes([9, 2, 4], "bind")
    assert exc.value.nodes == (9, 4)
    assert names_list(str(exc.value), "4,9")
    assert "valid nodes: 0-3" in str(exc.value)


def test_require_memory_nodes_plural_message_is_grammatical(cxl):
    with pytest.raises(InvalidNodeError) as exc:
        cxl.require_memory_nodes([4, 9], "bind")
    assert "bind: nodes 4,9 do not exist or have no memory" in str(exc.value)


def test_distance_to_unknown_node_raises_invalid_node_error(cxl):
    with pytest.raises(InvalidNodeError):
        cxl.distance(0, 7)


# --------------------------------------------------------------------------------------------------
# truncated trees: required files malformed or missing, optional files absent


def test_malformed_required_file_names_the_file():
    root = fixture_root("truncated")
    with pytest.raises(TopologyError) as exc:
        discover(root)
    msg = str(exc.value)
    assert str(root / NODE / "node0" / "distance") in msg
    assert "10 2#!~" in msg  # shows what it found


def test_missing_required_file_names_the_file():
    root = fixture_root("truncated-missing-required")
    with pytest.raises(TopologyError) as exc:
        discover(root)
    msg = str(exc.value)
    assert str(root / NODE / "node1" / "cpulist") in msg
    assert "missing" in msg


def test_empty_root_names_the_online_file(tmp_path):
    with pytest.raises(TopologyError) as exc:
        discover(tmp_path)
    assert str(tmp_path / NODE / "online") in str(exc.value)


def test_truncated_distance_row_is_an_error(tmp_path):
    root = copy_fixture("two-socket-cpuless", tmp_path)
    (root / NODE / "node1" / "distance").write_text("21\n")  # one value for two online nodes
    with pytest.raises(TopologyError) as exc:
        discover(root)
    assert str(root / NODE / "node1" / "distance") in str(exc.value)


@pytest.mark.parametrize(
    ("fixture", "rel", "content"),
    [
        ("two-socket-cpuless", f"{NODE}/online", "zero\n"),
        ("two-socket-cpuless", f"{NODE}/possible", "0-x\n"),
        ("two-socket-cpuless", f"{NODE}/has_memory", "all\n"),
        ("two-socket-cpuless", f"{NODE}/node0/cpulist", "0-15,3z\n"),
        ("two-socket-cpuless", f"{NODE}/node1/meminfo", "Node 1 MemTotal: lots\n"),
        ("two-socket-cpuless", "proc/meminfo", "MemTotal 131363172\n"),
        ("cxl-expander", "sys/devices/virtual/memory_tiering/memory_tier28/nodelist", "two\n"),
        ("cxl-expander", f"{NODE}/node2/access1/initiators/read_latency", "n/a\n"),
        ("cxl-expander", f"{NODE}/node0/hugepages/hugepages-2048kB/nr_hugepages", "many\n"),
        ("cxl-expander", "proc/sys/kernel/numa_balancing", "on\n"),
        ("cxl-expander", "sys/kernel/mm/numa/demotion_enabled", "maybe\n"),
        ("cxl-expander", "sys/kernel/mm/transparent_hugepage/enabled", "always madvise never\n"),
        ("cxl-expander", "sys/kernel/mm/mempolicy/weighted_interleave/node2", "heavy\n"),
    ],
)
def test_malformed_file_is_an_error_naming_it(tmp_path, fixture, rel, content):
    # A present but malformed file is an error even when the file itself is optional: only absence is
    # tolerated.
    root = copy_fixture(fixture, tmp_path)
    (root / rel).write_text(content)
    with pytest.raises(TopologyError) as exc:
        discover(root)
    assert str(root / rel) in str(exc.value)


def test_binary_garbage_is_a_topology_error(tmp_path):
    root = copy_fixture("two-socket-cpuless", tmp_path)
    path = root / NODE / "node0" / "distance"
    path.write_bytes(b"10 \xff\xfe21\n")
    with pytest.raises(TopologyError) as exc:
        discover(root)
    assert str(path) in str(exc.value)


def test_unreadable_required_file_is_a_topology_error(tmp_path, monkeypatch):
    root = copy_fixture("two-socket-cpuless", tmp_path)
    target = root / NODE / "node0" / "cpulist"
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(TopologyError) as exc:
        discover(root)
    assert str(target) in str(exc.value)


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.EOPNOTSUPP])
def test_attribute_read_errors_count_as_absent(tmp_path, monkeypatch, code):
    root = copy_fixture("cxl-expander", tmp_path)
    target = root / "sys/kernel/mm/numa/demotion_enabled"
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == target:
            raise OSError(code, os.strerror(code), str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    topo = discover(root)
    assert topo.knobs.demotion_enabled is None
    assert topo.knobs.numa_balancing == 2  # the other knobs still read


def test_missing_optional_files_give_absent_values(sparse):
    assert sparse.online == (0, 1, 2)
    assert sparse.possible == (0, 1, 2)  # no `possible` file: the online nodes
    assert [sparse.node(n).cpus for n in range(3)] == [(0, 1, 2, 3), (4, 5), (6, 7)]
    for node in sparse.nodes.values():
        assert node.access == {}
        assert node.memory_tier is None
        assert node.hugepages == ()
    assert sparse.memory_tiers == {}
    assert sparse.knobs == Knobs(numa_balancing=None, demotion_enabled=None, thp_enabled=None, weighted_interleave=None)
    assert sparse.system_mem_total_bytes is None
    assert sparse.system_mem_available_bytes is None
    assert {n: node.distances for n, node in sparse.nodes.items()} == {
        0: {0: 10, 1: 20, 2: 30},
        1: {0: 20, 1: 10, 2: 20},
        2: {0: 30, 1: 20, 2: 10},
    }


def test_missing_has_memory_is_inferred_from_meminfo(sparse):
    assert [sparse.node(n).has_memory for n in range(3)] == [True, False, True]
    assert sparse.node(1).mem_total_bytes == 0
    assert sparse.node(0).mem_total_bytes == 4194304 * KIB
    assert sparse.node(2).mem_free_bytes == 4063232 * KIB
    assert sparse.memory_nodes == (0, 2)
    assert sparse.cpu_nodes == (0, 1, 2)
    assert sparse.cpuless_nodes == ()


def test_sparse_free_bytes_nearest_and_validation(sparse):
    assert sparse.free_bytes((0, 2)) == (3145728 + 4063232) * KIB
    # Node 1 (memoryless) is 20 from both memory nodes: the tie goes to the lower id.
    assert sparse.nearest_memory_node(1) == 0
    assert sparse.nearest_memory_node(2) == 2
    with pytest.raises(InvalidNodeError) as exc:
        sparse.require_memory_nodes([1], "bind")
    assert "valid nodes: 0,2" in str(exc.value)


def test_missing_node_meminfo_gives_none_and_free_bytes_none(tmp_path):
    root = copy_fixture("two-socket-cpuless", tmp_path)
    (root / NODE / "node1" / "meminfo").unlink()
    topo = discover(root)
    assert topo.node(1).mem_total_bytes is None
    assert topo.node(1).mem_free_bytes is None
    assert topo.node(1).has_memory is True  # has_memory still says so
    assert topo.free_bytes((0, 1)) is None  # one unknown figure: the sum is unknown
    assert topo.free_bytes((0,)) == 58214400 * KIB


def test_hmat_initiators_without_performance_files(tmp_path):
    root = copy_fixture("cxl-expander", tmp_path)
    init = root / NODE / "node2" / "access1" / "initiators"
    for name in ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth"):
        (init / name).unlink()
    topo = discover(root)
    assert topo.node(2).access[1] == HmatAccess((0,), None, None, None, None)
    assert topo.node(2).access[0] == CXL2


def test_hmat_initiators_are_in_numeric_order(tmp_path):
    root = copy_fixture("cxl-expander", tmp_path)
    (root / NODE / "node3" / "access0" / "initiators" / "node10").touch()
    assert discover(root).node(3).access[0].initiators == (4, 10)


def test_free_bytes_one_node_without_proc_meminfo_falls_back_to_node_meminfo(tmp_path):
    root = copy_fixture("one-node-vm", tmp_path)
    (root / "proc" / "meminfo").unlink()
    assert discover(root).free_bytes((0,)) == 5481192 * KIB


# --------------------------------------------------------------------------------------------------
# the root: argument, TIEREMU_SYSFS_ROOT, /


def test_env_var_selects_the_root_when_none_is_passed(monkeypatch):
    root = fixture_root("cxl-expander")
    monkeypatch.setenv(ROOT_ENV, str(root))
    topo = discover()
    assert topo.root == str(root)
    assert topo.online == (0, 1, 2, 3, 4)
    assert topo.memory_tiers == {4: (0, 1), 28: (2,), 90: (3,)}
    assert SysfsReader().root == root


def test_explicit_root_wins_over_env_var(monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(fixture_root("cxl-expander")))
    topo = discover(fixture_root("two-socket-cpuless"))
    assert topo.root == str(fixture_root("two-socket-cpuless"))
    assert topo.online == (0, 1)


def test_root_defaults_to_slash_without_env_var(monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    assert resolve_root() == Path("/")
    assert resolve_root("/some/where") == Path("/some/where")


def test_empty_env_var_means_unset(monkeypatch):
    monkeypatch.setenv(ROOT_ENV, "")
    assert resolve_root() == Path("/")


# --------------------------------------------------------------------------------------------------
# the kernel list format


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        ("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)),
        ("", ()),
        ("\n", ()),
        ("0\n", (0,)),
        ("0-1", (0, 1)),
        ("1,3,5", (1, 3, 5)),
        ("0-15,32-47", (*range(16), *range(32, 48))),
    ],
)
def test_parse_list_and_round_trip(text, ids):
    assert parse_list(text) == ids
    assert format_list(ids) == text.strip()
    assert parse_list(format_list(ids)) == ids


def test_format_list_sorts_and_merges():
    assert format_list([11, 3, 0, 1, 2, 10, 8, 3]) == "0-3,8,10-11"
    assert format_list(()) == ""
    assert format_list([]) == ""
    assert format_list([7]) == "7"
    assert format_list((1, 3)) == "1,3"
    assert format_list(list(range(96))) == "0-95"


@pytest.mark.parametrize("text", ["0-", "a", "1-b", "0,,x"])
def test_parse_list_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_list(text)
