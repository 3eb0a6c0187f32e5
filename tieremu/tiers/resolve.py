"""Resolving a tier map against the machine: each tier becomes real, vm or emulated, and says which and why.

Nothing is ever silently emulated: a tier whose node is missing is an error unless its config allows
emulation, and then every result that touches it carries the `emulated` label.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace

from tieremu.errors import ResolutionError
from tieremu.numa.sysfs import format_list
from tieremu.numa.topology import Topology
from tieremu.tiers.config import TierMap, TierSpec
from tieremu.tiers.timing import Calibration, TimingModel, timing_model

IN_VM_ENV = "TIEREMU_IN_VM"


class Backing(enum.Enum):
    """What makes a tier, which decides what its figures mean."""

    REAL = "real"  # a real NUMA node (or CUDA device, or file directory): figures are `measured`
    VM = "vm"  # a node of tieremu's QEMU guest: semantics real, speeds are emulation artefacts
    EMULATED = "emulated"  # the node is missing; memory lives on a real node and a timing model applies
    SHAPED = "shaped"  # a real node slowed to its targets by injecting only the difference

    @property
    def origin(self) -> str:
        return "emulated" if self in (Backing.EMULATED, Backing.SHAPED) else "measured"


@dataclass(frozen=True)
class ResolvedTier:
    spec: TierSpec
    backing: Backing
    nodes: tuple[int, ...]  # the nodes its memory really goes to
    reason: str
    timing: TimingModel | None = None  # set for emulated and shaped tiers once a calibration is known
    # The torch device holding a real device tier's memory ("cuda:0"); None when the tier's memory is host memory
    # (NUMA tiers, file tiers, and a cuda tier emulated on a NUMA node).
    device: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def describe_backing(self) -> str:
        """The backing as a person reads it: `real (cuda:0)` for a device tier, else the label."""
        return f"{self.label} ({self.device})" if self.device else self.label

    @property
    def label(self) -> str:
        return self.backing.value


@dataclass(frozen=True)
class ResolvedTierMap:
    tier_map: TierMap
    tiers: tuple[ResolvedTier, ...]

    def tier(self, name: str) -> ResolvedTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ResolutionError(f"no tier {name!r} in tier map {self.tier_map.name!r}; "
                              f"tiers: {', '.join(self.tier_map.names)}")

    @property
    def any_emulated(self) -> bool:
        return any(t.backing in (Backing.EMULATED, Backing.SHAPED) for t in self.tiers)


def in_vm() -> bool:
    """Whether we run inside tieremu's multi-node QEMU guest (`tieremu vm run` sets the variable)."""
    return os.environ.get(IN_VM_ENV) == "1"


def resolve(tier_map: TierMap, topology: Topology, *, vm: bool | None = None,
            calibration: Calibration | None = None, cuda_devices: int | None = None) -> ResolvedTierMap:
    """Resolve every tier; with a calibration, emulated and shaped tiers also get their timing models
    (and a model this machine cannot honour is refused here, before anything runs).

    `cuda_devices` is how many CUDA devices this machine has; None asks torch, and only when the map has a cuda
    tier (torch is imported then, not before: maps without one resolve without it)."""
    vm = in_vm() if vm is None else vm
    cuda = None
    if any(t.is_cuda for t in tier_map.tiers):
        cuda = probe_cuda() if cuda_devices is None else CudaDevices(cuda_devices, _why_none(cuda_devices))
    tiers = tuple(_resolve_tier(t, topology, vm, cuda) for t in tier_map.tiers)
    if calibration is not None:
        tiers = tuple(_with_timing(t, calibration) for t in tiers)
    return ResolvedTierMap(tier_map, tiers)


def _with_timing(tier: ResolvedTier, calibration: Calibration) -> ResolvedTier:
    if tier.backing not in (Backing.EMULATED, Backing.SHAPED):
        return tier
    model = timing_model(tier.spec, tier.backing.value, tier.nodes[0], calibration)
    return replace(tier, timing=model)


@dataclass(frozen=True)
class CudaDevices:
    """What this machine offers cuda tiers: a device count, and when it is 0, why."""

    count: int
    why_none: str = ""

    @property
    def listed(self) -> str:
        return format_list(range(self.count)) or "none"


