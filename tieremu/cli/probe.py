"""`tieremu probe …`: characterize the machine's memory the way MLC, lmbench, Mess and fio do."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tieremu.numa.topology import discover
from tieremu.probe import bandwidth, latency, loaded, migrate
from tieremu.probe.calibrate import calibration
from tieremu.probe.emulated import TierMeasurement, probe_tiers
from tieremu.probe.report import (
    bandwidth_json,
    format_matrix,
    latency_json,
    loaded_json,
    medians,
    migrate_json,
)
from tieremu.runner.probe_run import ProbePlan, origin, run_all
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve

quick_option = click.option("--quick/--full", default=True, show_default=True,
                            help="Quick mode (a short sweep, fewer repeats) or the full grid.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def probe() -> None:
    """Characterize every NUMA node: latency, bandwidth, loaded latency, migration, storage, GPU copies.

    Kernels are compiled C (built on first use); buffers are bound to the memory node and their placement is
    verified; threads are pinned to the initiator node's CPUs. Figures are medians over repeats with min-max
    spread; a spread over 10% is flagged noisy.
    """


tiers_option = click.option(
    "--tiers", "tiers_file", type=click.Path(dir_okay=False), default=None,
    help="Also probe every tier of this tier map through its own path (emulated and shaped tiers through their "
         "timing models), printing target, achieved and error.")


def _tier_report(tiers_file: str, *, latency_: bool, kernels_: tuple[str, ...], size: int,
                 repeats: int) -> list[TierMeasurement]:
    topo = discover()
    cal = calibration(topo)
    resolved = resolve(load_tier_map(tiers_file), topo, calibration=cal)
    cpu = topo.node(topo.cpu_nodes[0]).cpus[0]
    rows = probe_tiers(resolved, cal, cpu, latency=latency_, kernels_=kernels_, size=size, repeats=repeats)
    for r in rows:
        target = "-" if r.requested is None else f"{r.requested:.2f}"
        error = "-" if r.error is None else f"{r.error:+.1%}"
        click.echo(f"tier {r.tier:<8} {r.backing:<9} {r.metric:<16} target {target:>9}  achieved "
                   f"{r.achieved.median:9.2f}  error {error:>7}  spread {r.achieved.spread:.1%}")
    return rows


@probe.command("latency")
@click.option("--size-mib", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Working set of the idle latency matrix.")
@click.option("--hugepages/--no-hugepages", default=True, show_default=True,
              help="2 MiB transparent huge pages (keeps TLB misses out of the figure, as MLC does) or 4 KiB pages.")
@click.option("--sweep/--no-sweep", default=False, show_default=True,
              help="Also sweep sizes (32 KiB and up) on the first node: caches and the TLB effect.")
@tiers_option
@quick_option
@json_option
def latency_cmd(size_mib: int, hugepages: bool, sweep: bool, tiers_file: str | None, quick: bool,
                as_json: bool) -> None:
    """Idle latency matrix (ns), initiator node × memory node, by dependent-load pointer chase."""
    if tiers_file is not None:
        rows = _tier_report(tiers_file, latency_=True, kernels_=(), size=size_mib << 20, repeats=3 if quick else 7)
        if as_json:
            _echo_json({"tiers": [r.to_dict() for r in rows]})
        return
    topo = discover()
    repeats = 3 if quick else 7
    matrix = latency.latency_matrix(topo, size_mib << 20, hugepages=hugepages, repeats=repeats)
    points = []
    if sweep:
        sizes = latency.QUICK_SIZES if quick else latency.FULL_SIZES
        points = latency.size_sweep(topo.node(topo.cpu_nodes[0]).cpus[0], topo.memory_nodes[0], sizes,
                                    hugepages=hugepages, repeats=repeats)
    data = latency_json(matrix, points, origin())
    if as_json:
        _echo_json(data)
        return
    page = "2 MiB THP" if hugepages else "4 KiB pages"
    click.echo(format_matrix(medians(matrix.cells, lambda p: p.ns),
                             f"Idle latencies (ns), {size_mib} MiB, {page} ({data['origin']})"))
    noisy = [f"{i}→{m}" for i, row in matrix.cells.items() for m, p in row.items() if p.ns.noisy]
    if noisy:
        click.echo(f"noisy (spread over 10%): {', '.join(noisy)}; rerun on a quiet machine")
    for p in points:
        click.echo(f"{p.size_bytes >> 10:>10} KiB  {p.ns.median:8.1f} ns  spread {p.ns.spread:.1%}"
                   f"{'  noisy' if p.ns.noisy else ''}")


@probe.command("bandwidth")
@click.option("--kernel", "kernels_", multiple=True, type=click.Choice(bandwidth.KERNELS),
              help="Kernels to run (default: all).")
@click.option("--working-set-mib", default=512, show_default=True, type=click.IntRange(min=64),
              help="Total buffer size across threads (each thread gets at least 32 MiB).")
@tiers_option
@quick_option
@json_option
def bandwidth_cmd(kernels_: tuple[str, ...], working_set_mib: int, tiers_file: str | None, quick: bool,
                  as_json: bool) -> None:
    """Bandwidth matrix (GB/s): read, write, copy, triad on 1..N threads pinned to each initiator node."""
    if tiers_file is not None:
        paced = tuple(k for k in (kernels_ or ("read", "write", "copy")) if k != "triad")
        rows = _tier_report(tiers_file, latency_=False, kernels_=paced, size=0, repeats=3 if quick else 7)
        if as_json:
            _echo_json({"tiers": [r.to_dict() for r in rows]})
        return
    matrix = bandwidth.bandwidth_matrix(discover(), kernels_=kernels_ or bandwidth.KERNELS, quick=quick,
                                        working_set=working_set_mib << 20, repeats=3 if quick else 7)
    data = bandwidth_json(matrix, origin())
    if as_json:
        _echo_json(data)
        return
    for kernel in kernels_ or bandwidth.KERNELS:
        cells = matrix.at_max_threads(kernel)
        click.echo(format_matrix(medians(cells, lambda p: p.gb_per_s),
                                 f"{kernel} bandwidth (GB/s), all threads of the initiator ({data['origin']})", 2))
    click.echo("thread scaling: " + ", ".join(
        f"{p.kernel}@{p.threads}t={p.gb_per_s.median:.1f}" for p in matrix.points if p.memory_node == p.initiator_node))


@probe.command("loaded")
@click.option("--initiator", type=int, default=None, help="Initiator node (default: the first node with CPUs).")
@click.option("--memory", "memory_node", type=int, default=None, help="Memory node (default: the initiator's).")
@quick_option
@json_option
def loaded_cmd(initiator: int | None, memory_node: int | None, quick: bool, as_json: bool) -> None:
    """Bandwidth-latency curves: chase latency on one CPU while the node's other CPUs generate traffic."""
    topo = discover()
    init = topo.cpu_nodes[0] if initiator is None else initiator
    mem = init if memory_node is None else memory_node
    topo.require_memory_nodes([mem], "probe loaded")
    points = loaded.loaded_latency(topo, init, mem, quick=quick)
    data = loaded_json(points, init, mem, origin())
    if as_json:
        _echo_json(data)
        return
    click.echo(f"Loaded latency, initiator node {init}, memory node {mem} ({data['origin']})")
    click.echo(f"{'mix':>7} {'delay ns':>9} {'traffic GB/s':>13} {'latency ns':>11} {'spread':>7}")
    for p in points:
        delay = "idle" if p.delay_ns is None else str(p.delay_ns)
        click.echo(f"{p.mix:>7} {delay:>9} {p.traffic_gb_per_s:>13.2f} {p.latency_ns.median:>11.1f} "
                   f"{p.latency_ns.spread:>7.1%}{'  noisy' if p.latency_ns.noisy else ''}")


