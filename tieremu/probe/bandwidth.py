"""Memory bandwidth by STREAM-style kernels (read, write, copy, triad) on 1..N pinned threads, per node pair.

Bytes are counted the STREAM way: read counts bytes read, write bytes written, copy 2x the bytes copied (one
read and one write stream), triad 3x (two read streams, one write). Write-allocate traffic is not counted.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tieremu.errors import PlacementError, ProbeError
from tieremu.native.build import kernels
from tieremu.numa.topology import Topology
from tieremu.probe.affinity import pinned
from tieremu.record.stats import Summary
from tieremu.tiers.region import Region, allocate

KERNELS = ("read", "write", "copy", "triad")
STREAMS = {"read": 1, "write": 1, "copy": 2, "triad": 3}  # buffers each thread needs, and bytes counted per byte
MIN_THREAD_BYTES = 32 << 20  # well past any per-core cache share


@dataclass(frozen=True)
class BandwidthPoint:
    initiator_node: int
    memory_node: int
    kernel: str
    threads: int
    cpus: tuple[int, ...]
    bytes_per_thread: int
    gb_per_s: Summary


class _ThreadBuffers:
    """The buffers of one worker thread, all on the memory node."""

    def __init__(self, kernel: str, nbytes: int, node: int) -> None:
        self.kernel = kernel
        self.stream_bytes = nbytes // STREAMS[kernel] // 64 * 64
        self.regions: list[Region] = [allocate(self.stream_bytes, (node,)) for _ in range(STREAMS[kernel])]
        for r in self.regions:
            if r.placement().fraction_on((node,)) < 1.0:
                self.close()
                raise PlacementError(f"bandwidth buffer is not wholly on node {node}: {r.placement().describe()}")

    def run(self, iters: int) -> int:
        """One timed call of the kernel; returns elapsed ns."""
        k = kernels()
        a = [r.addr for r in self.regions]
        n = self.stream_bytes
        if self.kernel == "read":
            return k.bw_read(a[0], n // 8, iters, ctypes.byref(ctypes.c_uint64()))
        if self.kernel == "write":
            return k.bw_write(a[0], n // 8, iters)
        if self.kernel == "copy":
            return k.bw_copy(a[0], a[1], n, iters)
        return k.bw_triad(a[0], a[1], a[2], 3.0, n // 8, iters)

    def bytes_counted(self, iters: int) -> int:
        return self.stream_bytes * STREAMS[self.kernel] * iters

    def close(self) -> None:
        for r in self.regions:
            r.close()


def measure(kernel: str, cpus: tuple[int, ...], memory_node: int, *, working_set: int, repeats: int = 5,
            seconds: float = 0.2, initiator_node: int = -1) -> BandwidthPoint:
    """Aggregate GB/s of `kernel` run by one pinned thread per CPU in cpus, buffers on memory_node."""
    if kernel not in KERNELS:
        raise ProbeError(f"unknown bandwidth kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    per_thread = max(MIN_THREAD_BYTES, working_set // len(cpus))
    buffers = [_ThreadBuffers(kernel, per_thread, memory_node) for _ in cpus]
    try:
        with pinned(cpus[:1]):
            one_pass = buffers[0].run(1)  # also the warm-up of the first buffer
        iters = max(1, round(seconds * 1e9 / max(one_pass, 1)))
        _run_threads(buffers, cpus, 1)  # warm-up of every buffer, all threads at once
        values = []
        for _ in range(repeats):
            elapsed = _run_threads(buffers, cpus, iters)
            values.append(sum(b.bytes_counted(iters) for b in buffers) / max(elapsed))
    finally:
        for b in buffers:
            b.close()
    return BandwidthPoint(initiator_node, memory_node, kernel, len(cpus), cpus, per_thread, Summary.of(values))


def _run_threads(buffers: list[_ThreadBuffers], cpus: tuple[int, ...], iters: int) -> list[int]:
    """Run every buffer's kernel at once, one thread per CPU; returns each thread's elapsed ns."""
    barrier = threading.Barrier(len(buffers))
    elapsed = [0] * len(buffers)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with pinned((cpus[i],)):
                barrier.wait()
                elapsed[i] = buffers[i].run(iters)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(buffers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return elapsed


def thread_counts(available: int, quick: bool) -> list[int]:
    """1, 2, 4, … up to every CPU of the node (quick: 1 and all)."""
    if quick:
        return sorted({1, available})
    counts, n = [], 1
    while n < available:
        counts.append(n)
        n *= 2
    return [*counts, available]


@dataclass(frozen=True)
class BandwidthMatrix:
    """GB/s per initiator node × memory node for each kernel, at every thread count measured."""

    points: list[BandwidthPoint]

    def at_max_threads(self, kernel: str) -> dict[int, dict[int, BandwidthPoint]]:
        """The MLC-style matrix: for each pair, the point with the most threads."""
        cells: dict[int, dict[int, BandwidthPoint]] = {}
        for p in self.points:
            if p.kernel != kernel:
                continue
            row = cells.setdefault(p.initiator_node, {})
            if p.memory_node not in row or p.threads > row[p.memory_node].threads:
                row[p.memory_node] = p
        return cells


def bandwidth_matrix(topology: Topology, *, kernels_: tuple[str, ...] = KERNELS, quick: bool = True,
                     working_set: int = 512 << 20, repeats: int = 5, seconds: float = 0.2,
                     progress: Callable[[], None] | None = None) -> BandwidthMatrix:
    points = []
    for init in topology.cpu_nodes:
        cpus = topology.node(init).cpus
        for mem in topology.memory_nodes:
            for kernel in kernels_:
                for n in thread_counts(len(cpus), quick):
                    points.append(measure(kernel, cpus[:n], mem, working_set=working_set, repeats=repeats,
                                          seconds=seconds, initiator_node=init))
                    if progress:
                        progress()
    return BandwidthMatrix(points)
