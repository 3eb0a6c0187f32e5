"""The machine's NUMA topology as the kernel publishes it in sysfs and procfs.

Everything optional (HMAT, memory tiers, huge pages, knobs) is None or empty when the kernel does not
publish it; only the files every NUMA kernel has are required, and a malformed one is an error that
names the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tieremu.errors import InvalidNodeError, TopologyError
from tieremu.numa.sysfs import SysfsReader, format_list, parse_bool, parse_list

NODE_DIR = "sys/devices/system/node"
TIERING_DIR = "sys/devices/virtual/memory_tiering"
WEIGHTS_DIR = "sys/kernel/mm/mempolicy/weighted_interleave"


@dataclass(frozen=True)
class HmatAccess:
    """One HMAT access class of a memory node (access0: any initiator, access1: CPU initiators)."""

    initiators: tuple[int, ...]
    read_latency_ns: int | None
    write_latency_ns: int | None
    read_bandwidth_mbps: int | None
    write_bandwidth_mbps: int | None


@dataclass(frozen=True)
class HugePages:
    size_kib: int
    total: int
    free: int
    surplus: int


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]
    has_memory: bool
    mem_total_bytes: int | None
    mem_free_bytes: int | None
    distances: dict[int, int]
    access: dict[int, HmatAccess] = field(default_factory=dict)
    memory_tier: int | None = None
    hugepages: tuple[HugePages, ...] = ()

    @property
    def cpuless(self) -> bool:
        return not self.cpus


@dataclass(frozen=True)
class Knobs:
    """System-wide NUMA knobs; None where the kernel does not have the file."""

    numa_balancing: int | None
    demotion_enabled: bool | None
    thp_enabled: str | None
    weighted_interleave: dict[int, int] | None


@dataclass(frozen=True)
class Topology:
    root: str
    possible: tuple[int, ...]
    online: tuple[int, ...]
    nodes: dict[int, Node]
    memory_tiers: dict[int, tuple[int, ...]]
    knobs: Knobs
    system_mem_total_bytes: int | None
    system_mem_available_bytes: int | None = None

    @property
    def memory_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes.values() if n.has_memory)

    @property
    def cpu_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes.values() if n.cpus)

    @property
    def cpuless_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes.values() if n.cpuless and n.has_memory)

    def node(self, node_id: int) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise InvalidNodeError(
                f"node {node_id} does not exist on this machine; nodes with memory: "
                f"{format_list(self.memory_nodes) or 'none'}",
                call="topology",
                nodes=(node_id,),
            ) from None

    def require_memory_nodes(self, node_ids: tuple[int, ...] | list[int], what: str) -> None:
        """Raise InvalidNodeError naming the valid nodes if any of node_ids cannot hold memory."""
        bad = [n for n in node_ids if n not in self.memory_nodes]
        if bad:
            valid = "the only valid node" if len(self.memory_nodes) == 1 else "valid nodes"
            subject = f"node {bad[0]} does not exist or has" if len(bad) == 1 else \
                f"nodes {format_list(bad)} do not exist or have"
            raise InvalidNodeError(
                f"{what}: {subject} no memory on this machine; {valid}: {format_list(self.memory_nodes) or 'none'}",
                call=what,
                nodes=tuple(bad),
            )

    def distance(self, a: int, b: int) -> int:
        self.node(b)  # an unknown b gets the same clear error as an unknown a
        return self.node(a).distances[b]

    def nearest_memory_node(self, origin: int) -> int:
        """The memory node closest to origin by SLIT distance (ties: lowest id)."""
        row = self.node(origin).distances
        return min(self.memory_nodes, key=lambda n: (row.get(n, 1 << 30), n))

    @property
    def node_memory_underreported(self) -> bool:
        """Per-node MemTotal sums to under 90% of the system's (deferred struct-page init on VMs)."""
        totals = [n.mem_total_bytes for n in self.nodes.values()]
        if self.system_mem_total_bytes is None or any(t is None for t in totals):
            return False
        return sum(t for t in totals if t is not None) < 0.9 * self.system_mem_total_bytes

    def free_bytes(self, node_ids: tuple[int, ...] | list[int]) -> int | None:
        """Free memory over node_ids, or None when the kernel does not say.

        With one memory node the system's MemAvailable is the truer figure: per-node meminfo
        under-reports on VMs with deferred memory init (DESIGN.md).
        """
        if (len(self.memory_nodes) == 1 and set(node_ids) == set(self.memory_nodes)
                and self.system_mem_available_bytes is not None):
            return self.system_mem_available_bytes
        free = [self.node(n).mem_free_bytes for n in set(node_ids)]
        return None if any(f is None for f in free) else sum(f for f in free if f is not None)


def discover(root: str | os.PathLike[str] | None = None) -> Topology:
    """Read the topology under root (default: $TIEREMU_SYSFS_ROOT or /)."""
    fs = SysfsReader(root)
    online = fs.required(f"{NODE_DIR}/online", parse_list)
    if not online:
        raise TopologyError(f"{fs.path(f'{NODE_DIR}/online')}: no NUMA node is online; a machine has at least node 0")
    possible = fs.optional(f"{NODE_DIR}/possible", parse_list) or online
    has_memory = fs.optional(f"{NODE_DIR}/has_memory", parse_list)
    tiers = _memory_tiers(fs)
    tier_of = {node: tier for tier, nodes in tiers.items() for node in nodes}
    nodes = {n: _node(fs, n, online, has_memory, tier_of.get(n)) for n in online}
    return Topology(
        root=str(fs.root),
        possible=possible,
        online=online,
        nodes=nodes,
        memory_tiers=tiers,
        knobs=_knobs(fs),
        system_mem_total_bytes=(meminfo := fs.optional("proc/meminfo", _meminfo) or {}).get("MemTotal"),
        system_mem_available_bytes=meminfo.get("MemAvailable"),
    )


