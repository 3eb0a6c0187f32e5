"""What a page migration costs next to a plain copy between the same two nodes: the price policies pay.

For every ordered node pair: move_pages throughput at several batch sizes, with 4 KiB and transparent huge
pages, beside single-thread memcpy throughput from a buffer on the source node to one on the target node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tieremu.native.build import kernels
from tieremu.numa.topology import Topology
from tieremu.probe.affinity import pinned
from tieremu.record.stats import Summary
from tieremu.tiers.region import allocate

QUICK_BATCHES = (64, 4096)
FULL_BATCHES = (1, 16, 64, 512, 4096, 65536)


@dataclass(frozen=True)
class MigratePoint:
    source: int
    target: int
    hugepages: bool
    batch_pages: int
    migrate_gb_per_s: Summary
    copy_gb_per_s: Summary
    failed_pages: int

    @property
    def copy_over_migrate(self) -> float:
        """How many times faster a plain copy is than migrating the same bytes."""
        return self.copy_gb_per_s.median / self.migrate_gb_per_s.median if self.migrate_gb_per_s.median else 0.0


@dataclass(frozen=True)
class MigrateProbe:
    points: list[MigratePoint]
    notes: list[str] = field(default_factory=list)


def migrate_probe(topology: Topology, *, size: int = 64 << 20, quick: bool = True, repeats: int = 3,
                  progress: Callable[[], None] | None = None) -> MigrateProbe:
    nodes = topology.memory_nodes
    pairs = [(a, b) for a in nodes for b in nodes if a != b]
    if not pairs:
        return MigrateProbe([], [f"one memory node ({nodes[0] if nodes else '-'}): no pair to migrate between; "
                                 "run inside the multi-node guest (tieremu vm run -- tieremu probe migrate)"])
    cpu = topology.node(topology.cpu_nodes[0]).cpus[0]
    points = []
    with pinned((cpu,)):  # move_pages copies in the caller's context: pin it like the copy it is compared with
        for src, dst in pairs:
            copy = _copy_gbps(src, dst, size, repeats)
            for hugepages in (False, True):
                for batch in QUICK_BATCHES if quick else FULL_BATCHES:
                    gbps, failed = _migrate_gbps(src, dst, size, repeats, hugepages, batch)
                    points.append(MigratePoint(src, dst, hugepages, batch, gbps, copy, failed))
                    if progress:
                        progress()
    return MigrateProbe(points)


def _migrate_gbps(src: int, dst: int, size: int, repeats: int, hugepages: bool, batch: int) -> tuple[Summary, int]:
    region = allocate(size, (src,), hugepages=hugepages)
    values, failed = [], 0
    try:
        for _ in range(repeats):
            forward = region.migrate(dst, batch=batch)
            back = region.migrate(src, batch=batch)
            failed += sum(forward.failed.values()) + sum(back.failed.values())
            values.append(forward.gb_per_s)
    finally:
        region.close()
    return Summary.of(values), failed


def _copy_gbps(src: int, dst: int, size: int, repeats: int) -> Summary:
    a, b = allocate(size, (src,)), allocate(size, (dst,))
    try:
        k = kernels()
        k.bw_copy(b.addr, a.addr, size, 1)  # warm-up
        return Summary.of([size / k.bw_copy(b.addr, a.addr, size, 1) for _ in range(repeats)])
    finally:
        a.close()
        b.close()
