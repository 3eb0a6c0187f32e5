"""One record per run (a line of runs.jsonl): what ran, how it ended, and how busy the machine was around it.

A run is flagged `noisy` when, over its interval, the hypervisor stole more than NOISY_STEAL of the CPU time, or
other processes (not the run's own, not tieremu's) kept more than NOISY_OTHERS of the machine busy, or the 1-minute
load average per CPU was above NOISY_LOAD_PER_CPU at either end. The reasons are kept beside the flag.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tieremu.record.stats import NOISY_LOAD_PER_CPU, NOISY_STEAL, CpuTimes

NOISY_OTHERS = 0.25  # share of all CPUs busy with other processes' work
DONE, FAILED, MISSING = "done", "failed", "missing"
STATUSES = (DONE, FAILED, MISSING)


@dataclass(frozen=True)
class LoadSample:
    """The machine at one moment: load average, /proc/stat counters, and the CPU time of this process tree."""

    loadavg_1m: float
    cpus: int
    busy_ticks: int
    idle_ticks: int
    steal_ticks: int
    own_cpu_s: float  # this process and its waited-for children (the run's worker)

    @classmethod
    def now(cls, stat_path: str = "/proc/stat") -> LoadSample:
        times = CpuTimes.read(stat_path)
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(loadavg_1m=os.getloadavg()[0], cpus=os.cpu_count() or 1, busy_ticks=times.busy,
                   idle_ticks=times.idle, steal_ticks=times.steal,
                   own_cpu_s=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Noise:
    steal_fraction: float
    others_fraction: float  # share of all CPUs' time spent on work that was not this run's
    noisy: bool
    why: tuple[str, ...]


def noise(before: LoadSample, after: LoadSample) -> Noise:
    """How contended the machine was between two samples, and whether that makes the run noisy (and why)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = max(1, (after.busy_ticks - before.busy_ticks) + (after.idle_ticks - before.idle_ticks)
                + (after.steal_ticks - before.steal_ticks))
    steal = (after.steal_ticks - before.steal_ticks) / total
    own_ticks = (after.own_cpu_s - before.own_cpu_s) * hz
    others = max(0.0, (after.busy_ticks - before.busy_ticks) - own_ticks) / total
    why = []
    if steal > NOISY_STEAL:
        why.append(f"steal {steal:.0%} > {NOISY_STEAL:.0%}")
    if others > NOISY_OTHERS:
        why.append(f"other processes used {others:.0%} of the CPUs > {NOISY_OTHERS:.0%}")
    for when, sample in (("before", before), ("after", after)):
        per_cpu = sample.loadavg_1m / sample.cpus
        if per_cpu > 1 + NOISY_LOAD_PER_CPU:
            why.append(f"load average {sample.loadavg_1m:.2f} on {sample.cpus} CPUs {when}")
    return Noise(steal, others, bool(why), tuple(why))


@dataclass(frozen=True)
class RunRecord:
    """One run as runs.jsonl keeps it (the only shape of a run's status: the runner writes it, the report reads it)."""

    run_id: str
    job: str
    labels: dict[str, Any]
    status: str  # done | failed | missing (planned, never run)
    seconds: float | None
    error: str | None
    rows: int = 0
    load_before: dict[str, Any] | None = None
    load_after: dict[str, Any] | None = None
    steal_fraction: float | None = None
    others_fraction: float | None = None
    noisy: bool = False
    noisy_why: list[str] = field(default_factory=list)
    reused: bool = False  # done in an earlier attempt and kept by --resume

    @property
    def policy(self) -> str | None:
        policy = self.labels.get("policy")
        return None if policy is None else str(policy)

    def with_load(self, before: LoadSample, after: LoadSample) -> RunRecord:
        n = noise(before, after)
        return replace(self, load_before=before.to_dict(), load_after=after.to_dict(), steal_fraction=n.steal_fraction,
                       others_fraction=n.others_fraction, noisy=n.noisy, noisy_why=list(n.why))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
