"""Inside the guest, topology discovery finds exactly the configured nodes, distances, HMAT and tiers."""

from __future__ import annotations

import pytest

from tieremu.numa.topology import Topology
from tieremu.vm.topology import VmTopology

pytestmark = pytest.mark.numa_vm


def test_exactly_the_configured_nodes(vm_topology: VmTopology, guest_topology: Topology) -> None:
    assert guest_topology.online == tuple(n.id for n in vm_topology.nodes)
    assert guest_topology.memory_nodes == tuple(n.id for n in vm_topology.nodes)
    for node in vm_topology.nodes:
        assert guest_topology.nodes[node.id].cpus == node.cpus, f"node {node.id}"


def test_cpuless_nodes(vm_topology: VmTopology, guest_topology: Topology) -> None:
    assert guest_topology.cpuless_nodes == vm_topology.cpuless_nodes
    assert guest_topology.cpu_nodes == vm_topology.cpu_nodes


def test_node_memory_sizes(vm_topology: VmTopology, guest_topology: Topology) -> None:
    for node in vm_topology.nodes:
        total = guest_topology.nodes[node.id].mem_total_bytes
        assert total is not None, f"node {node.id} publishes no MemTotal"
        configured = node.memory_mib << 20
        # The kernel keeps some of each node for itself (struct pages, reserved ranges).
        assert 0.85 * configured <= total <= configured, f"node {node.id}: {total} of {configured} bytes"


def test_slit_distances(vm_topology: VmTopology, guest_topology: Topology) -> None:
    for node in vm_topology.nodes:
        expected = dict(enumerate(vm_topology.distances[node.id]))
        assert guest_topology.nodes[node.id].distances == expected, f"node {node.id}"


def test_hmat_latency_and_bandwidth(vm_topology: VmTopology, guest_topology: Topology) -> None:
    for node in vm_topology.nodes:
        entry = vm_topology.hmat_entry(node.initiator, node.id)
        access = guest_topology.nodes[node.id].access.get(0)
        assert access is not None, f"node {node.id} has no access0 HMAT attributes"
        assert access.initiators == (node.initiator,)
        assert (access.read_latency_ns, access.write_latency_ns) == (entry.latency_ns, entry.latency_ns)
        assert (access.read_bandwidth_mbps, access.write_bandwidth_mbps) == (entry.bandwidth_mb_s,) * 2


@pytest.mark.usefixtures("hmat_tiers")
def test_memory_tiers_follow_hmat(vm_topology: VmTopology, guest_topology: Topology) -> None:
    # Nodes with the same latency and bandwidth share a tier; slower nodes sit in higher-numbered tiers.
    perf = {n.id: (vm_topology.hmat_entry(n.initiator, n.id).latency_ns,
                   -vm_topology.hmat_entry(n.initiator, n.id).bandwidth_mb_s) for n in vm_topology.nodes}
    tiers = {n.id: guest_topology.nodes[n.id].memory_tier for n in vm_topology.nodes}
    assert None not in tiers.values(), tiers
    assert len(guest_topology.memory_tiers) == len(set(perf.values()))
    for a in perf:
        for b in perf:
            if perf[a] == perf[b]:
                assert tiers[a] == tiers[b], (a, b, tiers)
            elif perf[a][0] < perf[b][0] and perf[a][1] <= perf[b][1]:
                assert tiers[a] < tiers[b], (a, b, tiers)
    assert {n for nodes in guest_topology.memory_tiers.values() for n in nodes} == set(perf)
