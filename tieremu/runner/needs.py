"""What a run needs of the host it runs on, and what a host offers, as Ray custom resources (no Ray here).

A host declares (`tieremu ray-node`) one resource per thing a run may need: each NUMA node with memory
(`tieremu_numa_node_N`), QEMU (`tieremu_qemu`), each active lab profile (`tieremu_lab_NAME`), any name the lab
chooses (`--resource cxl` → `tieremu_cxl`), and `tieremu_host` (amount 1). A run asks for the nodes its tier map
really uses, a GPU (Ray's own `num_gpus`) for a real cuda tier, the spec's lab profile, the job's `requires:`
names, and — when its figures are timings — the whole host (`tieremu_host`), so two timed runs never share a
machine; accounting-only runs (simulate replays) share hosts freely.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tieremu.errors import ConfigError
from tieremu.numa.topology import Topology
from tieremu.tiers.resolve import ResolvedTierMap

PREFIX = "tieremu_"
HOST = f"{PREFIX}host"  # amount 1 per host: a timed run takes it whole
QEMU = f"{PREFIX}qemu"
FEATURE_AMOUNT = 1000  # features are not consumed: as many runs as CPUs may use one at once
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def node_resource(node: int) -> str:
    return f"{PREFIX}numa_node_{node}"


def lab_resource(profile: str) -> str:
    return f"{PREFIX}lab_{profile}"


def extra_resource(name: str) -> str:
    """The resource of a name a spec `requires:` or a host declares with `--resource` (checked: Ray's names)."""
    if not NAME.match(name):
        raise ConfigError(f"resource name {name!r}: use letters, digits, '.', '_' or '-'")
    return name if name.startswith(PREFIX) else f"{PREFIX}{name}"


@dataclass(frozen=True)
class RunNeeds:
    """Ray task options for one run: custom resources (name → amount) and GPUs."""

    resources: dict[str, float] = field(default_factory=dict)
    gpus: int = 0
    cpus: float = 1.0

    def met_by(self, offer: Mapping[str, float]) -> bool:
        """Whether a host offering these totals (Ray's node `Resources`) could ever run it."""
        if offer.get("CPU", 0) < self.cpus or offer.get("GPU", 0) < self.gpus:
            return False
        return all(offer.get(name, 0) >= amount for name, amount in self.resources.items())

    def missing(self, offer: Mapping[str, float]) -> list[str]:
        """What a host lacks for this run, by name (for the unschedulable error)."""
        lacks = [f"{name}={amount:g}" for name, amount in self.resources.items() if offer.get(name, 0) < amount]
        if offer.get("GPU", 0) < self.gpus:
            lacks.append(f"GPU={self.gpus}")
        if offer.get("CPU", 0) < self.cpus:
            lacks.append(f"CPU={self.cpus:g}")
        return lacks

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in sorted(self.resources.items())]
        return ", ".join([*parts, *([f"GPU={self.gpus}"] if self.gpus else []), f"CPU={self.cpus:g}"])


def run_needs(resolved: ResolvedTierMap, *, timed: bool, lab_profile: str | None,
              requires: Iterable[str] = ()) -> RunNeeds:
    """A run's needs from its tier map as resolved for the plan (the nodes of its real tiers; a GPU for a real
    cuda tier), the spec's lab profile, the job's `requires:`, and the whole host when it is timed."""
    resources: dict[str, float] = {}
    gpus = 0
    for tier in resolved.tiers:
        if tier.device is not None:  # a real device tier: Ray's GPU count says which hosts have one
            gpus = 1
        else:
            for node in tier.nodes:  # the nodes its memory really goes to, an emulated tier's host node included
                resources[node_resource(node)] = 1
    if lab_profile is not None:
        resources[lab_resource(lab_profile)] = 1
    for name in requires:
        resources[extra_resource(name)] = 1
    if timed:
        resources[HOST] = 1
    return RunNeeds(resources, gpus)


@dataclass(frozen=True)
class HostOffer:
    """What this host declares to Ray (`ray start --resources`)."""

    resources: dict[str, float]

    def ray_start(self, *, head: bool, address: str | None, num_cpus: int | None) -> list[str]:
        cmd = ["ray", "start"]
        cmd += ["--head"] if head else ["--address", address or "auto"]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        return [*cmd, "--resources", json.dumps(self.resources, sort_keys=True)]


def host_offer(topology: Topology, *, lab_profiles: Iterable[str] = (), extra: Iterable[str] = ()) -> HostOffer:
    """This host's resources: its NUMA nodes with memory, QEMU when installed, its active lab profiles, the extra
    names given, and the whole-host token."""
    resources: dict[str, float] = {HOST: 1}
    for node in topology.nodes.values():
        if node.has_memory:
            resources[node_resource(node.id)] = FEATURE_AMOUNT
    if shutil.which("qemu-system-x86_64"):
        resources[QEMU] = FEATURE_AMOUNT
    for profile in lab_profiles:
        resources[lab_resource(profile)] = FEATURE_AMOUNT
    for name in extra:
        resources[extra_resource(name)] = FEATURE_AMOUNT
    return HostOffer(resources)
