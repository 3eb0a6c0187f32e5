"""A cgroup v2 group for the workload: memory limits and, optionally, the CPUs and nodes it may use.

A memory limit makes the kernel reclaim (and, with demotion on, demote) inside the experiment instead of
waiting for the whole machine to run short. A child group only gets a controller's files when its parent
lists the controller in `cgroup.subtree_control`; the action enables the missing ones on the root group
and records that, so restore disables exactly those after removing the group.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.errors import LabError
from tieremu.lab import paths, values
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.actions.cpus import cpu_list_problem
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import MakeDir, Step, Write
from tieremu.numa.sysfs import format_list, parse_list

CONTROLLERS = f"{paths.CGROUP_DIR}/cgroup.controllers"
SUBTREE = f"{paths.CGROUP_DIR}/cgroup.subtree_control"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str) -> int | None:
    """Bytes from 4294967296, "4G", "512M" or "max" (None: no limit)."""
    if isinstance(value, int):
        return value
    if value == "max":
        return None
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", value.strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"{value!r} is not a size")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _size_problem(value: int | str) -> str | None:
    try:
        size = parse_size(value)
    except ValueError:
        return "expected bytes, a size such as 512M or 4G, or max"
    return None if size is None or size > 0 else "must be positive"


@dataclass(frozen=True, kw_only=True)
class Cgroup(Action):
    kind: ClassVar[str] = "cgroup"
    params: ClassVar[tuple[str, ...]] = ("name", "memory_max", "memory_high", "cpus", "mems")
    name: str
    memory_max: str | None  # what to write: bytes rounded down to a page, or "max"; None: leave as created
    memory_high: str | None
    cpus: tuple[int, ...] | None
    mems: tuple[int, ...] | None
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Cgroup:
        name = sec.get("name", str, check=paths.valid_group_name)
        sizes = {k: sec.get(k, (int, str), None, check=_size_problem) for k in ("memory_max", "memory_high")}
        cpus = sec.get("cpus", (str, int), None, check=cpu_list_problem)
        mems = sec.get("mems", (str, int), None, check=lambda v: cpu_list_problem(v) and "expected a node list")
        if all(v is None for v in (*sizes.values(), cpus, mems)):
            raise sec.error("memory_max", "a cgroup action sets memory_max, memory_high, cpus or mems")
        page = resource.getpagesize()

        def limit(v: int | str | None) -> str | None:
            if v is None:
                return None
            size = parse_size(v)
            # The kernel keeps limits in pages and shows them rounded down to a page.
            return "max" if size is None else str(size // page * page)

        return cls(name=name, memory_max=limit(sizes["memory_max"]), memory_high=limit(sizes["memory_high"]),
                   cpus=None if cpus is None else parse_list(str(cpus)),
                   mems=None if mems is None else parse_list(str(mems)), required=required)

    def describe(self) -> str:
        return f"cgroup {self.name} " + " ".join(f"{k}={v}" for k, v in self._files().items())

    @property
    def group_dir(self) -> str:
        return f"{paths.CGROUP_DIR}/{self.name}"

    def _files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        if self.cpus is not None:
            files["cpuset.cpus"] = format_list(self.cpus)
        if self.mems is not None:
            files["cpuset.mems"] = format_list(self.mems)
        if self.memory_high is not None:
            files["memory.high"] = self.memory_high
        if self.memory_max is not None:
            files["memory.max"] = self.memory_max
        return files

    def _controllers(self) -> list[str]:
        return [c for c, need in (("cpuset", self.cpus is not None or self.mems is not None),
                                  ("memory", self.memory_max is not None or self.memory_high is not None)) if need]

    def unsupported(self, fs: KernelFS) -> str | None:
        if not fs.exists(CONTROLLERS):
            return "cgroup v2 is not mounted at /sys/fs/cgroup (a v1 or hybrid layout)"
        offered = (fs.read(CONTROLLERS) or "").split()
        missing = [c for c in self._controllers() if c not in offered]
        if missing:
            return (f"the cgroup v2 root does not offer {', '.join(missing)} (offers: {', '.join(offered) or 'none'}; "
                    "a v1 hierarchy may hold it)")
        return None

    def read(self, fs: KernelFS) -> list[Reading]:
        readings = [Reading(f"{SUBTREE} has {c}", "yes", "yes" if c in (fs.read(SUBTREE) or "").split() else "no")
                    for c in self._controllers()]
        for name, want in self._files().items():
            now = fs.value(f"{self.group_dir}/{name}")
            if now is not None and name.startswith("cpuset."):
                now = format_list(parse_list(now))
            readings.append(Reading(f"{self.group_dir}/{name}", want, now))
        return readings

    def plan(self, fs: KernelFS) -> list[Step]:
        if fs.is_dir(self.group_dir):
            if all(r.ok for r in self.read(fs)):
                return []
            raise LabError(f"{self.describe()}: {self.group_dir} already exists with other settings; a profile "
                           "only changes a cgroup it creates (remove it, or name another)")
        steps: list[Step] = []
        enabled = (fs.read(SUBTREE) or "").split()
        for controller in self._controllers():
            if controller not in enabled:
                steps.append(Write(SUBTREE, " ".join(enabled), f"+{controller}", undo=f"-{controller}",
                                   form=values.WORDS))
        steps.append(MakeDir(self.group_dir))
        steps += [Write(f"{self.group_dir}/{n}", "", v, in_new_dir=True) for n, v in self._files().items()]
        return steps
