"""How fast the kernel answers "where are my pages?" and moves them between nodes.

Placement queries and migrations are what every policy epoch pays for, so their cost bounds how often a
daemon can look and act. Figures are medians over repeats, with the machine's load and steal time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tieremu.numa import pages, syscalls
from tieremu.numa.topology import Topology
from tieremu.record.stats import LoadMeter, MachineLoad, Summary
from tieremu.tiers.region import Region, allocate
from tieremu.tiers.resolve import in_vm


@dataclass(frozen=True)
class PairMigration:
    source: int
    target: int
    gb_per_s: Summary
    pages_per_s: Summary
    failed_pages: int


@dataclass(frozen=True)
class PlacementBench:
    size_bytes: int
    page_size: int
    hugepages: bool
    repeats: int
    query_pages_per_s: Summary
    noop_move_pages_per_s: Summary
    migrations: list[PairMigration]
    load: MachineLoad
    origin: str  # measured, or vm inside tieremu's QEMU guest (speeds are emulation artefacts there)
    notes: list[str] = field(default_factory=list)


def bench_placement(topology: Topology, size_bytes: int = 256 << 20, repeats: int = 5,
                    hugepages: bool = False) -> PlacementBench:
    meter = LoadMeter()
    home = topology.memory_nodes[0]
    notes = []
    region = allocate(size_bytes, (home,), hugepages=hugepages)
    try:
        addrs = pages.page_addresses(region.addr, region.nbytes)
        query = _repeat(repeats, lambda: syscalls.query_pages(addrs), len(addrs))
        noop = _repeat(repeats, lambda: syscalls.move_pages(addrs, home), len(addrs))
    finally:
        region.close()
    migrations = [_pair(src, dst, size_bytes, repeats, hugepages)
                  for src in topology.memory_nodes for dst in topology.memory_nodes if src != dst]
    if not migrations:
        notes.append(f"one memory node ({home}): no node pair to migrate between; run this inside the "
                     "multi-node guest (tieremu vm run -- tieremu bench placement) to measure migration")
    return PlacementBench(size_bytes, pages.PAGE_SIZE, hugepages, repeats, Summary.of(query), Summary.of(noop),
                          migrations, meter.stop(), "vm" if in_vm() else "measured", notes)


def _repeat(repeats: int, call: Callable[[], object], count: int) -> list[float]:
    call()  # warm-up: page tables and the kernel's caches
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        rates.append(count / (time.perf_counter() - t0))
    return rates


def _pair(src: int, dst: int, size_bytes: int, repeats: int, hugepages: bool) -> PairMigration:
    """Alternate src→dst and dst→src moves of one region; only the src→dst moves are timed."""
    region: Region = allocate(size_bytes, (src,), hugepages=hugepages)
    gbps, rates, failed = [], [], 0
    try:
        for _ in range(repeats):
            forward = region.migrate(dst)
            failed += sum(forward.failed.values())
            gbps.append(forward.gb_per_s)
            rates.append(forward.moved / forward.seconds if forward.seconds else 0.0)
            back = region.migrate(src)
            failed += sum(back.failed.values())
    finally:
        region.close()
    return PairMigration(src, dst, Summary.of(gbps), Summary.of(rates), failed)
