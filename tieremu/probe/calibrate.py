"""Measuring and caching the host's calibration: the local speeds that emulated tiers are expressed against.

Cached per machine (host, CPU model, kernel) so that every run on the same host uses the same baseline and
the same config means the same slowdown; `tieremu calibrate --refresh` measures again.

A cached figure is taken at another moment and often another working set: on a shared machine local latency moves
by 20% within minutes. An experiment therefore anchors its ratios to the run (`anchor`): a short re-measure of local
latency and read bandwidth at run start, with the working set the probe uses for its local figure; when the cache is
off by more than ANCHOR_TOLERANCE, the run's calibration takes the fresh figures, and both are recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tieremu.errors import TopologyError
from tieremu.native.build import cache_dir
from tieremu.numa.topology import Topology
from tieremu.numbers import MAX_GBPS, MAX_NS, Range, number_problem
from tieremu.probe import bandwidth
from tieremu.probe.latency import ChaseBuffer, measure
from tieremu.safefile import atomic_write
from tieremu.tiers.timing import Calibration

LATENCY_BYTES = 1 << 30
BANDWIDTH_BYTES = 256 << 20
CAL_KERNELS = ("read", "write", "copy")
ANCHOR_TOLERANCE = 0.05  # a cached figure further than this from the run's own is replaced for the run
ANCHOR_REPEATS = 3


def machine_key() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{socket.gethostname()}|{cpu}|{platform.release()}"


def cache_path(key: str | None = None) -> Path:
    digest = hashlib.sha256((key or machine_key()).encode()).hexdigest()[:16]
    return cache_dir().parent / "calibration" / f"{digest}.json"


def load_cached() -> Calibration | None:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        data["latency_by_node"] = {int(k): v for k, v in data["latency_by_node"].items()}
        data["read_gbps_by_node"] = {int(k): v for k, v in data["read_gbps_by_node"].items()}
        cal = Calibration(**data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # written by another version of tieremu: measure again
    if not _plausible(cal):
        return None  # 0, NaN or a wild figure (a corrupt or hand-edited cache): measure again rather than trust it
    return cal if cal.machine == machine_key() else None


def _plausible(cal: Calibration) -> bool:
    """Every figure a finite positive number in range: a timing model built on 0 or NaN would be nonsense."""
    figures = [(cal.latency_ns, MAX_NS), *((v, MAX_NS) for v in cal.latency_by_node.values()),
               *((v, MAX_GBPS) for v in cal.bandwidth_gbps.values()),
               *((v, MAX_GBPS) for v in cal.read_gbps_by_node.values())]
    return all(number_problem(v, Range(0, hi, lo_closed=False)) is None for v, hi in figures)


def calibration(topology: Topology, *, refresh: bool = False) -> Calibration:
    """The cached calibration, measured first if there is none (or refresh)."""
    cached = None if refresh else load_cached()
    if cached is not None:
        return cached
    cal = measure_calibration(topology)
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(cal.to_dict(), indent=2))
    return cal


def measure_calibration(topology: Topology, *, latency_bytes: int = LATENCY_BYTES,
                        bandwidth_bytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> Calibration:
    if not topology.cpu_nodes:
        raise TopologyError("no node with CPUs: cannot calibrate")
    home = topology.cpu_nodes[0]
    cpu = topology.node(home).cpus[0]
    local = topology.nearest_memory_node(home)
    latency_by_node, read_by_node = {}, {}
    for node in topology.memory_nodes:
        buf = ChaseBuffer(latency_bytes, node, hugepages=True)
        try:
            latency_by_node[node] = measure(buf, cpu, repeats, 0.2).ns.median
        finally:
            buf.close()
        read_by_node[node] = bandwidth.measure("read", (cpu,), node, working_set=bandwidth_bytes,
                                               repeats=repeats).gb_per_s.median
    bw = {k: bandwidth.measure(k, (cpu,), local, working_set=bandwidth_bytes, repeats=repeats).gb_per_s.median
          for k in CAL_KERNELS}
    return Calibration(
        machine=machine_key(),
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        node=local,
        latency_ns=latency_by_node[local],
        bandwidth_gbps=bw,
        latency_by_node=latency_by_node,
        read_gbps_by_node=read_by_node,
    )



@dataclass(frozen=True)
class Anchor:
    """The run's own local figures beside the cached ones, and whether the run's calibration took the fresh ones."""

    node: int
    working_set: int  # bytes: the probe's local figure uses the same
    cached_latency_ns: float
    run_latency_ns: float
    cached_read_gbps: float
    run_read_gbps: float
    refreshed: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def anchor(cal: Calibration, topology: Topology, *, working_set: int,
           repeats: int = ANCHOR_REPEATS) -> tuple[Calibration, Anchor]:
    """The calibration this run's ratios resolve against: the cached one when the run's own local latency and read
    bandwidth (measured now, with `working_set`) are within ANCHOR_TOLERANCE of it, else one with the run's figures
    (every kernel's bandwidth scaled alike). The cache on disk is left as it is: it is the machine's reference."""
    home = topology.cpu_nodes[0] if topology.cpu_nodes else None
    if home is None:
        raise TopologyError("no node with CPUs: cannot anchor the emulation to this run")
    cpu = topology.node(home).cpus[0]
    buf = ChaseBuffer(working_set, cal.node, hugepages=True)
    try:
        latency = measure(buf, cpu, repeats, 0.2).ns.median
    finally:
        buf.close()
    read = bandwidth.measure("read", (cpu,), cal.node, working_set=working_set, repeats=repeats).gb_per_s.median
    return anchored(cal, working_set=working_set, latency_ns=latency, read_gbps=read)


def anchored(cal: Calibration, *, working_set: int, latency_ns: float,
             read_gbps: float) -> tuple[Calibration, Anchor]:
    """`anchor`'s decision, given the run's figures: keep the cache within ANCHOR_TOLERANCE, else take the run's."""
    latency, read = latency_ns, read_gbps
    cached_read = cal.bandwidth_gbps["read"]
    off = max(abs(latency / cal.latency_ns - 1), abs(read / cached_read - 1))
    refreshed = off > ANCHOR_TOLERANCE
    record = Anchor(cal.node, working_set, cal.latency_ns, latency, cached_read, read, refreshed)
    if not refreshed:
        return cal, record
    scale = read / cached_read
    return replace(
        cal, created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), latency_ns=latency,
        bandwidth_gbps={k: v * scale for k, v in cal.bandwidth_gbps.items()},
        latency_by_node=cal.latency_by_node | {cal.node: latency},
        read_gbps_by_node=cal.read_gbps_by_node | {cal.node: read}), record
