"""Pinned host↔GPU copy bandwidth and latency per host NUMA node and block size (CUDA only).

For each memory node the host buffer is a Region bound to that node (placement verified with the kernel),
page-locked in place with cudaHostRegister so the copy engine DMAs straight from that node's memory
(a `pin_memory()` copy would land wherever the allocator put it). The issuing thread runs on the node's
CPUs, or on the nearest CPU node's when the node is CPU-less (CXL expanders). Copies are
`non_blocking=True` on a private stream and timed with CUDA events, so the figures are the GPU's view of
the transfer, not Python's.

Without CUDA the probe returns a result whose `skipped` says why; it never raises for that.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieremu.errors import PlacementError, ProbeError
from tieremu.numa.topology import Topology
from tieremu.probe.affinity import pinned
from tieremu.record.stats import LoadMeter, MachineLoad, Summary
from tieremu.tiers.region import allocate

if TYPE_CHECKING:
    import torch

KiB = 1 << 10
MiB = 1 << 20
MIN_BLOCK = 8 * KiB
MAX_BLOCK = 64 * MiB
# A timed batch of small copies should move about this much, so event resolution (~0.5 µs) and launch
# gaps do not dominate; capped so 8 KiB blocks do not queue thousands of copies.
BATCH_BYTES = 32 * MiB
MAX_BATCH = 256
DIRECTIONS = ("h2d", "d2h")


def block_sizes(quick: bool) -> tuple[int, ...]:
    """Block sizes from 8 KiB to 64 MiB: every power of two, or every fourth power plus 64 MiB when quick."""
    full = tuple(1 << p for p in range(MIN_BLOCK.bit_length() - 1, MAX_BLOCK.bit_length()))
    if not quick:
        return full
    ladder = full[::2]
    return ladder if ladder[-1] == MAX_BLOCK else (*ladder, MAX_BLOCK)


def batch_for(block: int) -> int:
    """Copies per timed batch for a block size: enough bytes per batch, at least one copy."""
    return max(1, min(MAX_BATCH, BATCH_BYTES // block))


@dataclass(frozen=True)
class GpuPoint:
    """One node, direction and block size.

    `bandwidth_gbps` is GB/s (1e9 bytes/s) over repeats of `batch` back-to-back copies; `latency_us` is the
    GPU-side duration of a single copy (CUDA events around it), over repeats.
    """

    node: int
    direction: str  # "h2d" (host to device) or "d2h"
    block_bytes: int
    batch: int
    bandwidth_gbps: Summary
    latency_us: Summary


@dataclass
class GpuNodeResult:
    node: int
    cpus: tuple[int, ...]  # where the issuing thread ran
    cpus_node: int  # the node those CPUs belong to: `node` itself unless it is CPU-less
    placed_fraction: float  # share of the host buffer's pages the kernel reports on `node`
    pinned: bool  # torch saw the registered buffer as page-locked (else copies were staged and synchronous)
    points: list[GpuPoint] = field(default_factory=list)


@dataclass
class GpuResult:
    skipped: str = ""  # why the probe did not run; "" when it ran
    device: str = ""
    device_index: int | None = None
    gpu_numa_node: int | None = None  # the host node the GPU's PCIe slot hangs off, when sysfs says
    torch_version: str = ""
    cuda_version: str | None = None
    quick: bool = True
    nodes: list[GpuNodeResult] = field(default_factory=list)
    load: MachineLoad | None = None
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    origin: str = "measured"

    @property
    def ran(self) -> bool:
        return not self.skipped

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["load"] = self.load.to_dict() if self.load is not None else None
        return out


# ---------------------------------------------------------------------------------------------- pure parts


def cuda_unavailable_reason(torch_mod: Any) -> str:
    """Why the CUDA probe cannot run with this torch, or "" when it can."""
    version = getattr(torch_mod, "__version__", "?")
    if getattr(torch_mod.version, "hip", None):
        return f"torch {version} is a ROCm build; the pinned-copy probe uses the CUDA runtime and was not ported"
    if torch_mod.version.cuda is None:
        return f"torch {version} was built without CUDA (CPU-only build), so there is no GPU to probe"
    if not torch_mod.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no driver or no device"
        return f"torch {version} has CUDA {torch_mod.version.cuda} but sees no GPU ({hint})"
    return ""


def make_point(node: int, direction: str, block_bytes: int, batch: int,
               batch_ms: Sequence[float], single_ms: Sequence[float]) -> GpuPoint:
    """Shape raw CUDA-event timings (milliseconds) into a point: GB/s per batch, µs per single copy."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not batch_ms or not single_ms:
        raise ProbeError(f"no timings for node {node} {direction} {block_bytes} bytes")
    if min(*batch_ms, *single_ms) <= 0:
        raise ProbeError(f"a CUDA event timing for node {node} {direction} {block_bytes} bytes was not positive; "
                         "the events did not bracket the copy")
    return GpuPoint(
        node=node,
        direction=direction,
        block_bytes=block_bytes,
        batch=batch,
        bandwidth_gbps=Summary.of([block_bytes * batch / (ms / 1e3) / 1e9 for ms in batch_ms]),
        latency_us=Summary.of([ms * 1e3 for ms in single_ms]),
    )


