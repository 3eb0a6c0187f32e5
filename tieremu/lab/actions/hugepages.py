"""Huge pages reserved on one node, for experiments that want hugetlb-backed tiers.

The kernel reserves what it can: with fragmented memory it gives fewer pages than asked and says so
only by the number it shows afterwards. `verify` reads that number back and the apply fails (and rolls
back) rather than run an experiment on a partial reservation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.actions.cpus import node_dir
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, Write


@dataclass(frozen=True, kw_only=True)
class HugePages(Action):
    kind: ClassVar[str] = "hugepages"
    params: ClassVar[tuple[str, ...]] = ("node", "size_kb", "pages")
    node: int
    size_kb: int
    pages: int
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> HugePages:
        node = sec.get("node", int, check=lambda n: None if n >= 0 else "must be 0 or more")
        size = sec.get("size_kb", int, 2048, check=lambda s: None if s > 0 and s & (s - 1) == 0 else
                       "must be a power of two such as 2048 or 1048576")
        pages = sec.get("pages", int, check=lambda n: None if n >= 0 else "must be 0 or more")
        return cls(node=node, size_kb=size, pages=pages, required=required)

    def describe(self) -> str:
        return f"{self.pages} huge pages of {self.size_kb} kB on node {self.node}"

    @property
    def pool(self) -> str:
        return f"{node_dir(self.node)}/hugepages/hugepages-{self.size_kb}kB"

    def unsupported(self, fs: KernelFS) -> str | None:
        if not fs.is_dir(node_dir(self.node)):
            return f"there is no node {self.node}"
        if not fs.exists(f"{self.pool}/nr_hugepages"):
            sizes = [e.removeprefix("hugepages-") for e in fs.listdir(f"{node_dir(self.node)}/hugepages")]
            return f"node {self.node} has no {self.size_kb} kB huge page pool (pools: {', '.join(sizes) or 'none'})"
        return None

    def read(self, fs: KernelFS) -> list[Reading]:
        rel = f"{self.pool}/nr_hugepages"
        return [Reading(rel, str(self.pages), fs.value(rel))]

    def plan(self, fs: KernelFS) -> list[Step]:
        rel = f"{self.pool}/nr_hugepages"
        now = fs.value(rel)
        return [] if now is None or now == str(self.pages) else [Write(rel, now, str(self.pages))]

    def verify_message(self, mismatches: Sequence[Reading]) -> str:
        got = mismatches[0].now
        return (f"{self.describe()}: the kernel reserved {got} of {self.pages} (too little free contiguous "
                f"memory on node {self.node}; reserve earlier, after a reboot, or on the kernel command line)")
