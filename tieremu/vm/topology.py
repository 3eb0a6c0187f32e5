"""A guest layout as written in `configs/vm/*.yaml`: NUMA nodes, their memory and vCPUs, SLIT and HMAT.

The file is validated completely before QEMU sees it, so a typo is reported with its key path instead of
as a QEMU error or, worse, a guest that boots with a different shape than the one the tests expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tieremu.configfile import Section, load_yaml

MAX_NODES = 8
MAX_VCPUS = 8
# Memory hotplug works in 128 MiB sections on x86_64: a node smaller than, or not aligned to, a section
# does not come up as a node of its own.
SECTION_MIB = 128
# The guest shares the host with its tests (and CI with everything else): keep QEMU well under the machine.
MAX_TOTAL_MIB = 3072
# The kernel, the busybox init and the command's Python all start on the nodes that have CPUs.
MIN_CPU_NODE_MIB = 512
LOCAL_DISTANCE = 10
MAX_DISTANCE = 254  # 255 means "unreachable" in SLIT
MAX_LATENCY_NS = 65535  # what QEMU's HMAT builder can encode with a 1 ns base unit
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class VmNode:
    id: int
    label: str
    memory_mib: int
    cpus: tuple[int, ...]  # vCPU indices, numbered across nodes in node order
    initiator: int  # the CPU node that HMAT describes this node's memory from (itself when it has CPUs)

    @property
    def cpuless(self) -> bool:
        return not self.cpus


@dataclass(frozen=True)
class HmatEntry:
    """Access latency and bandwidth of memory node `target` as seen from CPU node `initiator`."""

    initiator: int
    target: int
    latency_ns: int
    bandwidth_mb_s: int


@dataclass(frozen=True)
class VmTopology:
    name: str
    description: str
    nodes: tuple[VmNode, ...]
    distances: tuple[tuple[int, ...], ...]  # SLIT row per node, indexed by node id
    hmat: tuple[HmatEntry, ...]
    source: Path | None = None

    @property
    def vcpus(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    @property
    def memory_mib(self) -> int:
        return sum(n.memory_mib for n in self.nodes)

    @property
    def cpu_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes if n.cpus)

    @property
    def cpuless_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes if n.cpuless)

    def distance(self, src: int, dst: int) -> int:
        return self.distances[src][dst]

    def hmat_entry(self, initiator: int, target: int) -> HmatEntry:
        for e in self.hmat:
            if e.initiator == initiator and e.target == target:
                return e
        raise KeyError(f"no HMAT entry for initiator {initiator}, target {target}")


def load_topology(path: str | Path) -> VmTopology:
    return parse_topology(load_yaml(path))


def parse_topology(doc: Section) -> VmTopology:
    name = doc.get("name", str, check=_name)
    description = doc.get("description", str, "")
    node_docs = doc.sections("nodes")
    if not 1 <= len(node_docs) <= MAX_NODES:
        raise doc.error("nodes", f"{len(node_docs)} nodes; valid: 1 to {MAX_NODES}")
    raw = [_raw_node(s, i) for i, s in enumerate(node_docs)]
    n = len(raw)

    vcpus = sum(r.vcpus for r in raw)
    if not 1 <= vcpus <= MAX_VCPUS:
        raise doc.error("nodes", f"{vcpus} vCPUs in total; valid: 1 to {MAX_VCPUS} (set vcpus on at least one node)")
    total = sum(r.memory_mib for r in raw)
    if total > MAX_TOTAL_MIB:
        raise doc.error("nodes", f"{total} MiB of guest memory in total; valid: at most {MAX_TOTAL_MIB} MiB")
    cpu_mib = sum(r.memory_mib for r in raw if r.vcpus)
    if cpu_mib < MIN_CPU_NODE_MIB:
        raise doc.error("nodes", f"the nodes with vCPUs have {cpu_mib} MiB together; valid: at least "
                                 f"{MIN_CPU_NODE_MIB} MiB (the kernel and the command start there)")

    distances = _distances(doc, n)
    cpu_ids = [r.id for r in raw if r.vcpus]
    nodes = []
    first_cpu = 0
    for r in raw:
        initiator = _initiator(r, cpu_ids, distances)
        cpus = tuple(range(first_cpu, first_cpu + r.vcpus))
        first_cpu += r.vcpus
        nodes.append(VmNode(r.id, r.label, r.memory_mib, cpus, initiator))

    hmat = _hmat(doc, n, tuple(cpu_ids))
    doc.done()
    return VmTopology(name, description, tuple(nodes), distances, hmat, doc.source)


@dataclass(frozen=True)
class _RawNode:
    section: Section
    id: int
    label: str
    memory_mib: int
    vcpus: int
    initiator: int | None


def _raw_node(s: Section, index: int) -> _RawNode:
    node_id = s.get("id", int, check=lambda v: None if v == index else
                    f"node ids must be 0, 1, 2, ... in list order; valid here: {index}")
    label = s.get("label", str, "")
    memory = s.get("memory_mib", int, check=_memory)
    vcpus = s.get("vcpus", int, 0, check=lambda v: None if 0 <= v <= MAX_VCPUS else f"valid: 0 to {MAX_VCPUS}")
    initiator = s.get("initiator", int, None)
    s.done()
    return _RawNode(s, node_id, label, memory, vcpus, initiator)


def _initiator(r: _RawNode, cpu_ids: list[int], distances: tuple[tuple[int, ...], ...]) -> int:
    if r.vcpus:
        # QEMU requires a node with CPUs to be its own initiator.
        if r.initiator is not None and r.initiator != r.id:
            raise r.section.error("initiator", f"{r.initiator}: a node with vCPUs is its own initiator; "
                                               f"valid: {r.id} (or leave it out)")
        return r.id
    if r.initiator is None:
        return min(cpu_ids, key=lambda c: (distances[r.id][c], c))
    if r.initiator not in cpu_ids:
        raise r.section.error("initiator", f"{r.initiator}: not a node with vCPUs; valid: "
                                           f"{', '.join(map(str, cpu_ids))}")
    return r.initiator


def _distances(doc: Section, n: int) -> tuple[tuple[int, ...], ...]:
    rows = doc.get("distances", list)
    if len(rows) != n:
        raise doc.error("distances", f"{len(rows)} rows for {n} nodes; valid: one row per node, in node order")
    out = []
    for i, row in enumerate(rows):
        key = f"distances[{i}]"
        if not isinstance(row, list) or len(row) != n:
            raise doc.error(key, f"{row!r}: expected a list of {n} integers (one per node)")
        for j, v in enumerate(row):
            if not isinstance(v, int) or isinstance(v, bool):
                raise doc.error(f"{key}[{j}]", f"{v!r}: expected an integer")
            if i == j and v != LOCAL_DISTANCE:
                raise doc.error(f"{key}[{j}]", f"{v}: a node's distance to itself must be {LOCAL_DISTANCE}")
            if i != j and not LOCAL_DISTANCE < v <= MAX_DISTANCE:
                raise doc.error(f"{key}[{j}]", f"{v}: valid: {LOCAL_DISTANCE + 1} to {MAX_DISTANCE}")
        out.append(tuple(row))
    return tuple(out)


def _hmat(doc: Section, n: int, cpu_ids: tuple[int, ...]) -> tuple[HmatEntry, ...]:
    entries: dict[tuple[int, int], HmatEntry] = {}
    for s in doc.sections("hmat"):
        initiator = s.get("initiator", int, check=lambda v: None if v in cpu_ids else
                          f"not a node with vCPUs; valid: {', '.join(map(str, cpu_ids))}")
        target = s.get("target", int, check=lambda v: None if 0 <= v < n else f"no such node; valid: 0 to {n - 1}")
        latency = s.get("latency_ns", int, check=lambda v: None if 0 < v <= MAX_LATENCY_NS else
                        f"valid: 1 to {MAX_LATENCY_NS}")
        bandwidth = s.get("bandwidth_mb_s", int, check=lambda v: None if v > 0 else "must be positive")
        s.done()
        if (initiator, target) in entries:
            raise s.error("target", f"{target}: a second entry for initiator {initiator}; "
                                    "give each initiator/target pair once")
        entries[(initiator, target)] = HmatEntry(initiator, target, latency, bandwidth)
    missing = [f"{i}->{t}" for i in cpu_ids for t in range(n) if (i, t) not in entries]
    if missing:
        raise doc.error("hmat", f"no entry for initiator->target {', '.join(missing)}; QEMU needs latency and "
                                "bandwidth for every pair of a node with vCPUs and a node")
    return tuple(entries[(i, t)] for i in cpu_ids for t in range(n))


def _name(value: str) -> str | None:
    return None if NAME_RE.fullmatch(value) else "valid: letters, digits, '.', '_' and '-'"


def _memory(value: int) -> str | None:
    if value < SECTION_MIB or value % SECTION_MIB:
        return f"valid: a multiple of {SECTION_MIB} MiB (128, 256, 384, 512, ...)"
    return None
