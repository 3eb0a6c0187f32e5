"""Summaries of repeated measurements and of how busy the machine was while they ran.

Benchmarks report the median and the spread, never one run, and record load and steal time so that a
noisy run is flagged rather than hidden (pyperf does the same).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass

# A run during which more than this share of CPU time was stolen or spent by others is flagged noisy.
NOISY_STEAL = 0.05
NOISY_LOAD_PER_CPU = 0.5
# Repeats whose (max - min) / median exceeds this are flagged noisy.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    min: float
    max: float
    mean: float
    stdev: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarise")
        return cls(n=len(values), median=statistics.median(values), min=min(values), max=max(values),
                   mean=statistics.fmean(values), stdev=statistics.stdev(values) if len(values) > 1 else 0.0)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repeats."""
        return (self.max - self.min) / self.median if self.median else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self) | {"spread": self.spread, "noisy": self.noisy}


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    idle: int
    steal: int

    @classmethod
    def read(cls, path: str = "/proc/stat") -> CpuTimes:
        with open(path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return cls(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)


@dataclass(frozen=True)
class MachineLoad:
    """How contended the machine was over an interval: the context every figure needs."""

    loadavg_1m: float
    cpus: int
    steal_fraction: float
    busy_fraction: float

    @property
    def noisy(self) -> bool:
        return self.steal_fraction > NOISY_STEAL or self.loadavg_1m / self.cpus > 1 + NOISY_LOAD_PER_CPU

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"noisy": self.noisy}


class LoadMeter:
    """Start before a measurement, `stop()` after: returns the machine's load over the interval."""

    def __init__(self) -> None:
        self.start = CpuTimes.read()

    def stop(self) -> MachineLoad:
        end = CpuTimes.read()
        total = max(1, (end.busy - self.start.busy) + (end.idle - self.start.idle) + (end.steal - self.start.steal))
        return MachineLoad(
            loadavg_1m=os.getloadavg()[0],
            cpus=os.cpu_count() or 1,
            steal_fraction=(end.steal - self.start.steal) / total,
            busy_fraction=(end.busy - self.start.busy) / total,
        )