@probe.command("migrate")
@click.option("--size-mib", default=64, show_default=True, type=click.IntRange(min=1), help="Region size.")
@quick_option
@json_option
def migrate_cmd(size_mib: int, quick: bool, as_json: bool) -> None:
    """Page-migration throughput per node pair (batch sizes, 4 KiB vs THP) next to memcpy between the nodes."""
    result = migrate.migrate_probe(discover(), size=size_mib << 20, quick=quick, repeats=3 if quick else 7)
    data = migrate_json(result, origin())
    if as_json:
        _echo_json(data)
        return
    for note in result.notes:
        click.echo(f"note: {note}")
    for p in result.points:
        click.echo(f"node {p.source}→{p.target} {'THP' if p.hugepages else '4K '} batch {p.batch_pages:>6}: "
                   f"migrate {p.migrate_gb_per_s.median:6.2f} GB/s, copy {p.copy_gb_per_s.median:6.2f} GB/s, "
                   f"copy/migrate {p.copy_over_migrate:.1f}x")


@probe.command("storage")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@quick_option
@json_option
def storage_cmd(directory: Path, quick: bool, as_json: bool) -> None:
    """fio against DIRECTORY (the NVMe tier's path): random/sequential reads and writes, block sizes, depths."""
    from tieremu.probe.storage import run_storage, to_rows

    result = run_storage(directory, quick=quick)
    if as_json:
        _echo_json(asdict(result))
        return
    rows = to_rows(result)
    if rows:
        keys = list(rows[0])
        click.echo("  ".join(keys))
        for row in rows:
            click.echo("  ".join(str(row[k]) for k in keys))


@probe.command("gpu")
@quick_option
@json_option
def gpu_cmd(quick: bool, as_json: bool) -> None:
    """Pinned host↔GPU copy bandwidth and latency per host NUMA node vs block size (needs CUDA)."""
    from tieremu.probe.gpu import run_gpu

    result = run_gpu(discover(), quick=quick)
    data = asdict(result)
    if as_json or not getattr(result, "skipped", None):
        _echo_json(data)
    else:
        click.echo(f"gpu probe skipped: {result.skipped}")


@probe.command("all")
@quick_option
@click.option("--storage-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the fio storage probe (the NVMe tier's path); skipped when not given.")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Results root; lands in OUT/probe/<timestamp>/.")
@json_option
def all_cmd(quick: bool, storage_dir: Path | None, out_root: Path, as_json: bool) -> None:
    """Every probe, saved under results/probe/<timestamp>/ as JSON, CSV and PNG plots with a manifest."""
    plan = ProbePlan.quick_plan(storage_dir) if quick else ProbePlan.full_plan(storage_dir)
    # --json: stdout is the JSON alone; the progress goes to stderr
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True) if as_json else None) as progress:
        def step(name: str, total: int) -> Callable[[], None]:
            task = progress.add_task(name, total=total)
            if total == 0:
                progress.stop_task(task)  # nothing to measure here: freeze its clock
            return lambda: progress.advance(task)

        path = run_all(discover(), plan, out_root, step)
    if as_json:
        probe_json = path / "probe.json"
        _echo_json({"path": str(path), "probe": json.loads(probe_json.read_text()) if probe_json.exists() else None})
        return
    Console().print(f"results: {path}")
