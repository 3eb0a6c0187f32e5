"""The memory probes on this machine: the chase is a single full cycle, figures are real and shaped right."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tieremu.cli import main
from tieremu.errors import ProbeError
from tieremu.numa.topology import discover
from tieremu.probe import bandwidth, latency, loaded, migrate
from tieremu.probe.report import format_matrix, latency_json, medians
from tieremu.record.stats import Summary

KIB, MIB = 1 << 10, 1 << 20


def test_chase_visits_every_line_exactly_once_per_cycle() -> None:
    buf = latency.ChaseBuffer(64 * KIB, 0, seed=3)
    try:
        n = buf.elements
        assert n == 1024 and buf.cycle_length() == n
        # Read the chain back: element i holds the address of its successor.
        words = buf.region.array[: n * latency.LINE].view(np.uint64).reshape(n, latency.LINE // 8)[:, 0]
        succ = ((words - np.uint64(buf.region.addr)) // np.uint64(latency.LINE)).astype(np.int64)
        del words  # a live view would (rightly) stop the region from closing
        assert sorted(succ) == list(range(n))  # a permutation: every line has exactly one predecessor
        seen, i = set(), (buf.start - buf.region.addr) // latency.LINE
        for _ in range(n):
            seen.add(i)
            i = succ[i]
        assert len(seen) == n and i == (buf.start - buf.region.addr) // latency.LINE
        assert not np.any(succ == np.arange(n))  # no line points at itself
    finally:
        buf.close()


def test_latency_grows_from_l1_to_dram() -> None:
    small, large = latency.size_sweep(0, 0, (32 * KIB, 256 * MIB), hugepages=True, repeats=3, seconds=0.02)
    assert 0.3 < small.ns.median < 20  # an L1/L2 hit: a few ns
    assert large.ns.median > 5 * small.ns.median  # DRAM: tens to hundreds of ns
    assert small.ns.n == 3 and small.size_bytes == 32 * KIB and large.hugepages


def test_tiny_chase_buffer_is_refused() -> None:
    with pytest.raises(ProbeError, match="at least 1024 bytes"):
        latency.ChaseBuffer(512, 0)


def test_bandwidth_kernels_report_positive_gbps_and_count_streams() -> None:
    for kernel in bandwidth.KERNELS:
        point = bandwidth.measure(kernel, (0,), 0, working_set=64 * MIB, repeats=2, seconds=0.02)
        assert point.gb_per_s.median > 0.5, kernel  # any machine moves more than 0.5 GB/s from DRAM
        assert point.threads == 1 and point.bytes_per_thread == 64 * MIB
    with pytest.raises(ProbeError, match="unknown bandwidth kernel 'scale'; valid: read, write, copy, triad"):
        bandwidth.measure("scale", (0,), 0, working_set=64 * MIB)


def test_thread_counts_scale_to_many_cores() -> None:
    assert bandwidth.thread_counts(2, quick=True) == [1, 2]
    assert bandwidth.thread_counts(1, quick=False) == [1]
    assert bandwidth.thread_counts(112, quick=False) == [1, 2, 4, 8, 16, 32, 64, 112]


def test_mlc_style_matrix_format() -> None:
    text = format_matrix({0: {0: 90.04, 1: 141.5}, 1: {0: 139.9, 1: 88.0}}, "Idle latencies (ns)")
    assert text.splitlines() == [
        "Idle latencies (ns)",
        "                 Numa node",
        "Numa node        0       1",
        "        0     90.0   141.5",
        "        1    139.9    88.0",
    ]


def test_latency_json_is_keyed_by_node_id() -> None:
    s = Summary.of([100.0, 110.0, 105.0])
    point = latency.LatencyPoint(0, 1, 1 << 30, True, s)
    data = latency_json(latency.LatencyMatrix(1 << 30, True, {0: {1: point}}), [], "measured")
    assert data["matrix"]["0"]["1"]["median"] == 105.0 and data["matrix"]["0"]["1"]["n"] == 3
    assert data["matrix"]["0"]["1"]["spread"] == pytest.approx(10 / 105) and data["unit"] == "ns"
    assert medians({0: {1: point}}, lambda p: p.ns) == {0: {1: 105.0}}


def test_loaded_latency_curve_shape_on_two_cpus() -> None:
    topo = discover("/")
    if len(topo.node(topo.cpu_nodes[0]).cpus) < 2:
        pytest.skip("needs two CPUs on the first node: one chases, one loads")
    points = loaded.loaded_latency(topo, topo.cpu_nodes[0], topo.memory_nodes[0], chase_bytes=64 * MIB,
                                   repeats=2, seconds=0.02, mixes=("100/0", "50/50"))
    assert [(p.mix, p.delay_ns) for p in points] == [
        (m, d) for m in ("100/0", "50/50") for d in loaded.QUICK_DELAYS]
    by = {(p.mix, p.delay_ns): p for p in points}
    assert by[("100/0", None)].traffic_gb_per_s == 0 and by[("100/0", None)].traffic_threads == 0
    # Flat out moves far more than with a 4 µs pause every 4 KiB (which caps it near 1 GB/s).
    assert by[("100/0", 0)].traffic_gb_per_s > 2 * by[("100/0", 4000)].traffic_gb_per_s
    assert all(p.latency_ns.median > 0 for p in points)


def test_migrate_probe_on_one_node_says_why_it_has_no_pairs() -> None:
    topo = discover("/")
    if len(topo.memory_nodes) > 1:
        pytest.skip("this machine has node pairs; the guest tests cover them")
    result = migrate.migrate_probe(topo)
    assert result.points == [] and "no pair to migrate between" in result.notes[0]


def test_cli_latency_json_matrix() -> None:
    out = CliRunner().invoke(main, ["probe", "latency", "--json", "--size-mib", "16", "--quick"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    nodes = [str(n) for n in discover("/").memory_nodes]
    assert list(data["matrix"]) == [str(n) for n in discover("/").cpu_nodes]
    assert list(data["matrix"]["0"]) == nodes and data["matrix"]["0"]["0"]["n"] == 3
    assert data["hugepages"] is True and data["origin"] in ("measured", "vm")


def test_cli_bandwidth_json_matrix() -> None:
    out = CliRunner().invoke(main, ["probe", "bandwidth", "--json", "--kernel", "read", "--working-set-mib", "64"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert list(data["matrix"]) == ["read"] and data["unit"] == "GB/s"
    cell = data["matrix"]["read"]["0"]["0"]
    assert cell["median"] > 0.5 and cell["threads"] == len(discover("/").node(0).cpus)
