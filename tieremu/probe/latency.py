"""Idle load-to-use latency by dependent-load pointer chase, like lmbench `lat_mem_rd` and MLC's idle latency.

The chain visits every cache line of the buffer once per cycle in random order, so hardware prefetchers
cannot guess the next address; the buffer lives on the memory node (mbind, verified) and the chasing thread
is pinned to a CPU of the initiator node.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tieremu.errors import PlacementError, ProbeError
from tieremu.native.build import kernels, tsc_ticks_per_ns
from tieremu.numa.topology import Topology
from tieremu.probe.affinity import pinned
from tieremu.record.stats import Summary
from tieremu.tiers.region import Region, allocate

LINE = 64  # one element per cache line
QUICK_SIZES = tuple(s << 10 for s in (32, 256)) + tuple(s << 20 for s in (1, 8, 32, 256, 1024))
FULL_SIZES = tuple(1 << p for p in range(15, 33))  # 32 KiB .. 4 GiB
MATRIX_SIZE = 1 << 30
# Two clock reads of a chase further apart than this had the thread descheduled between them (preempted, or its vCPU
# stolen): far above any memory access (a TLB miss to DRAM is ~1 µs) and any block of 16 loads, below a scheduler
# slice (here the longest were 4-17 ms on a loaded 2-vCPU VM). Such intervals say nothing about memory and are left
# out of latency figures, plain and paced alike, so that an emulated tier's ratio to local compares like with like.
DESCHEDULED_NS = 50_000


class ChaseBuffer:
    """A random cyclic chain over every cache line of `size` bytes on `node`."""

    def __init__(self, size: int, node: int, *, hugepages: bool = False, seed: int = 0) -> None:
        if size < 16 * LINE:
            raise ProbeError(f"a chase buffer needs at least {16 * LINE} bytes, got {size}")
        self.size, self.node, self.hugepages = size, node, hugepages
        self.elements = size // LINE
        self.region: Region = allocate(size, (node,), hugepages=hugepages)
        placed = self.region.placement().fraction_on((node,))
        if placed < 1.0:
            self.region.close()
            raise PlacementError(f"chase buffer: only {placed:.1%} of its pages are on node {node}")
        order = np.random.default_rng(seed).permutation(self.elements).astype(np.uint64)
        kernels().chase_link(self.region.addr, order.ctypes.data, self.elements, LINE)
        self.start = self.region.addr + int(order[0]) * LINE
        self.excluded = Descheduled()

    def cycle_length(self) -> int:
        """Loads until the chain is back where it started: equals `elements` for a single full cycle."""
        return int(kernels().chase_cycle_length(self.start, self.elements + 1))

    def chase_ns(self, steps: int) -> float:
        """Mean ns per dependent load over `steps` loads (rounded up to a multiple of 16), blocks of 16 loads during
        which the thread was descheduled left out (added to `excluded`)."""
        steps = max(16, -(-steps // 16) * 16)
        end, stats, tpn = ctypes.c_void_p(), (ctypes.c_uint64 * 4)(), tsc_ticks_per_ns()
        elapsed = kernels().chase_gapped(self.start, steps, round(DESCHEDULED_NS * tpn), ctypes.byref(end), stats)
        return self.excluded.add(elapsed, steps, stats, tpn)

    def close(self) -> None:
        self.region.close()


@dataclass
class Descheduled:
    """What the chase kernels left out as descheduled (see DESCHEDULED_NS), accumulated over calls."""

    ns: float = 0.0  # time left out
    gaps: int = 0  # intervals left out
    longest_ns: float = 0.0  # the longest interval between two clock reads, left out or not

    def add(self, elapsed_ns: int, steps: int, stats: ctypes.Array[ctypes.c_uint64], tpn: float) -> float:
        """Account one kernel call's stats (ticks left out, gaps, loads left out, longest interval); the mean ns per
        load over what was kept (the whole call's if nothing was: an unmeasurable call is not made to look fast)."""
        excluded, gaps, loads, longest = (int(v) for v in stats)
        self.ns += excluded / tpn
        self.gaps += gaps
        self.longest_ns = max(self.longest_ns, longest / tpn)
        if loads >= steps:
            return elapsed_ns / steps
        return max(0.0, elapsed_ns - excluded / tpn) / (steps - loads)

    def to_dict(self) -> dict[str, float]:
        return {"descheduled_ns": self.ns, "descheduled_gaps": self.gaps, "longest_gap_ns": self.longest_ns}


@dataclass(frozen=True)
class LatencyPoint:
    initiator_cpu: int
    memory_node: int
    size_bytes: int
    hugepages: bool
    ns: Summary
    excluded: Descheduled = field(default_factory=Descheduled)  # of the timed repeats


def measure(buffer: ChaseBuffer, cpu: int, repeats: int = 5, seconds: float = 0.1) -> LatencyPoint:
    """Median latency over repeats, each about `seconds` long, after a warm-up pass."""
    with pinned((cpu,)):
        probe = buffer.chase_ns(1 << 14)
        steps = max(1 << 14, int(seconds * 1e9 / max(probe, 0.5)))
        buffer.chase_ns(min(steps, buffer.elements))  # warm-up: caches and TLB reach their steady state
        buffer.excluded = Descheduled()
        values = [buffer.chase_ns(steps) for _ in range(repeats)]
    return LatencyPoint(cpu, buffer.node, buffer.size, buffer.hugepages, Summary.of(values), buffer.excluded)


def size_sweep(cpu: int, node: int, sizes: tuple[int, ...], *, hugepages: bool, repeats: int = 5,
               seconds: float = 0.05, progress: Callable[[], None] | None = None) -> list[LatencyPoint]:
    points = []
    for size in sizes:
        buffer = ChaseBuffer(size, node, hugepages=hugepages)
        try:
            points.append(measure(buffer, cpu, repeats, seconds))
        finally:
            buffer.close()
        if progress:
            progress()
    return points


@dataclass(frozen=True)
class LatencyMatrix:
    """Idle latency in ns, initiator node × memory node, like MLC's `--latency_matrix`."""

    size_bytes: int
    hugepages: bool
    cells: dict[int, dict[int, LatencyPoint]]


def latency_matrix(topology: Topology, size: int = MATRIX_SIZE, *, hugepages: bool = True, repeats: int = 5,
                   seconds: float = 0.1, progress: Callable[[], None] | None = None) -> LatencyMatrix:
    cells: dict[int, dict[int, LatencyPoint]] = {}
    for mem in topology.memory_nodes:
        buffer = ChaseBuffer(size, mem, hugepages=hugepages)
        try:
            for init in topology.cpu_nodes:
                cpu = topology.node(init).cpus[0]
                cells.setdefault(init, {})[mem] = measure(buffer, cpu, repeats, seconds)
                if progress:
                    progress()
        finally:
            buffer.close()
    return LatencyMatrix(size, hugepages, cells)