def issuing_cpus(topology: Topology, node: int, allowed: set[int] | None = None) -> tuple[int, tuple[int, ...]]:
    """The node whose CPUs issue copies for memory on `node`, and those CPUs (limited to `allowed`).

    A CPU-less node borrows the nearest CPU node by SLIT distance (ties: lowest id), which is the socket
    a real application touching that memory would run on.
    """
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    row = topology.node(node).distances
    for candidate in sorted(topology.cpu_nodes, key=lambda n: (n != node, row.get(n, 1 << 30), n)):
        cpus = tuple(c for c in topology.nodes[candidate].cpus if c in allowed)
        if cpus:
            return candidate, cpus
    raise ProbeError(f"no CPU this process may run on is near node {node} (allowed CPUs: {sorted(allowed)})")


def pci_numa_node(pci_address: str, sysfs_root: str | os.PathLike[str] = "/") -> int | None:
    """The NUMA node sysfs gives for a PCI device ("0000:3b:00.0"), or None when unknown (-1 or missing)."""
    path = Path(sysfs_root) / "sys/bus/pci/devices" / pci_address.lower() / "numa_node"
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


def to_rows(result: GpuResult) -> list[dict[str, object]]:
    """One CSV row per node, direction and block size; empty when the probe was skipped."""
    rows: list[dict[str, object]] = []
    for n in result.nodes:
        for p in n.points:
            rows.append({
                "device": result.device,
                "gpu_numa_node": result.gpu_numa_node if result.gpu_numa_node is not None else "",
                "node": n.node,
                "cpus_node": n.cpus_node,
                "direction": p.direction,
                "block_bytes": p.block_bytes,
                "GB/s": round(p.bandwidth_gbps.median, 3),
                "GB/s_spread": round(p.bandwidth_gbps.spread, 4),
                "lat_p50_us": round(p.latency_us.median, 3),
                "lat_min_us": round(p.latency_us.min, 3),
                "lat_max_us": round(p.latency_us.max, 3),
                "repeats": p.bandwidth_gbps.n,
                "placed_fraction": round(n.placed_fraction, 4),
                "pinned": n.pinned,
                "origin": result.origin,
            })
    return rows


# ---------------------------------------------------------------------------------------------- CUDA path


