"""CPU hotplug of a whole node (Pond's CPU-less node) and the cpufreq governor per CPU.

A node's `cpulist` lists only its online CPUs, so once they are offline the node no longer says which
CPUs are its own. The node directory's `cpuN` links stay (they go only on physical hot-remove), and the
journal remembers every CPU that was offlined, so restore never depends on reading cpulist back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.lab import paths
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, Write
from tieremu.numa.sysfs import format_list, parse_list


def node_dir(node: int) -> str:
    return f"{paths.NODE_DIR}/node{node}"


def online_file(cpu: int) -> str:
    return f"{paths.CPU_DIR}/cpu{cpu}/online"


def node_cpus(fs: KernelFS, node: int) -> tuple[int, ...]:
    """Every CPU of node, online or not: its cpulist plus the cpuN links in its directory."""
    listed = parse_list(fs.read(f"{node_dir(node)}/cpulist") or "")
    linked = [int(m.group(1)) for e in fs.listdir(node_dir(node)) if (m := re.fullmatch(r"cpu(\d+)", e))]
    return tuple(sorted(set(listed) | set(linked)))


def online_cpus(fs: KernelFS, node: int) -> tuple[int, ...]:
    return parse_list(fs.read(f"{node_dir(node)}/cpulist") or "")


@dataclass(frozen=True, kw_only=True)
class NodeCpus(Action):
    kind: ClassVar[str] = "node_cpus"
    params: ClassVar[tuple[str, ...]] = ("node", "online")
    node: int
    online: bool
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> NodeCpus:
        node = sec.get("node", int, check=lambda n: None if n >= 0 else "must be 0 or more")
        return cls(node=node, online=sec.get("online", bool), required=required)

    def describe(self) -> str:
        return f"node {self.node} CPUs {'online' if self.online else 'offline'}"

    def unsupported(self, fs: KernelFS) -> str | None:
        if not fs.is_dir(node_dir(self.node)):
            nodes = [e[4:] for e in fs.listdir(paths.NODE_DIR) if re.fullmatch(r"node\d+", e)]
            return f"there is no node {self.node} (nodes: {', '.join(nodes) or 'none'})"
        cpus = node_cpus(fs, self.node)
        if not cpus:
            return f"node {self.node} has no CPUs to {'online' if self.online else 'offline'}"
        if self.online:
            return None
        fixed = [c for c in online_cpus(fs, self.node) if not fs.exists(online_file(c))]
        if fixed:
            return (f"cpu{fixed[0]} of node {self.node} cannot be offlined (it has no online file; "
                    "the boot CPU usually cannot)")
        everywhere = parse_list(fs.read(f"{paths.CPU_DIR}/online") or "")
        if everywhere and set(everywhere) <= set(cpus):
            return f"node {self.node} holds every online CPU; offlining them would leave none"
        return None

    def read(self, fs: KernelFS) -> list[Reading]:
        wanted = format_list(node_cpus(fs, self.node)) if self.online else ""
        now = format_list(online_cpus(fs, self.node)) if fs.is_dir(node_dir(self.node)) else None
        return [Reading(f"node{self.node} online CPUs", wanted or "none", None if now is None else now or "none")]

    def plan(self, fs: KernelFS) -> list[Step]:
        want = "1" if self.online else "0"
        steps: list[Step] = []
        for cpu in node_cpus(fs, self.node):
            rel = online_file(cpu)
            now = fs.value(rel)
            if now is not None and now != want:
                steps.append(Write(rel, now, want))
        return steps


@dataclass(frozen=True, kw_only=True)
class Governor(Action):
    """The cpufreq scaling governor of every online CPU (or the listed ones)."""

    kind: ClassVar[str] = "governor"
    params: ClassVar[tuple[str, ...]] = ("governor", "cpus")
    governor: str
    cpus: tuple[int, ...] | None
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Governor:
        governor = sec.get("governor", str, check=lambda g: None if re.fullmatch(r"[a-z0-9_]+", g) else
                           "governor names are lower-case words such as performance, powersave, schedutil")
        cpus = sec.get("cpus", (str, int), None, check=cpu_list_problem)
        return cls(governor=governor, cpus=None if cpus is None else parse_list(str(cpus)), required=required)

    def describe(self) -> str:
        where = "every online CPU" if self.cpus is None else f"CPUs {format_list(self.cpus)}"
        return f"governor={self.governor} on {where}"

    def _targets(self, fs: KernelFS) -> list[int]:
        cpus = self.cpus if self.cpus is not None else parse_list(fs.read(f"{paths.CPU_DIR}/online") or "")
        return [c for c in cpus if fs.exists(_governor_file(c))]

    def unsupported(self, fs: KernelFS) -> str | None:
        targets = self._targets(fs)
        if not targets:
            return "no cpufreq scaling_governor files (no cpufreq driver, e.g. in a VM)"
        for cpu in targets:
            offered = (fs.read(f"{paths.CPU_DIR}/cpu{cpu}/cpufreq/scaling_available_governors") or "").split()
            if offered and self.governor not in offered:
                return f"cpu{cpu} offers governors {', '.join(offered)}, not {self.governor}"
        return None

    def read(self, fs: KernelFS) -> list[Reading]:
        targets = self._targets(fs)
        if not targets:
            return [Reading("cpufreq scaling_governor", self.governor, None)]
        return [Reading(_governor_file(c), self.governor, fs.value(_governor_file(c))) for c in targets]

    def plan(self, fs: KernelFS) -> list[Step]:
        steps: list[Step] = []
        for cpu in self._targets(fs):
            now = fs.value(_governor_file(cpu))
            if now is not None and now != self.governor:
                steps.append(Write(_governor_file(cpu), now, self.governor))
        return steps


def _governor_file(cpu: int) -> str:
    return f"{paths.CPU_DIR}/cpu{cpu}/cpufreq/scaling_governor"


def cpu_list_problem(value: str | int) -> str | None:
    try:
        return None if parse_list(str(value)) else "names no CPU"
    except ValueError:
        return "expected a CPU list such as 0-3,8"
