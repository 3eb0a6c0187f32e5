"""Loaded latency: the chase's latency while the initiator's other CPUs generate traffic of a given read/write
mix at stepped intensities, giving a bandwidth-latency curve per mix like Mess and MLC `--loaded_latency`.

One CPU chases; every other CPU of the node runs the traffic kernel, so the same code gives a two-point
curve on a 2-core VM and a full curve on a 100-core socket.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tieremu.errors import ProbeError
from tieremu.native.build import kernels, spin_ns_per_iter
from tieremu.numa.topology import Topology
from tieremu.probe.affinity import pinned
from tieremu.probe.latency import ChaseBuffer, measure
from tieremu.record.stats import Summary
from tieremu.tiers.region import Region, allocate

# Read:write mixes in cache lines, named as Mess names them (percent reads / percent writes).
MIXES = {"100/0": (1, 0), "75/25": (3, 1), "50/50": (1, 1)}
# Pause after every 64 lines of traffic, from gentle to flat out; None is the idle point (no traffic).
QUICK_DELAYS: tuple[int | None, ...] = (None, 4000, 1000, 250, 0)
FULL_DELAYS: tuple[int | None, ...] = (None, 16000, 8000, 4000, 2000, 1000, 500, 250, 100, 0)
TRAFFIC_BYTES = 256 << 20


@dataclass(frozen=True)
class LoadedPoint:
    mix: str
    delay_ns: int | None  # None: idle, no traffic threads
    traffic_threads: int
    traffic_gb_per_s: float
    latency_ns: Summary


class _Traffic:
    """Traffic threads pinned to cpus, streaming over their own buffers until stopped."""

    def __init__(self, cpus: tuple[int, ...], node: int) -> None:
        self.cpus = cpus
        self.regions: list[Region] = [allocate(TRAFFIC_BYTES, (node,)) for _ in cpus]

    def run_while(self, mix: tuple[int, int], delay_ns: int, body: Callable[[], Summary]) -> tuple[float, Summary]:
        """Run body() while traffic flows; returns (traffic GB/s, body's result)."""
        stop = ctypes.c_int(0)
        spin = round(delay_ns / spin_ns_per_iter())
        moved = [ctypes.c_uint64() for _ in self.cpus]
        elapsed = [ctypes.c_uint64() for _ in self.cpus]
        started = threading.Barrier(len(self.cpus) + 1)

        def work(i: int) -> None:
            sink = ctypes.c_uint64()
            with pinned((self.cpus[i],)):
                started.wait()
                kernels().traffic(self.regions[i].addr, TRAFFIC_BYTES // 8, mix[0], mix[1], spin,
                                  ctypes.byref(stop), ctypes.byref(moved[i]), ctypes.byref(elapsed[i]),
                                  ctypes.byref(sink))

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(self.cpus))]
        for t in threads:
            t.start()
        started.wait()
        try:
            result = body()
        finally:
            stop.value = 1
            for t in threads:
                t.join()
        gbps = sum(m.value / max(e.value, 1) for m, e in zip(moved, elapsed, strict=True))
        return gbps, result

    def close(self) -> None:
        for r in self.regions:
            r.close()


def loaded_latency(topology: Topology, initiator: int, memory_node: int, *, quick: bool = True,
                   chase_bytes: int = 256 << 20, repeats: int = 3, seconds: float = 0.1,
                   mixes: tuple[str, ...] = tuple(MIXES), progress: Callable[[], None] | None = None,
                   ) -> list[LoadedPoint]:
    cpus = topology.node(initiator).cpus
    if len(cpus) < 2:
        raise ProbeError(f"loaded latency needs 2+ CPUs on node {initiator} (one chases, the rest load); "
                         f"it has {len(cpus)}")
    chase_cpu, traffic_cpus = cpus[0], tuple(cpus[1:])
    delays = QUICK_DELAYS if quick else FULL_DELAYS
    chase = ChaseBuffer(chase_bytes, memory_node, hugepages=True)  # as the idle probe's chase: one curve, one TLB
    traffic = _Traffic(traffic_cpus, memory_node)
    points = []
    try:
        idle = measure(chase, chase_cpu, repeats, seconds).ns
        for mix in mixes:
            for delay in delays:
                if delay is None:
                    points.append(LoadedPoint(mix, None, 0, 0.0, idle))
                    continue
                gbps, lat = traffic.run_while(MIXES[mix], delay,
                                              lambda: measure(chase, chase_cpu, repeats, seconds).ns)
                points.append(LoadedPoint(mix, delay, len(traffic_cpus), gbps, lat))
                if progress:
                    progress()
    finally:
        chase.close()
        traffic.close()
    return points
