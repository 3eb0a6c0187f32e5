"""`tieremu probe all`: every probe in one run, saved as JSON, CSV and PNG with a manifest.

Quick mode fits in about two minutes on a 2-core VM; full mode sweeps sizes to 4 GiB, every thread count,
every batch size and the whole fio grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tieremu.numa.topology import Topology
from tieremu.probe import bandwidth, gpu, latency, loaded, migrate, storage
from tieremu.probe.report import bandwidth_json, latency_json, loaded_json, migrate_json
from tieremu.record.stats import LoadMeter
from tieremu.runner import manifest, plots
from tieremu.runner.results import ResultDir
from tieremu.tiers.resolve import in_vm


@dataclass(frozen=True)
class ProbePlan:
    """What `probe all` measures and how hard; `quick()` and `full()` are the two shipped plans."""

    quick: bool
    storage_dir: Path | None
    latency_sizes: tuple[int, ...]
    matrix_bytes: int
    bandwidth_bytes: int
    loaded_chase_bytes: int
    migrate_bytes: int
    repeats: int
    seconds: float

    @classmethod
    def quick_plan(cls, storage_dir: Path | None = None) -> ProbePlan:
        return cls(True, storage_dir, latency.QUICK_SIZES, 1 << 30, 512 << 20, 256 << 20, 64 << 20, 3, 0.1)

    @classmethod
    def full_plan(cls, storage_dir: Path | None = None) -> ProbePlan:
        return cls(False, storage_dir, latency.FULL_SIZES, 1 << 30, 2 << 30, 1 << 30, 256 << 20, 7, 0.2)


def origin() -> str:
    """Probe figures are measured; inside tieremu's QEMU guest they are emulation artefacts, labelled vm."""
    return "vm" if in_vm() else "measured"


# Announces a step (name, how many ticks it will take) and returns the tick to call after each; the CLI draws a bar.
Steps = Callable[[str, int], Callable[[], None]]


def no_progress(name: str, total: int) -> Callable[[], None]:
    return lambda: None


def run_all(topology: Topology, plan: ProbePlan, out_root: Path, step: Steps = no_progress) -> Path:
    meter = LoadMeter()
    label = origin()
    data: dict[str, Any] = {}
    with ResultDir(out_root, "probe") as out:
        data["latency"] = _latency(topology, plan, label, step)
        data["bandwidth"] = _bandwidth(topology, plan, label, step)
        data["loaded"] = _loaded(topology, plan, label, step)
        data["migrate"] = migrate_json(migrate.migrate_probe(
            topology, size=plan.migrate_bytes, quick=plan.quick, repeats=plan.repeats,
            progress=step("migrate", _migrate_steps(topology, plan))), label)
        data["storage"], storage_rows = _storage(plan, step)
        data["gpu"], gpu_rows = _gpu(topology, plan)

        out.write_json("probe.json", data)
        _write_csvs(out, data)
        if storage_rows:
            out.write_csv("storage.csv", storage_rows)
        if gpu_rows:
            out.write_csv("gpu.csv", gpu_rows)
        _write_plots(out, data, label)
        out.write_json("manifest.json", manifest.collect(
            topology, probe="all", quick=plan.quick, origin=label, load=meter.stop().to_dict()).to_dict())
    return out.final


def _latency(topology: Topology, plan: ProbePlan, label: str, step: Callable[..., Callable[[], None]]) -> dict:
    node = topology.memory_nodes[0]
    cpu = topology.node(topology.cpu_nodes[0]).cpus[0]
    tick = step("latency", 2 * len(plan.latency_sizes) + len(topology.cpu_nodes) * len(topology.memory_nodes))
    sweep = [p for huge in (False, True) for p in latency.size_sweep(
        cpu, node, plan.latency_sizes, hugepages=huge, repeats=plan.repeats, seconds=plan.seconds / 2,
        progress=tick)]
    matrix = latency.latency_matrix(topology, plan.matrix_bytes, repeats=plan.repeats, seconds=plan.seconds,
                                    progress=tick)
    return latency_json(matrix, sweep, label)


def _bandwidth(topology: Topology, plan: ProbePlan, label: str, step: Callable[..., Callable[[], None]]) -> dict:
    per_pair = sum(len(bandwidth.thread_counts(len(topology.node(i).cpus), plan.quick)) for i in topology.cpu_nodes)
    tick = step("bandwidth", per_pair * len(topology.memory_nodes) * len(bandwidth.KERNELS))
    matrix = bandwidth.bandwidth_matrix(topology, quick=plan.quick, repeats=plan.repeats,
                                        working_set=plan.bandwidth_bytes, seconds=2 * plan.seconds, progress=tick)
    return bandwidth_json(matrix, label)


