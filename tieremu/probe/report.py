"""Probe results as data (JSON-ready dicts keyed by node id) and as MLC-style text matrices."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from tieremu.probe.bandwidth import KERNELS, BandwidthMatrix, BandwidthPoint
from tieremu.probe.latency import LatencyMatrix, LatencyPoint
from tieremu.probe.loaded import LoadedPoint
from tieremu.probe.migrate import MigrateProbe
from tieremu.record.stats import Summary

T = TypeVar("T")


def _stat(s: Summary) -> dict[str, Any]:
    return s.to_dict()


def _matrix(cells: Mapping[int, Mapping[int, T]], value: Callable[[T], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # JSON object keys are strings; they are the node ids.
    return {str(i): {str(m): value(v) for m, v in sorted(row.items())} for i, row in sorted(cells.items())}


def latency_json(matrix: LatencyMatrix, sweep: list[LatencyPoint], origin: str) -> dict[str, Any]:
    return {
        "unit": "ns", "origin": origin, "size_bytes": matrix.size_bytes, "hugepages": matrix.hugepages,
        "matrix": _matrix(matrix.cells, lambda p: _stat(p.ns) | {"initiator_cpu": p.initiator_cpu}),
        "sweep": [{"initiator_cpu": p.initiator_cpu, "memory_node": p.memory_node, "size_bytes": p.size_bytes,
                   "hugepages": p.hugepages, "ns": _stat(p.ns)} for p in sweep],
    }


def bandwidth_json(matrix: BandwidthMatrix, origin: str) -> dict[str, Any]:
    return {
        "unit": "GB/s", "origin": origin,
        "bytes_counted": "STREAM convention: read 1x, write 1x, copy 2x, triad 3x the bytes of one stream",
        "matrix": {k: _matrix(matrix.at_max_threads(k), lambda p: _stat(p.gb_per_s) | {"threads": p.threads})
                   for k in KERNELS if matrix.at_max_threads(k)},
        "points": [_bandwidth_point(p) for p in matrix.points],
    }


def _bandwidth_point(p: BandwidthPoint) -> dict[str, Any]:
    return {"initiator_node": p.initiator_node, "memory_node": p.memory_node, "kernel": p.kernel,
            "threads": p.threads, "cpus": list(p.cpus), "bytes_per_thread": p.bytes_per_thread,
            "gb_per_s": _stat(p.gb_per_s)}


def loaded_json(points: list[LoadedPoint], initiator: int, memory_node: int, origin: str) -> dict[str, Any]:
    return {
        "origin": origin, "initiator_node": initiator, "memory_node": memory_node,
        "curves": {mix: [{"delay_ns": p.delay_ns, "traffic_threads": p.traffic_threads,
                          "traffic_gb_per_s": p.traffic_gb_per_s, "latency_ns": _stat(p.latency_ns)}
                         for p in points if p.mix == mix]
                   for mix in dict.fromkeys(p.mix for p in points)},
    }


def migrate_json(probe: MigrateProbe, origin: str) -> dict[str, Any]:
    return {
        "origin": origin, "notes": probe.notes,
        "copy_counts": "bytes copied once (not the STREAM 2x), to compare with bytes migrated",
        "points": [{"source": p.source, "target": p.target, "hugepages": p.hugepages, "batch_pages": p.batch_pages,
                    "migrate_gb_per_s": _stat(p.migrate_gb_per_s), "copy_gb_per_s": _stat(p.copy_gb_per_s),
                    "copy_over_migrate": p.copy_over_migrate, "failed_pages": p.failed_pages}
                   for p in probe.points],
    }


def format_matrix(cells: Mapping[int, Mapping[int, float]], title: str, precision: int = 1) -> str:
    """A matrix the way Intel MLC prints it: memory nodes across, initiator nodes down."""
    columns = sorted({m for row in cells.values() for m in row})
    width = max(8, precision + 6)
    lines = [title, f"{'':>10}{'Numa node':>{width * max(1, len(columns))}}",
             f"{'Numa node':<10}" + "".join(f"{c:>{width}}" for c in columns)]
    for init in sorted(cells):
        row = cells[init]
        lines.append(f"{init:>9} " + "".join(
            f"{row[c]:>{width}.{precision}f}" if c in row else f"{'-':>{width}}" for c in columns))
    return "\n".join(lines)


def medians(cells: Mapping[int, Mapping[int, Any]], pick: Callable[[Any], Summary]) -> dict[int, dict[int, float]]:
    return {i: {m: pick(v).median for m, v in row.items()} for i, row in cells.items()}
