"""The kernel's own tiering as a baseline: promotion on NUMA hint faults (numa_balancing=2) and demotion on reclaim.

`KernelTiering` only reads. It snapshots the promotion, demotion, migration and NUMA counters of /proc/vmstat and
the two knobs, and reports what changed over a run. Setting the knobs is the lab profile `kernel-tiering`'s job
(configs/lab/kernel-tiering.yaml), which records the old values so teardown restores them; this module says
whether they are set as the baseline needs and names that profile when they are not.

Counters are pages (base pages: a huge page counts 512). They are machine-wide: whatever else runs is in them.
Kernels add counters over time (pgpromote_* came with memory tiering in 5.18, pgdemote_proactive later); a counter
the kernel lacks is absent from a snapshot, and a delta covers the counters present at both ends.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from tieremu.numa.pages import PAGE_SIZE
from tieremu.numa.sysfs import SysfsReader, format_list, parse_bool, parse_list

VMSTAT = "proc/vmstat"
NUMA_BALANCING = "proc/sys/kernel/numa_balancing"
DEMOTION_ENABLED = "sys/kernel/mm/numa/demotion_enabled"
TIERING_DIR = "sys/devices/virtual/memory_tiering"
HAS_MEMORY = "sys/devices/system/node/has_memory"
PREFIXES = ("pgpromote_", "pgdemote_", "numa_", "pgmigrate_")
# numa_balancing is a bit mask (kernel/sched/fair.c): 1 = classic NUMA balancing, 2 = memory tiering promotion.
NUMA_BALANCING_MEMORY_TIERING = 2
PROFILE = "kernel-tiering"
PROFILE_HINT = (f"the lab profile {PROFILE} sets both (configs/lab/{PROFILE}.yaml): "
                f"sudo scripts/setup-lab.sh {PROFILE}, undone by sudo scripts/teardown-lab.sh {PROFILE}")


@dataclass(frozen=True)
class TieringKnobs:
    """The two knobs the baseline needs, None where the kernel has no such file."""

    numa_balancing: int | None
    demotion_enabled: bool | None

    @property
    def promotion(self) -> bool:
        return self.numa_balancing is not None and bool(self.numa_balancing & NUMA_BALANCING_MEMORY_TIERING)

    @property
    def demotion(self) -> bool:
        return bool(self.demotion_enabled)

    @property
    def ready(self) -> bool:
        return self.promotion and self.demotion

    def problems(self) -> list[str]:
        out = []
        if not self.promotion:
            now = str(self.numa_balancing) if self.numa_balancing is not None else "absent (no NUMA balancing)"
            out.append(f"/{NUMA_BALANCING} must be 2 (memory tiering promotion), it is {now}")
        if not self.demotion:
            now = "absent (a kernel before 5.15, or without demotion)" if self.demotion_enabled is None else "false"
            out.append(f"/{DEMOTION_ENABLED} must be true, it is {now}")
        return out

    def describe(self) -> str:
        if self.ready:
            return f"numa_balancing={self.numa_balancing}, demotion_enabled=true: the kernel promotes and demotes"
        return "; ".join(self.problems()) + f"; {PROFILE_HINT}"


@dataclass(frozen=True)
class VmstatSnapshot:
    time_s: float  # monotonic
    counters: dict[str, int]
    knobs: TieringKnobs


@dataclass(frozen=True)
class TieringDelta:
    """What the kernel did between two snapshots; pages unless named otherwise."""

    seconds: float
    counters: dict[str, int]  # every tracked counter present at both ends, after minus before
    knobs: TieringKnobs  # at the end
    page_size: int = PAGE_SIZE

    def get(self, name: str) -> int | None:
        return self.counters.get(name)

    @property
    def promoted(self) -> int:
        return self.counters.get("pgpromote_success", 0)

    @property
    def promote_candidates(self) -> int:
        return self.counters.get("pgpromote_candidate", 0)

    @property
    def demoted_by_kind(self) -> dict[str, int]:
        """pgdemote_kswapd, _direct, _khugepaged, _proactive, keyed by the part after pgdemote_."""
        return {k.removeprefix("pgdemote_"): v for k, v in self.counters.items() if k.startswith("pgdemote_")}

    @property
    def demoted(self) -> int:
        return sum(self.demoted_by_kind.values())

    @property
    def hint_faults(self) -> int:
        return self.counters.get("numa_hint_faults", 0)

    @property
    def numa_pages_migrated(self) -> int:
        return self.counters.get("numa_pages_migrated", 0)

    @property
    def promoted_bytes(self) -> int:
        return self.promoted * self.page_size

    @property
    def demoted_bytes(self) -> int:
        return self.demoted * self.page_size

    def to_dict(self) -> dict[str, object]:
        return {"seconds": self.seconds, "promoted_pages": self.promoted, "demoted_pages": self.demoted,
                "demoted_by_kind": self.demoted_by_kind, "promote_candidates": self.promote_candidates,
                "hint_faults": self.hint_faults, "numa_pages_migrated": self.numa_pages_migrated,
                "promoted_bytes": self.promoted_bytes, "demoted_bytes": self.demoted_bytes,
                "knobs": {"numa_balancing": self.knobs.numa_balancing,
                          "demotion_enabled": self.knobs.demotion_enabled, "ready": self.knobs.ready},
                "counters": dict(self.counters)}


@dataclass(frozen=True)
class Applicability:
    """Whether the kernel has anywhere to demote to: two or more memory tiers."""

    applicable: bool
    memory_tiers: dict[int, tuple[int, ...]]
    memory_nodes: tuple[int, ...]
    reason: str


class KernelTiering:
    """Reads the kernel's tiering counters and knobs under a root (/ by default; a fixture tree in tests)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, page_size: int = PAGE_SIZE) -> None:
        self.fs = SysfsReader(root)
        self.page_size = page_size

    def knobs(self) -> TieringKnobs:
        return TieringKnobs(
            numa_balancing=self.fs.optional(NUMA_BALANCING, lambda t: int(t.strip())),
            demotion_enabled=self.fs.optional(DEMOTION_ENABLED, parse_bool),
        )

    def snapshot(self) -> VmstatSnapshot:
        counters = self.fs.required(VMSTAT, parse_vmstat)
        return VmstatSnapshot(time.monotonic(), counters, self.knobs())

    def delta(self, before: VmstatSnapshot, after: VmstatSnapshot) -> TieringDelta:
        common = before.counters.keys() & after.counters.keys()
        counters = {k: after.counters[k] - before.counters[k] for k in sorted(common)}
        return TieringDelta(after.time_s - before.time_s, counters, after.knobs, self.page_size)

    def applicability(self) -> Applicability:
        tiers: dict[int, tuple[int, ...]] = {}
        for entry in self.fs.listdir(TIERING_DIR):
            m = re.fullmatch(r"memory_tier(\d+)", entry)
            if m is not None:
                nodes = self.fs.optional(f"{TIERING_DIR}/{entry}/nodelist", parse_list) or ()
                if nodes:
                    tiers[int(m.group(1))] = nodes
        nodes = self.fs.optional(HAS_MEMORY, parse_list) or ()
        if len(tiers) >= 2:
            shown = ", ".join(f"tier {t}: nodes {format_list(n)}" for t, n in sorted(tiers.items()))
            return Applicability(True, tiers, nodes, f"{len(tiers)} memory tiers ({shown})")
        if len(nodes) < 2:
            reason = (f"one memory node (node {format_list(nodes) or '?'}): the kernel has no slower node to demote "
                      "to; the kernel baseline needs a multi-node machine or the QEMU guest")
        else:
            reason = (f"memory nodes {format_list(nodes)} are all in one memory tier: the kernel has no demotion "
                      "target (kernels before 6.12 ignore HMAT here; CPU-less nodes need HMAT or a driver-assigned "
                      "tier)")
        return Applicability(False, tiers, nodes, reason)


def parse_vmstat(text: str) -> dict[str, int]:
    """The tiering counters of /proc/vmstat (lines "name value"); other counters are left out."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            if line.strip():
                raise ValueError(f"unexpected line {line.strip()!r}")
            continue
        name, value = parts
        if name.startswith(PREFIXES):
            out[name] = int(value)
    return out
