"""Probing an emulated or shaped tier through the same delay-injection path its users get.

Latency: the pointer chase runs with the tier's extra latency added to every dependent load. Bandwidth: the
stream kernels are paced chunk by chunk to the tier's target. Both report what was requested next to what
was achieved, measured independently by the probe's own clock, so the audit checks the model.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tieremu.errors import ProbeError
from tieremu.native.build import kernels, tsc_ticks_per_ns
from tieremu.probe.affinity import pinned
from tieremu.probe.latency import DESCHEDULED_NS, ChaseBuffer, Descheduled
from tieremu.record.stats import Summary
from tieremu.tiers.region import Region, allocate
from tieremu.tiers.resolve import ResolvedTierMap
from tieremu.tiers.timing import Calibration, TimingModel

PACE_CHUNK = 256 << 10  # pacing granularity: ~10 µs of stream, smooth enough, and one clock read amortised
KIND = {"read": 0, "write": 1, "copy": 2}
NO_SLOWDOWN = 0.999  # a bandwidth ratio at or above this is the host's own speed
ALWAYS_AHEAD = 1e-9  # ns per byte: a target no stream misses (1000 TB/s)
# Lateness the paced chase repays, in loads of target: enough to absorb interrupts and short steal (with 4 loads the
# mean stayed 1% high, with 1024 within 0.1%), little enough that a long hiccup is not followed by a long burst at
# host speed. Descheduled intervals (over DESCHEDULED_NS) are not lateness: the kernel leaves them out of schedule and
# measure alike. Before it did, a 2.2x target came out 3.8x on a loaded 2-vCPU VM: preemptions of 4-17 ms, mostly
# landing in the wait between loads, were dropped from the schedule past the slack yet stayed in the measured time.
PACE_SLACK_LOADS = 1024
# A target must clear the paced chase's floor by this much, or host noise above the floor cannot be repaid.
PACE_FLOOR_MARGIN = 1.03


@dataclass(frozen=True)
class Audit:
    """Requested vs achieved for one metric of one tier, and how much delay was injected to get there."""

    tier: str
    mode: str  # emulated | shaped
    metric: str  # "latency_ns" or "<kernel>_gb_per_s"
    requested: float
    achieved: Summary
    injected_ns: float
    elapsed_ns: float  # wall time of the timed repeats, descheduled intervals included
    excluded: Descheduled = field(default_factory=Descheduled)  # what the timed repeats left out as descheduled

    @property
    def error(self) -> float:
        return self.achieved.median / self.requested - 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"achieved": self.achieved.to_dict(), "error": self.error,
                               "excluded": self.excluded.to_dict()}


def tier_latency(model: TimingModel, cal: Calibration, cpu: int, *, size: int = 1 << 30, repeats: int = 5,
                 seconds: float = 0.2) -> Audit:
    """Idle latency of the tier: the chase over its host memory, every load paced to the target latency.

    The pacing is closed-loop (chase_paced: an absolute schedule in TSC ticks, late loads repaid up to
    PACE_SLACK_LOADS of target), so host noise does not shift the mean; intervals where the thread was descheduled
    (over DESCHEDULED_NS) are left out of schedule and measure alike, and reported (`excluded`), as the local
    chase leaves them out of its figure. Targets below the paced chase's own floor (its fence and clock read per
    load: about 1.1-1.2x local) use dependent adds instead, their count tuned on the chain (descheduled blocks of 16
    loads left out likewise). The reported repeats are timed by the probe's own clock (CLOCK_MONOTONIC), less
    the descheduled intervals.
    """
    buf = ChaseBuffer(size, model.host_node, hugepages=True)
    k, end, tpn = kernels(), ctypes.c_void_p(), tsc_ticks_per_ns()
    target = model.target_latency_ns
    steps = max(1 << 14, int(seconds * 1e9 / target))
    ticks, slack, gap = round(target * tpn), round(PACE_SLACK_LOADS * target * tpn), round(DESCHEDULED_NS * tpn)
    stats = (ctypes.c_uint64 * 4)()
    excluded = Descheduled()

    def paced(n: int, t: int) -> float:
        return excluded.add(k.chase_paced(buf.start, n, t, slack, gap, ctypes.byref(end), stats), n, stats, tpn)

    def spun(n: int, adds: int) -> float:
        return excluded.add(k.chase_spun(buf.start, n, adds, gap, ctypes.byref(end), stats), n, stats, tpn)

    def per_load(kernel: Callable[[int, int], float], amount: int) -> float:
        return statistics.median(kernel(steps // 4, amount) for _ in range(5))

    try:
        with pinned((cpu,)):
            per_load(paced, 0)  # warm-up: TLB and caches of the chain
            floor = per_load(paced, 0)
            if target >= floor * PACE_FLOOR_MARGIN:
                kernel, amount, zero = paced, ticks, floor
            else:
                kernel, amount = spun, _tune_adds(lambda n: per_load(spun, n), target)
                zero = per_load(spun, 0)
            excluded = Descheduled()  # of the timed repeats only
            t0 = time.monotonic_ns()
            loads = [kernel(steps, amount) for _ in range(repeats)]
            wall = time.monotonic_ns() - t0
    finally:
        buf.close()
    wait = max(0.0, statistics.median(loads) - zero)
    return Audit(model.tier, model.mode, "latency_ns", model.target_latency_ns, Summary.of(loads),
                 wait * steps * repeats, float(wall), excluded)


def _tune_adds(per_load: Callable[[int], float], target: float) -> int:
    """The number of dependent adds per load that brings the chase to target, fitted on the chain: a first guess
    at 0.3 ns per add, then secant steps on what the chain really does."""
    zero = per_load(0)
    if target <= zero:
        return 0
    adds = max(1, round((target - zero) / 0.3))
    for _ in range(3):
        slope = max(1e-3, (per_load(adds) - zero) / adds)
        adds = max(0, round((target - zero) / slope))
    return adds


def tier_bandwidth(model: TimingModel, cal: Calibration, kernel: str, cpu: int, *, working_set: int = 256 << 20,
                   repeats: int = 5, seconds: float = 0.2) -> Audit:
    """One-thread bandwidth of the tier for a read, write or copy stream paced to the model's target."""
    if kernel not in KIND:
        raise ProbeError(f"no paced kernel {kernel!r} for emulated tiers; valid: {', '.join(KIND)}")
    size = working_set // (2 if kernel == "copy" else 1) // PACE_CHUNK * PACE_CHUNK
    src, dst = _buffers(size, model.host_node)
    counted = size * (2 if kernel == "copy" else 1)
    ns_per_byte = _pace(model, kernel)
    iters = max(1, round(seconds * 1e9 / (counted / model.target_bandwidth_gbps[kernel])))
    k = kernels()
    injected, sink = ctypes.c_uint64(), ctypes.c_uint64()
    try:
        with pinned((cpu,)):
            def run(n: int) -> tuple[int, int]:
                t = k.bw_paced(KIND[kernel], dst.addr, src.addr, size, n, PACE_CHUNK, ns_per_byte,
                               tsc_ticks_per_ns(), ctypes.byref(injected), ctypes.byref(sink))
                return t, injected.value

            run(1)  # warm-up
            runs = [run(iters) for _ in range(repeats)]
    finally:
        src.close()
        dst.close()
    return Audit(model.tier, model.mode, f"{kernel}_gb_per_s", model.target_bandwidth_gbps[kernel],
                 Summary.of([counted * iters / t for t, _ in runs]), float(sum(i for _, i in runs)),
                 float(sum(t for t, _ in runs)))