def probe_cuda() -> CudaDevices:
    """Ask torch how many CUDA devices there are (torch imported here: only maps with a cuda tier need it)."""
    try:
        import torch
    except ImportError:
        return CudaDevices(0, "torch is not installed")
    if not torch.cuda.is_available():
        return CudaDevices(0, "torch.cuda.is_available() is False")
    return CudaDevices(torch.cuda.device_count())


def _why_none(count: int) -> str:
    return "" if count else "torch.cuda.is_available() is False"


def _resolve_tier(spec: TierSpec, topo: Topology, vm: bool, cuda: CudaDevices | None) -> ResolvedTier:
    if spec.is_peer:  # other instances' tiers: tieremu.cluster takes them out before resolving the local ones
        raise ResolutionError(f"tier {spec.name!r} has kind: peer (other instances, over a link): only `tieremu "
                              "cluster replay` uses it; use a tier map without it here")
    if spec.is_file:
        return ResolvedTier(spec, Backing.REAL, (), f"blocks stored in {spec.path} (the device's own speed)")
    if spec.is_cuda:
        assert cuda is not None
        return _resolve_cuda_tier(spec, topo, cuda)
    missing = [n for n in spec.nodes if n not in topo.memory_nodes]
    if not missing:
        where = "in the QEMU guest" if vm else "on this machine"
        if spec.shape and spec.emulate is not None:
            return ResolvedTier(spec, Backing.SHAPED, spec.nodes, f"node {format_list(spec.nodes)} exists {where}; "
                                f"shaped to {spec.emulate.describe()}")
        backing = Backing.VM if vm else Backing.REAL
        return ResolvedTier(spec, backing, spec.nodes, f"node {format_list(spec.nodes)} exists {where}")
    valid = format_list(topo.memory_nodes) or "none"
    if not spec.allow_emulation:
        raise ResolutionError(
            f"tier {spec.name!r}: node {format_list(missing)} does not exist or has no memory on this machine "
            f"(memory nodes: {valid}); set allow_emulation: true in the tier map to emulate it on the "
            "nearest real node, or change its nodes"
        )
    host = _emulation_host(topo)
    target = spec.emulate.describe() if spec.emulate else "no timing targets"
    return ResolvedTier(
        spec, Backing.EMULATED, (host,),
        f"node {format_list(missing)} missing (memory nodes: {valid}); emulated on node {host} ({target})",
    )


def _resolve_cuda_tier(spec: TierSpec, topo: Topology, cuda: CudaDevices) -> ResolvedTier:
    """Real when the device exists; else, if allowed, a NUMA arena on the nearest real node (host speed unless
    `emulate` slows it further: the timing model refuses any target faster than that node)."""
    device = spec.device if spec.device is not None else 0
    if device < cuda.count:
        return ResolvedTier(spec, Backing.REAL, (), f"CUDA device {device} exists on this machine "
                            f"(devices: {cuda.listed})", device=f"cuda:{device}")
    missing = f"no CUDA device {device} here" if cuda.count else f"no CUDA device here ({cuda.why_none})"
    if not spec.allow_emulation:
        raise ResolutionError(
            f"tier {spec.name!r}: asks for CUDA device {device}, but there is {missing}; CUDA devices here: "
            f"{cuda.listed}. Set allow_emulation: true in the tier map to hold it in host memory on the nearest "
            "NUMA node (labelled emulated), or run on a machine with that GPU" +
            (", or change its device" if cuda.count else "")
        )
    host = _emulation_host(topo)
    speed = f"slowed to {spec.emulate.describe()}" if spec.emulate else "at host speed"
    return ResolvedTier(spec, Backing.EMULATED, (host,), f"{missing}; held in host memory on node {host} {speed}")


def _emulation_host(topo: Topology) -> int:
    """The real memory node nearest to the CPUs that will run the workload (the first CPU node)."""
    if not topo.memory_nodes:
        raise ResolutionError("this machine reports no memory node; cannot host an emulated tier")
    origin = topo.cpu_nodes[0] if topo.cpu_nodes else topo.memory_nodes[0]
    return topo.nearest_memory_node(origin)
