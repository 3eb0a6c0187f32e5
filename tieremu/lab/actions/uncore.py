"""Uncore (mesh, LLC, memory controller) frequency limits of one package, through intel_uncore_frequency.

Lowering the remote package's uncore clock raises the latency and lowers the bandwidth of memory attached
to it, which makes remote-socket DRAM behave more like a CXL device (the Memtis recipe). The driver
refuses min > max at every moment, so the order of the two writes depends on the direction of the change;
restore runs in reverse order, which keeps the same invariant on the way back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.errors import LabError
from tieremu.lab import paths
from tieremu.lab.actions.base import Action, Reading, require_value
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, Write

# A limit is kHz, or the hardware's own bound as the driver published it at load time.
NAMED_LIMITS = ("lowest", "highest")


@dataclass(frozen=True, kw_only=True)
class Uncore(Action):
    kind: ClassVar[str] = "uncore_freq"
    params: ClassVar[tuple[str, ...]] = ("package", "min_khz", "max_khz")
    package: int
    min_khz: int | str | None
    max_khz: int | str | None
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Uncore:
        package = sec.get("package", int, check=lambda n: None if n >= 0 else "must be 0 or more")
        limits = [sec.get(k, (int, str), None, check=_limit_problem) for k in ("min_khz", "max_khz")]
        if limits == [None, None]:
            raise sec.error("min_khz", "an uncore_freq action sets min_khz, max_khz or both")
        return cls(package=package, min_khz=limits[0], max_khz=limits[1], required=required)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("min", self.min_khz), ("max", self.max_khz)) if v is not None]
        return f"uncore package {self.package} " + " ".join(parts)

    def dies(self, fs: KernelFS) -> list[str]:
        pattern = rf"package_{self.package:02d}_die_\d+"
        return [f"{paths.UNCORE_DIR}/{e}" for e in fs.listdir(paths.UNCORE_DIR) if re.fullmatch(pattern, e)]

    def unsupported(self, fs: KernelFS) -> str | None:
        if not fs.is_dir(paths.UNCORE_DIR):
            return "no intel_uncore_frequency driver (Intel Xeon only; modprobe intel-uncore-frequency)"
        if not self.dies(fs):
            found = sorted({m.group(1) for e in fs.listdir(paths.UNCORE_DIR)
                            if (m := re.fullmatch(r"package_(\d+)_die_\d+", e))})
            return f"no uncore package {self.package:02d} (packages: {', '.join(found) or 'none'})"
        return None

    def _targets(self, fs: KernelFS, die: str) -> tuple[int, int]:
        """The min and max this die should have, checked against its hardware bounds."""
        lo = int(require_value(fs, f"{die}/initial_min_freq_khz", self.describe()))
        hi = int(require_value(fs, f"{die}/initial_max_freq_khz", self.describe()))
        cur = [int(require_value(fs, f"{die}/{k}_freq_khz", self.describe())) for k in ("min", "max")]

        def resolve(limit: int | str | None, current: int) -> int:
            if limit is None:
                return current
            if isinstance(limit, str):
                return lo if limit == "lowest" else hi
            if not lo <= limit <= hi:
                raise LabError(f"{self.describe()}: {limit} kHz is outside {die}'s hardware range {lo}..{hi} kHz")
            return limit

        new_min, new_max = resolve(self.min_khz, cur[0]), resolve(self.max_khz, cur[1])
        if new_min > new_max:
            raise LabError(f"{self.describe()}: on {die} the minimum {new_min} kHz would exceed the maximum "
                           f"{new_max} kHz")
        return new_min, new_max

    def read(self, fs: KernelFS) -> list[Reading]:
        readings = []
        for die in self.dies(fs):
            wanted = self._targets(fs, die)
            for name, want in zip(("min", "max"), wanted, strict=True):
                if (name == "min" and self.min_khz is None) or (name == "max" and self.max_khz is None):
                    continue
                rel = f"{die}/{name}_freq_khz"
                readings.append(Reading(rel, str(want), fs.value(rel)))
        return readings

    def plan(self, fs: KernelFS) -> list[Step]:
        steps: list[Step] = []
        for die in self.dies(fs):
            new_min, new_max = self._targets(fs, die)
            old_min, old_max = (int(require_value(fs, f"{die}/{k}_freq_khz", self.describe())) for k in ("min", "max"))
            writes = [Write(f"{die}/min_freq_khz", str(old_min), str(new_min)),
                      Write(f"{die}/max_freq_khz", str(old_max), str(new_max))]
            # Raising the minimum above the current maximum must move the maximum first.
            if new_min > old_max:
                writes.reverse()
            steps += [w for w in writes if w.old != w.new]
        return steps


def _limit_problem(value: int | str) -> str | None:
    if isinstance(value, str):
        return None if value in NAMED_LIMITS else f"expected kHz or one of: {', '.join(NAMED_LIMITS)}"
    return None if value > 0 else "must be positive"