def _buffers(size: int, node: int) -> tuple[Region, Region]:
    return allocate(size, (node,)), allocate(size, (node,))


def _pace(model: TimingModel, kernel: str) -> float:
    """ns per counted byte to pace a stream to, or 0 (do not pace) when the tier is not slower than its host:
    a stream asked for no slowdown runs the unpaced loop rather than chase its own noise."""
    if model.bandwidth_ratio(kernel) >= NO_SLOWDOWN:
        return 0.0
    return 1 / model.target_bandwidth_gbps[kernel]


def pacing_overhead(kernel: str, cpu: int, node: int, *, working_set: int = 256 << 20, rounds: int = 7) -> float:
    """What the pacer's bookkeeping costs a stream: the paced loop with a target it always beats (so it reads
    the clock and keeps its account after every chunk but never waits) over the same loop unpaced, alternating
    the two; median of rounds. A tier asked for no slowdown does not pace at all (see _pace)."""
    size = working_set // (2 if kernel == "copy" else 1) // PACE_CHUNK * PACE_CHUNK
    src, dst = _buffers(size, node)
    k = kernels()
    injected, sink = ctypes.c_uint64(), ctypes.c_uint64()

    def run(ns_per_byte: float) -> int:
        return k.bw_paced(KIND[kernel], dst.addr, src.addr, size, 4, PACE_CHUNK, ns_per_byte, tsc_ticks_per_ns(),
                          ctypes.byref(injected), ctypes.byref(sink))

    ratios = []
    try:
        with pinned((cpu,)):
            run(0.0)
            for _ in range(rounds):
                plain = run(0.0)
                ratios.append(run(ALWAYS_AHEAD) / plain - 1)
                if injected.value:
                    raise ProbeError("the accounting-only pacer waited; its target is not always beaten")
    finally:
        src.close()
        dst.close()
    return statistics.median(ratios)


