"""The one statistics function of tieremu (`describe`), the percentile it and the reports use, summaries of
repeated measurements, and how busy the machine was while they ran.

Benchmarks report the median and the spread, never one run, and record load and steal time so that a
noisy run is flagged rather than hidden (pyperf does the same).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95
# Student's t, two-sided 95%, by degrees of freedom (1..30); beyond 30 the normal 1.96 is within 4%.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Stats:
    """What a set of figures says: n, median, mean, the 95% confidence interval of the mean, min and max.

    The interval is Student's t over the values (repetitions are the unit: one value per run); with one value
    there is no interval (NaN), which the tables print as "n=1" rather than a made-up spread.
    """

    n: int
    median: float
    mean: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def describe(values: Iterable[float]) -> Stats:
    """Stats of the finite values (NaN and infinities, figures that could not be computed, are left out)."""
    finite = sorted(v for v in values if math.isfinite(v))
    n = len(finite)
    if n == 0:
        nan = math.nan
        return Stats(0, nan, nan, nan, nan, nan, nan)
    mean = math.fsum(finite) / n
    low = high = math.nan
    if n > 1:
        t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
        half = t * statistics.stdev(finite) / math.sqrt(n)
        low, high = mean - half, mean + half
    return Stats(n, percentile(finite, 50), mean, low, high, finite[0], finite[-1])


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

@dataclass(frozen=True)
class MedianCI:
    """A distribution-free confidence interval of the median: order statistics [x_(j), x_(n+1-j)] (1-based) of the
    sorted values, whose coverage is P(j <= B <= n-j) for B ~ Binomial(n, 1/2) whatever the distribution. `reached`
    is False when even [min, max] covers less than asked (n < 6 for 95%): the interval is then min..max and
    `coverage` says how much it does cover."""

    low: float
    high: float
    coverage: float
    reached: bool

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def median_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> MedianCI:
    """The narrowest symmetric order-statistic interval of the median covering at least `confidence` (the finite
    values only; NaN bounds when there are none)."""
    xs = sorted(v for v in values if math.isfinite(v))
    n = len(xs)
    if n == 0:
        return MedianCI(math.nan, math.nan, 0.0, False)
    below = 0.0  # P(B <= j - 1) for the j being tried, j = 1, 2, ...
    best = (1, 1.0 - 2 * 0.5 ** n)  # [min, max]: misses the median only when every value is on one side
    for j in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, j - 1) * 0.5 ** n
        coverage = 1.0 - 2 * below
        if coverage < confidence:
            break
        best = (j, coverage)
    j, coverage = best
    return MedianCI(xs[j - 1], xs[n - j], coverage, coverage >= confidence)


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
        d = describe(values)
        return cls(n=d.n, median=d.median, min=d.min, max=d.max, mean=d.mean,
                   stdev=statistics.stdev(values) if len(values) > 1 else 0.0)

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
