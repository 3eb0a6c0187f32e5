"""Measuring and caching the host's calibration: the local speeds that emulated tiers are expressed against.

Cached per machine (host, CPU model, kernel) so that every run on the same host uses the same baseline and
the same config means the same slowdown; `tieremu calibrate --refresh` measures again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import socket
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

