"""Timing models of emulated and shaped tiers, resolved against the host's calibration.

A tier's config gives targets (absolute, or as ratios to the local node); the calibration says how fast the
memory that really holds the tier is. The model is the difference: extra nanoseconds per dependent access and
a bandwidth cap. A tier can be made slower than its host memory, never faster, and a model that asks for
that is refused with what this machine can do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tieremu.errors import ResolutionError
from tieremu.tiers.config import TierSpec, TimingTarget


@dataclass(frozen=True)
class Calibration:
    """How fast this machine's memory is, measured once per machine and cached (tieremu calibrate)."""

    machine: str  # the cache key: host, CPU model, kernel
    created_utc: str
    node: int  # the node measured (the emulation host)
    latency_ns: float  # idle load-to-use latency, 1 GiB chase with huge pages
    bandwidth_gbps: dict[str, float]  # read / write / copy on one thread (STREAM byte counting)
    latency_by_node: dict[int, float]  # every memory node, for shaping real nodes
    read_gbps_by_node: dict[int, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class LinkModel:
    """An emulated GPU tier's host link (PCIe): a block crossing between host memory and the tier costs
    `latency_ns` per transfer plus its bytes at `gbps`. Host memory stands in for the HBM itself, so nothing of the
    link happens for real: the whole crossing time is injected."""

    tier: str
    gbps: float
    latency_ns: float

    def crossing_ns(self, nbytes: int, transfers: int = 1) -> float:
        return transfers * self.latency_ns + nbytes / self.gbps  # bytes / (GB/s) is ns

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TimingModel:
    """Absolute targets for one tier and what must be injected to reach them from its host memory."""

    tier: str
    mode: str  # "emulated" (node missing) or "shaped" (real node slowed to its targets)
    host_node: int
    host_latency_ns: float
    host_bandwidth_gbps: dict[str, float]
    target_latency_ns: float
    target_bandwidth_gbps: dict[str, float]
    access_overhead_ns: float = 0.0
    link: LinkModel | None = None  # an emulated cuda tier's host link (None: blocks reach it at memory speed)

    @property
    def extra_latency_ns(self) -> float:
        """What each dependent access must wait beyond the host memory's own latency."""
        return self.target_latency_ns - self.host_latency_ns + self.access_overhead_ns

    def bandwidth_ratio(self, kernel: str) -> float:
        return self.target_bandwidth_gbps[kernel] / self.host_bandwidth_gbps[kernel]

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"extra_latency_ns": self.extra_latency_ns}


def timing_model(spec: TierSpec, mode: str, host_node: int, calibration: Calibration | None) -> TimingModel:
    """Resolve a tier's targets against the calibration of the node that holds its memory."""
    target = spec.emulate or TimingTarget(latency_ratio=1.0, bandwidth_ratio=1.0)
    if calibration is None:
        raise ResolutionError(
            f"tier {spec.name!r}: its timing model needs this machine's calibration (local latency and bandwidth), "
            "and none is available; run `tieremu calibrate` first"
        )
    host_lat = calibration.latency_by_node.get(host_node, calibration.latency_ns)
    host_bw = dict(calibration.bandwidth_gbps)
    if host_node in calibration.read_gbps_by_node and host_node != calibration.node:
        scale = calibration.read_gbps_by_node[host_node] / calibration.bandwidth_gbps["read"]
        host_bw = {k: v * scale for k, v in host_bw.items()}

    local_lat = calibration.latency_ns
    lat = target.latency_ns if target.latency_ns is not None else (target.latency_ratio or 1.0) * local_lat
    if lat < host_lat * 0.999:
        raise ResolutionError(
            f"tier {spec.name!r}: target latency {lat:.0f} ns is below what its memory (node {host_node}) gives, "
            f"{host_lat:.0f} ns; emulation only slows memory down: ask for {host_lat / local_lat:.2f}x local or more "
            f"(latency_ns >= {host_lat:.0f})"
        )
    bw = {}
    for kernel, local in calibration.bandwidth_gbps.items():
        want = _bandwidth_target(target, kernel, local)
        if want > host_bw[kernel] * 1.001:
            raise ResolutionError(
                f"tier {spec.name!r}: target {kernel} bandwidth {want:.1f} GB/s is above what its memory (node "
                f"{host_node}) gives, {host_bw[kernel]:.1f} GB/s on one thread; ask for bandwidth_ratio <= "
                f"{host_bw[kernel] / local:.2f} (bandwidth_gbps <= {host_bw[kernel]:.1f})"
            )
        bw[kernel] = want
    link = None
    if target.link is not None and spec.is_cuda and mode == "emulated":
        link = LinkModel(spec.name, target.link.gbps, target.link.latency_us * 1e3)
    return TimingModel(spec.name, mode, host_node, host_lat, host_bw, lat, bw, target.access_overhead_ns, link)


def _bandwidth_target(target: TimingTarget, kernel: str, local: float) -> float:
    """A stream's target: reads follow the bandwidth target, writes the write target (else the same), and a
    copy, which both reads and writes the tier, the slower of the two."""
    def read() -> float:
        if target.bandwidth_gbps is not None:
            return target.bandwidth_gbps
        return (target.bandwidth_ratio or 1.0) * local

    def write() -> float:
        if target.write_bandwidth_gbps is not None:
            return target.write_bandwidth_gbps
        if target.write_bandwidth_ratio is not None:
            return target.write_bandwidth_ratio * local
        return read()

    return {"read": read, "write": write}.get(kernel, lambda: min(read(), write()))()
