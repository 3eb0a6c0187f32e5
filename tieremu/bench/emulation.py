"""How close emulated tiers come to their targets: latency from 1.2x to 4x local, bandwidth from 0.1x to 0.9x,
and what the pacing costs when no slowdown is asked. Each target is measured by the probe's own clock."""

from __future__ import annotations

from dataclasses import dataclass

from tieremu.probe.emulated import pacing_overhead, tier_bandwidth, tier_latency
from tieremu.record.stats import LoadMeter, MachineLoad, Summary
from tieremu.tiers.config import TierSpec, TimingTarget
from tieremu.tiers.timing import Calibration, timing_model

LATENCY_RATIOS = (1.2, 1.5, 2.2, 3.0, 4.0)
BANDWIDTH_RATIOS = (0.1, 0.25, 0.5, 0.8, 0.9)
TOLERANCE = 0.05


@dataclass(frozen=True)
class EmulationPoint:
    metric: str
    ratio: float
    target: float
    achieved: Summary
    descheduled_ns: float = 0.0  # latency: time the chase left out as descheduled (see probe.latency.DESCHEDULED_NS)

    @property
    def error(self) -> float:
        return self.achieved.median / self.target - 1

    @property
    def ok(self) -> bool:
        return abs(self.error) <= TOLERANCE


@dataclass(frozen=True)
class EmulationBench:
    calibration: Calibration
    points: list[EmulationPoint]
    overhead: dict[str, float]  # kernel -> the pacer's bookkeeping (clock read per chunk) over unpaced, median
    load: MachineLoad


def _spec(latency_ratio: float = 1.0, bandwidth_ratio: float = 1.0) -> TierSpec:
    from tieremu.numa.syscalls import Policy

    return TierSpec("bench", "numa", (0,), Policy.BIND, None, True,
                    TimingTarget(latency_ratio=latency_ratio, bandwidth_ratio=bandwidth_ratio))


def bench_emulation(cal: Calibration, cpu: int, *, repeats: int = 5, kernels_: tuple[str, ...] = ("read", "copy"),
                    latency_ratios: tuple[float, ...] = LATENCY_RATIOS,
                    bandwidth_ratios: tuple[float, ...] = BANDWIDTH_RATIOS) -> EmulationBench:
    meter = LoadMeter()
    points = []
    for r in latency_ratios:
        model = timing_model(_spec(latency_ratio=r), "emulated", cal.node, cal)
        a = tier_latency(model, cal, cpu, repeats=repeats)
        points.append(EmulationPoint("latency_ns", r, a.requested, a.achieved, a.excluded.ns))
    for kernel in kernels_:
        for r in bandwidth_ratios:
            model = timing_model(_spec(bandwidth_ratio=r), "emulated", cal.node, cal)
            a = tier_bandwidth(model, cal, kernel, cpu, repeats=repeats)
            points.append(EmulationPoint(f"{kernel}_gb_per_s", r, a.requested, a.achieved))
    overhead = {k: pacing_overhead(k, cpu, cal.node) for k in kernels_}
    return EmulationBench(cal, points, overhead, meter.stop())