@dataclass(frozen=True)
class TierMeasurement:
    """One probe figure of one tier; for emulated and shaped tiers it is the audit of the timing model."""

    tier: str
    backing: str
    metric: str
    achieved: Summary
    requested: float | None  # the model's target; None for a real tier (nothing was asked of it)
    excluded: Descheduled = field(default_factory=Descheduled)  # latency: descheduled intervals left out

    @property
    def error(self) -> float | None:
        return None if self.requested is None else self.achieved.median / self.requested - 1

    def to_dict(self) -> dict[str, object]:
        return {"tier": self.tier, "backing": self.backing, "metric": self.metric, "requested": self.requested,
                "achieved": self.achieved.to_dict(), "error": self.error, **self.excluded.to_dict()}


def probe_tiers(resolved: ResolvedTierMap, cal: Calibration, cpu: int, *, latency: bool = True,
                kernels_: tuple[str, ...] = (), size: int = 1 << 30, working_set: int = 256 << 20,
                repeats: int = 5) -> list[TierMeasurement]:
    """Every host-memory tier of a resolved map through the path its users get: real tiers plainly, emulated and
    shaped ones through their timing models."""
    from tieremu.probe import bandwidth
    from tieremu.probe.latency import measure

    out = []
    for tier in resolved.tiers:
        if not tier.nodes:
            continue  # a file or GPU tier is not host memory: `probe storage` and `probe gpu` measure those
        node = tier.nodes[0]
        if latency:
            if tier.timing is not None:
                a = tier_latency(tier.timing, cal, cpu, size=size, repeats=repeats)
                out.append(TierMeasurement(tier.name, tier.label, "latency_ns", a.achieved, a.requested, a.excluded))
            else:
                buf = ChaseBuffer(size, node, hugepages=True)
                try:
                    point = measure(buf, cpu, repeats, 0.2)
                    out.append(TierMeasurement(tier.name, tier.label, "latency_ns", point.ns, None, point.excluded))
                finally:
                    buf.close()
        for kernel in kernels_:
            if tier.timing is not None:
                a = tier_bandwidth(tier.timing, cal, kernel, cpu, working_set=working_set, repeats=repeats)
                out.append(TierMeasurement(tier.name, tier.label, a.metric, a.achieved, a.requested))
            else:
                p = bandwidth.measure(kernel, (cpu,), node, working_set=working_set, repeats=repeats)
                out.append(TierMeasurement(tier.name, tier.label, f"{kernel}_gb_per_s", p.gb_per_s, None))
    return out