def _loaded(topology: Topology, plan: ProbePlan, label: str, step: Callable[..., Callable[[], None]]) -> dict:
    init = topology.cpu_nodes[0]
    if len(topology.node(init).cpus) < 2:
        return {"origin": label, "skipped": f"node {init} has one CPU: nothing left to generate load"}
    delays = loaded.QUICK_DELAYS if plan.quick else loaded.FULL_DELAYS
    tick = step("loaded", len(loaded.MIXES) * (len(delays) - 1))
    curves = {}
    for mem in topology.memory_nodes:
        points = loaded.loaded_latency(topology, init, mem, quick=plan.quick, chase_bytes=plan.loaded_chase_bytes,
                                       repeats=plan.repeats, seconds=plan.seconds, progress=tick)
        curves[str(mem)] = loaded_json(points, init, mem, label)
    return {"origin": label, "initiator_node": init, "by_memory_node": curves}


def _migrate_steps(topology: Topology, plan: ProbePlan) -> int:
    n = len(topology.memory_nodes)
    return n * (n - 1) * 2 * len(migrate.QUICK_BATCHES if plan.quick else migrate.FULL_BATCHES)


def _storage(plan: ProbePlan, step: Callable[..., Callable[[], None]]) -> tuple[dict, list[dict]]:
    """The storage probe as JSON data plus its CSV rows."""
    if plan.storage_dir is None:
        return {"skipped": "no storage directory given (--storage-dir DIR: the NVMe tier's path)"}, []
    tick = step("storage", 1)
    result = storage.run_storage(plan.storage_dir, quick=plan.quick)
    tick()
    return asdict(result), storage.to_rows(result)


def _gpu(topology: Topology, plan: ProbePlan) -> tuple[dict, list[dict]]:
    result = gpu.run_gpu(topology, quick=plan.quick)
    return asdict(result), gpu.to_rows(result)


def _write_csvs(out: ResultDir, data: dict[str, Any]) -> None:
    lat = data["latency"]
    out.write_csv("latency_sweep.csv", [
        {"initiator_cpu": p["initiator_cpu"], "memory_node": p["memory_node"], "size_bytes": p["size_bytes"],
         "hugepages": p["hugepages"], **_flat("ns", p["ns"]), "origin": lat["origin"]} for p in lat["sweep"]])
    out.write_csv("latency_matrix.csv", [
        {"initiator_node": i, "memory_node": m, **_flat("ns", v), "origin": lat["origin"]}
        for i, row in lat["matrix"].items() for m, v in row.items()])
    bw = data["bandwidth"]
    out.write_csv("bandwidth.csv", [
        {k: v for k, v in p.items() if k != "gb_per_s"} | _flat("gb_per_s", p["gb_per_s"]) | {"origin": bw["origin"]}
        for p in bw["points"]])
    loaded_rows = [
        {"memory_node": mem, "mix": mix, "delay_ns": p["delay_ns"], "traffic_gb_per_s": p["traffic_gb_per_s"],
         **_flat("latency_ns", p["latency_ns"]), "origin": curve["origin"]}
        for mem, curve in data["loaded"].get("by_memory_node", {}).items()
        for mix, pts in curve["curves"].items() for p in pts]
    if loaded_rows:
        out.write_csv("loaded_latency.csv", loaded_rows)
    mig = data["migrate"]
    if mig["points"]:
        out.write_csv("migrate.csv", [
            {k: v for k, v in p.items() if not k.endswith("gb_per_s")}
            | _flat("migrate_gb_per_s", p["migrate_gb_per_s"]) | _flat("copy_gb_per_s", p["copy_gb_per_s"])
            | {"origin": mig["origin"]} for p in mig["points"]])


def _flat(prefix: str, stat: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in stat.items()}


def _write_plots(out: ResultDir, data: dict[str, Any], label: str) -> None:
    plots.latency_vs_size(data["latency"]["sweep"], out.path / "latency_vs_size.png", label)
    plots.bandwidth_heatmaps(data["bandwidth"]["matrix"], out.path / "bandwidth_matrix.png", label)
    if data["loaded"].get("by_memory_node"):
        first = next(iter(data["loaded"]["by_memory_node"].values()))
        plots.loaded_curves(first["curves"], out.path / "loaded_latency.png", label)
    if data["migrate"]["points"]:
        plots.migrate_bars(data["migrate"]["points"], out.path / "migrate.png", label)