def _node(
    fs: SysfsReader, n: int, online: tuple[int, ...], has_memory: tuple[int, ...] | None, tier: int | None
) -> Node:
    base = f"{NODE_DIR}/node{n}"
    meminfo = fs.optional(f"{base}/meminfo", _meminfo) or {}
    total = meminfo.get("MemTotal")
    return Node(
        id=n,
        cpus=fs.required(f"{base}/cpulist", parse_list),
        has_memory=(n in has_memory) if has_memory is not None else bool(total),
        mem_total_bytes=total,
        mem_free_bytes=meminfo.get("MemFree"),
        distances=fs.required(f"{base}/distance", lambda t: _distances(t, online)),
        access={a: acc for a in (0, 1) if (acc := _hmat(fs, f"{base}/access{a}")) is not None},
        memory_tier=tier,
        hugepages=_hugepages(fs, f"{base}/hugepages"),
    )


def _meminfo(text: str) -> dict[str, int]:
    """Parse meminfo lines ("Node 0 MemTotal:  123 kB" or "MemTotal:  123 kB") into bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(?:Node \d+ )?(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m is None:
            if line.strip():
                raise ValueError(f"unexpected line {line.strip()!r}")
            continue
        scale = 1024 if line.rstrip().endswith("kB") else 1
        out[m.group(1)] = int(m.group(2)) * scale
    return out


def _distances(text: str, online: tuple[int, ...]) -> dict[int, int]:
    values = [int(v) for v in text.split()]
    if len(values) != len(online):
        raise ValueError(f"{len(values)} distances for {len(online)} online nodes")
    # SLIT distances are 10 (local) to 254 (255 means unreachable); a negative or zero one is a broken table.
    if any(not 1 <= v <= 255 for v in values):
        raise ValueError(f"distances {values}: each must be 1..255 (10 is local)")
    return dict(zip(online, values, strict=True))


def _hmat(fs: SysfsReader, base: str) -> HmatAccess | None:
    init = f"{base}/initiators"
    if not fs.exists(init):
        return None

    def num(name: str) -> int | None:
        return fs.optional(f"{init}/{name}", lambda t: int(t.strip()))

    return HmatAccess(
        initiators=tuple(sorted(int(e[4:]) for e in fs.listdir(init) if re.fullmatch(r"node\d+", e))),
        read_latency_ns=num("read_latency"),
        write_latency_ns=num("write_latency"),
        read_bandwidth_mbps=num("read_bandwidth"),
        write_bandwidth_mbps=num("write_bandwidth"),
    )


def _hugepages(fs: SysfsReader, base: str) -> tuple[HugePages, ...]:
    pools = []
    for entry in fs.listdir(base):
        m = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if m is None:
            continue

        def count(name: str, _entry: str = entry) -> int:
            return fs.optional(f"{base}/{_entry}/{name}", lambda t: int(t.strip())) or 0

        pools.append(HugePages(int(m.group(1)), count("nr_hugepages"), count("free_hugepages"),
                               count("surplus_hugepages")))
    return tuple(sorted(pools, key=lambda p: p.size_kib))


def _memory_tiers(fs: SysfsReader) -> dict[int, tuple[int, ...]]:
    tiers = {}
    for entry in fs.listdir(TIERING_DIR):
        m = re.fullmatch(r"memory_tier(\d+)", entry)
        if m is not None:
            tiers[int(m.group(1))] = fs.required(f"{TIERING_DIR}/{entry}/nodelist", parse_list)
    return dict(sorted(tiers.items()))


def _knobs(fs: SysfsReader) -> Knobs:
    weights = {
        int(e[4:]): w
        for e in fs.listdir(WEIGHTS_DIR)
        if re.fullmatch(r"node\d+", e) and (w := fs.optional(f"{WEIGHTS_DIR}/{e}", lambda t: int(t))) is not None
    }
    return Knobs(
        numa_balancing=fs.optional("proc/sys/kernel/numa_balancing", lambda t: int(t.strip())),
        demotion_enabled=fs.optional("sys/kernel/mm/numa/demotion_enabled", parse_bool),
        thp_enabled=fs.optional("sys/kernel/mm/transparent_hugepage/enabled", _bracketed),
        weighted_interleave=weights or None,
    )


def _bracketed(text: str) -> str:
    m = re.search(r"\[(\w+)\]", text)
    if m is None:
        raise ValueError("no [selected] value")
    return m.group(1)


def topology_summary(topo: Topology) -> dict[str, Any]:
    """The topology as plain data: the manifest's `topology` and `tieremu topo --json` (here, not in the runner,
    so that `topo --json` does not pay the runner's imports: numpy alone took it to 0.48 s of a 0.5 s budget)."""
    return {
        "nodes": {
            n.id: {
                "cpus": list(n.cpus), "cpuless": n.cpuless, "has_memory": n.has_memory,
                "mem_total_bytes": n.mem_total_bytes, "distances": n.distances, "memory_tier": n.memory_tier,
                "hmat": {f"access{a}": asdict(acc) for a, acc in n.access.items()},
            }
            for n in topo.nodes.values()
        },
        "memory_tiers": {t: list(nodes) for t, nodes in topo.memory_tiers.items()},
        "system_mem_total_bytes": topo.system_mem_total_bytes,
    }