def run_gpu(
    topology: Topology,
    *,
    quick: bool,
    device: int = 0,
    nodes: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> GpuResult:
    """Measure pinned H2D and D2H copies from every memory node (or `nodes`) to CUDA device `device`."""
    import torch

    say = progress or (lambda _msg: None)
    reason = cuda_unavailable_reason(torch)
    result = GpuResult(torch_version=torch.__version__, cuda_version=torch.version.cuda, quick=quick)
    if reason:
        result.skipped = reason
        return result
    if not 0 <= device < torch.cuda.device_count():
        raise ProbeError(f"CUDA device {device} does not exist; valid devices: 0..{torch.cuda.device_count() - 1}")
    node_ids = tuple(nodes) if nodes is not None else topology.memory_nodes
    topology.require_memory_nodes(node_ids, "gpu probe")

    dev = torch.device("cuda", device)
    props = torch.cuda.get_device_properties(dev)
    result.device, result.device_index = props.name, device
    result.gpu_numa_node = _gpu_numa_node(props)
    sizes = block_sizes(quick)
    repeats, warmup = (5, 2) if quick else (20, 5)

    started = time.monotonic()
    meter = LoadMeter()
    device_buf = torch.empty(sizes[-1], dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(device=dev)
    for node in node_ids:
        cpus_node, cpus = issuing_cpus(topology, node)
        say(f"gpu {props.name}: host node {node} (thread on node {cpus_node}), {len(sizes)} block sizes")
        with pinned(cpus):
            node_result = _probe_node(torch, node, cpus_node, cpus, sizes, device_buf, stream, repeats, warmup)
        if node_result.placed_fraction < 1.0:
            result.notes.append(f"node {node}: only {node_result.placed_fraction:.1%} of the host buffer is "
                                "on the node; its figures mix nodes")
        if not node_result.pinned:
            result.notes.append(f"node {node}: torch does not see the registered buffer as pinned; copies were "
                                "staged through a bounce buffer")
        result.nodes.append(node_result)
    del device_buf
    result.load = meter.stop()
    result.duration_s = time.monotonic() - started
    if result.load.noisy:
        result.notes.append("the machine was busy or had CPU stolen during the run: figures are noisy")
    return result


def _probe_node(torch_mod: Any, node: int, cpus_node: int, cpus: tuple[int, ...], sizes: tuple[int, ...],
                device_buf: torch.Tensor, stream: torch.cuda.Stream, repeats: int, warmup: int) -> GpuNodeResult:
    # Allocated (and faulted in) after pinning the thread, so page tables and any kernel allocations
    # also come from the near node; the bind policy alone decides where the data pages go.
    region = allocate(sizes[-1], (node,))
    try:
        placed = region.placement().fraction_on((node,))
        out = GpuNodeResult(node=node, cpus=cpus, cpus_node=cpus_node, placed_fraction=placed, pinned=False)
        _measure_registered(torch_mod, region, out, sizes, device_buf, stream, repeats, warmup)
        return out
    finally:
        # After an exception the traceback may still hold a tensor view and close() refuses; the
        # mapping is then freed when the view is collected.
        with contextlib.suppress(PlacementError):
            region.close()


def _measure_registered(torch_mod: Any, region: Any, out: GpuNodeResult, sizes: tuple[int, ...],
                        device_buf: torch.Tensor, stream: torch.cuda.Stream, repeats: int, warmup: int) -> None:
    cudart = torch_mod.cuda.cudart()
    err = int(cudart.cudaHostRegister(region.addr, region.nbytes, 0))  # 0: cudaHostRegisterDefault
    if err != 0:
        raise ProbeError(f"cudaHostRegister of {region.nbytes} bytes on node {out.node} failed with cudaError "
                         f"{err} (cudaGetErrorName gives its name); the host buffer could not be page-locked")
    try:
        host = region.tensor(torch_mod.uint8, (region.nbytes,))
        out.pinned = bool(host.is_pinned())
        torch_mod.cuda.synchronize(device_buf.device)  # device_buf was written on the default stream
        for block in sizes:
            batch = batch_for(block)
            for direction in DIRECTIONS:
                src, dst = (host, device_buf) if direction == "h2d" else (device_buf, host)
                batch_ms, single_ms = _time_copies(torch_mod, dst[:block], src[:block], stream, batch,
                                                   repeats, warmup)
                out.points.append(make_point(out.node, direction, block, batch, batch_ms, single_ms))
    finally:
        # Every queued copy must finish before the pages are unlocked and, later, unmapped.
        stream.synchronize()
        err = int(cudart.cudaHostUnregister(region.addr))
        if err != 0:
            raise ProbeError(f"cudaHostUnregister on node {out.node} failed with cudaError {err}")


def _time_copies(torch_mod: Any, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, batch: int,
                 repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    start = torch_mod.cuda.Event(enable_timing=True)
    end = torch_mod.cuda.Event(enable_timing=True)
    batch_ms: list[float] = []
    single_ms: list[float] = []
    with torch_mod.cuda.stream(stream):
        for _ in range(warmup):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
        for _ in range(repeats):
            start.record(stream)
            for _ in range(batch):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            batch_ms.append(start.elapsed_time(end))
        for _ in range(repeats):
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            single_ms.append(start.elapsed_time(end))
    return batch_ms, single_ms


def _gpu_numa_node(props: Any) -> int | None:
    # torch ≥ 2.x exposes the PCI location; older builds do not, and then the node is simply unknown.
    domain = getattr(props, "pci_domain_id", None)
    bus = getattr(props, "pci_bus_id", None)
    dev = getattr(props, "pci_device_id", None)
    if bus is None or dev is None:
        return None
    return pci_numa_node(f"{domain or 0:04x}:{bus:02x}:{dev:02x}.0")
