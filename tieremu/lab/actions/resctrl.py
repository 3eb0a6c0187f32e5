"""Memory bandwidth allocation (Intel RDT MBA) for a group of CPUs, through resctrl.

MBA caps the memory bandwidth that the CPUs of a resctrl group may draw (a percentage per MBA domain,
one domain per socket), which emulates a narrower link to memory. The group is made by the profile and
removed on restore; removing it hands its CPUs back to the default group. resctrl must already be
mounted: mounting it changes the machine for everyone, so tieremu only says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.errors import LabError
from tieremu.lab import paths, values
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.actions.cpus import cpu_list_problem, node_dir, online_cpus
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import MakeDir, Step, Write
from tieremu.numa.sysfs import format_list, parse_list

MB_INFO = f"{paths.RESCTRL_DIR}/info/MB"


@dataclass(frozen=True, kw_only=True)
class ResctrlMba(Action):
    kind: ClassVar[str] = "resctrl_mba"
    params: ClassVar[tuple[str, ...]] = ("group", "node", "cpus", "percent", "domains")
    group: str
    node: int | None
    cpus: tuple[int, ...] | None
    percent: int
    domains: tuple[int, ...] | None
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> ResctrlMba:
        group = sec.get("group", str, check=paths.valid_group_name)
        node = sec.get("node", int, None, check=lambda n: None if n >= 0 else "must be 0 or more")
        cpus = sec.get("cpus", (str, int), None, check=cpu_list_problem)
        if (node is None) == (cpus is None):
            raise sec.error("node", "give exactly one of node (its CPUs join the group) or cpus (a CPU list)")
        percent = sec.get("percent", int, check=lambda p: None if 1 <= p <= 100 else "must be 1..100")
        domains = sec.ints("domains", None)
        return cls(group=group, node=node, cpus=None if cpus is None else parse_list(str(cpus)), percent=percent,
                   domains=domains, required=required)

    def describe(self) -> str:
        who = f"node {self.node}'s CPUs" if self.node is not None else f"CPUs {format_list(self.cpus or ())}"
        where = "every domain" if self.domains is None else f"domains {format_list(self.domains)}"
        return f"MBA {self.percent}% for {who} (group {self.group}, {where})"

    @property
    def group_dir(self) -> str:
        return f"{paths.RESCTRL_DIR}/{self.group}"

    def unsupported(self, fs: KernelFS) -> str | None:
        if not fs.exists(f"{paths.RESCTRL_DIR}/schemata"):
            return ("resctrl is not mounted at /sys/fs/resctrl (mount -t resctrl resctrl /sys/fs/resctrl; "
                    "tieremu does not mount it)")
        if not fs.is_dir(MB_INFO):
            return "resctrl has no MB resource (no memory bandwidth allocation on this CPU)"
        if self.node is not None and not fs.is_dir(node_dir(self.node)):
            return f"there is no node {self.node}"
        return None

    def _cpus(self, fs: KernelFS) -> tuple[int, ...]:
        return self.cpus if self.cpus is not None else online_cpus(fs, self.node if self.node is not None else -1)

    def _wanted(self, fs: KernelFS) -> dict[int, str]:
        known = values.schemata_line(fs.read(f"{paths.RESCTRL_DIR}/schemata") or "", "MB") or {}
        domains = self.domains if self.domains is not None else tuple(sorted(known))
        missing = [d for d in domains if d not in known]
        if missing:
            raise LabError(f"{self.describe()}: no MBA domain {missing[0]} (domains: {format_list(list(known))})")
        return {d: str(self.percent) for d in domains}

    def _check_percent(self, fs: KernelFS) -> None:
        gran = int(fs.value(f"{MB_INFO}/bandwidth_gran") or 1)
        low = int(fs.value(f"{MB_INFO}/min_bandwidth") or 0)
        if self.percent < low or self.percent % gran:
            valid = ", ".join(str(p) for p in range(max(low, gran), 101, gran))
            raise LabError(f"{self.describe()}: this CPU takes MBA percentages {valid}, not {self.percent} "
                           "(the kernel would round it)")

    def read(self, fs: KernelFS) -> list[Reading]:
        wanted = self._wanted(fs)
        exists = fs.is_dir(self.group_dir)
        cpus_now = values.parse(values.PLAIN, fs.read(f"{self.group_dir}/cpus_list")) if exists else None
        mb = values.schemata_line(fs.read(f"{self.group_dir}/schemata") or "", "MB") if exists else None
        return [
            Reading(f"{self.group_dir}/cpus_list", format_list(self._cpus(fs)),
                    None if cpus_now is None else format_list(parse_list(cpus_now))),
            Reading(f"{self.group_dir}/schemata MB", values.format_domains(wanted),
                    None if mb is None else values.format_domains({d: mb.get(d, "?") for d in wanted})),
        ]

    def plan(self, fs: KernelFS) -> list[Step]:
        if fs.is_dir(self.group_dir):
            # Already as wanted (this profile is active, or someone set it up the same way): nothing to do,
            # and nothing to remove on restore. Otherwise it is not ours to change.
            if all(r.ok for r in self.read(fs)):
                return []
            raise LabError(f"{self.describe()}: resctrl group {self.group_dir} already exists with other "
                           "settings; a profile only changes a group it creates (remove it, or name another)")
        self._check_percent(fs)
        cpus = self._cpus(fs)
        if not cpus:
            raise LabError(f"{self.describe()}: no online CPUs to put in the group")
        return [
            MakeDir(self.group_dir),
            Write(f"{self.group_dir}/cpus_list", "", format_list(cpus), in_new_dir=True),
            Write(f"{self.group_dir}/schemata", "", "MB:" + values.format_domains(self._wanted(fs)),
                  form=values.SCHEMATA_MB, in_new_dir=True),
        ]
