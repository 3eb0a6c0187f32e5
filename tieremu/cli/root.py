"""The `tieremu` command line: one click group, a subcommand per job; each subcommand's work lives in its layer."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tieremu import __version__
from tieremu.cli.lazy import LazyCommand, LazyGroup
from tieremu.numa.sysfs import ROOT_ENV

if TYPE_CHECKING:
    from rich.console import Console

# Subcommands that live in their own module, imported only when run (`tieremu --help` imports none of them).
SUBCOMMANDS = {
    "cluster": LazyCommand("tieremu.cli.cluster:cluster", "Several serving instances sharing KV blocks peer to peer, "
                           "with no central cache server."),
    "daemon": LazyCommand("tieremu.cli.daemon:daemon", "Attach to process PID and migrate its memory between NUMA "
                          "nodes under a placement policy."),
    "engine": LazyCommand("tieremu.cli.engine:engine", "Real serving engines (vLLM's CPU build) on tieremu's tiers."),
    "generate-trace": LazyCommand("tieremu.cli.replay:generate_trace",
                                  "Write a seeded synthetic trace in the Mooncake JSONL format into the folder --out."),
    "lab": LazyCommand("tieremu.cli.lab:lab", "Root-only lab profiles that turn a server into a CXL or remote-memory "
                       "testbed, reversibly."),
    "probe": LazyCommand("tieremu.cli.probe:probe", "Characterize every NUMA node: latency, bandwidth, loaded latency, "
                         "migration, storage, GPU copies."),
    "ray-node": LazyCommand("tieremu.cli.ray_node:ray_node", "Print or start `ray start` for this host, declaring "
                            "the resources tieremu's runs need (NUMA nodes, QEMU, lab profiles, your own names)."),
    "reference": LazyCommand("tieremu.cli.reference:reference", "Write the reference of every experiment-spec and "
                             "tier-map key (type, default, valid values, meaning), generated from the validators "
                             "themselves, to OUT/reference.md."),
    "replay": LazyCommand("tieremu.cli.replay:replay",
                          "Replay a Mooncake-format TRACE against a tier map under a placement policy."),
    "report": LazyCommand("tieremu.cli.report:report", "Summary tables per job and policy (TPOT and TTFT p50/p99, "
                          "tokens/s, hit ratio per tier, STRR, STAR, migration GB/s, slowdown vs all-fastest), with "
                          "the origin of every figure and which tiers were emulated; several folders are compared "
                          "side by side."),
    "run": LazyCommand("tieremu.cli.run:run", "Run an experiment spec (default: configs/experiments/default.yaml): "
                       "every run of its sweep in a worker process (fresh for measured runs, warm for simulated "
                       "replays), the all-fastest and all-slowest bounds beside every policy; writes manifest.json, "
                       "runs.jsonl, metrics.jsonl, summary.csv, runs/, plots/ and report.html."),
    "vm": LazyCommand("tieremu.cli.vm:vm", "Run commands inside a multi-node QEMU guest with real kernel NUMA."),
}


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tieremu")
def main() -> None:
    """tieremu: memory-tier emulation testbed for LLM inference on real Linux NUMA."""


def _config(*parts: str) -> str:
    """A shipped config: from the source tree tieremu runs from, else relative to the working directory."""
    shipped = Path(__file__).resolve().parents[2] / "configs" / Path(*parts)
    return str(shipped if shipped.exists() else Path("configs", *parts))


def _console() -> Console:
    from rich.console import Console

    return Console(width=max(120, Console().width))


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the topology as JSON instead of a table.")
@click.option("--sysfs-root", type=click.Path(exists=True, file_okay=False), default=None,
              help=f"Read sys/ and proc/ under this directory instead of / (also: ${ROOT_ENV}).")
def topo(as_json: bool, sysfs_root: str | None) -> None:
    """Show the machine as tiers see it: one row per NUMA node with CPUs, memory, SLIT distances, HMAT
    latency/bandwidth, memory tier and whether it is CPU-less."""
    from tieremu.cli.views import topology_table
    from tieremu.numa.topology import discover, topology_summary

    topology = discover(sysfs_root)
    if as_json:
        _print_json({"root": topology.root, "online": list(topology.online),
                     "cpuless_nodes": list(topology.cpuless_nodes), **topology_summary(topology),
                     "knobs": asdict(topology.knobs)})
    else:
        _console().print(topology_table(topology))


@main.command()
@click.option("--tiers", "tiers_file", type=click.Path(dir_okay=False), default=None,
              help="Tier map YAML (default: configs/tiers/cxl-expander.yaml).")
@click.option("--size-mib", default=4, show_default=True, type=click.IntRange(min=1),
              help="Size of the region allocated per tier.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(tiers_file: str | None, size_mib: int, as_json: bool) -> None:
    """For every tier: allocate a small region, ask the kernel where its pages are, and report `enforced`,
    `emulated` or `not enforced` with the reason. Emulated and shaped tiers' timing models are checked against
    this machine's calibration (measured once if none is cached). Exits 1 when any tier is not enforced."""
    from tieremu.cli.views import checks_table
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration
    from tieremu.tiers.check import NOT_ENFORCED, check_tiers
    from tieremu.tiers.config import load_tier_map
    from tieremu.tiers.resolve import resolve

    tier_map = load_tier_map(tiers_file or _config("tiers", "cxl-expander.yaml"))
    topo = discover()
    resolved = resolve(tier_map, topo)
    if resolved.any_emulated:  # a model this machine cannot honour is refused here, as `run` would refuse it
        resolved = resolve(tier_map, topo, calibration=calibration(topo))
    checks = check_tiers(resolved, size_mib << 20)
    if as_json:
        _print_json({"tier_map": tier_map.name, "checks": [c.to_dict() for c in checks]})
    else:
        _console().print(checks_table(checks))
    if any(c.status == NOT_ENFORCED for c in checks):
        sys.exit(1)


@main.group()
def bench() -> None:
    """Benchmarks that print figures and ratios (medians over repeats, with load and steal time)."""


@bench.command("placement")
@click.option("--size-mib", default=256, show_default=True, type=click.IntRange(min=1), help="Region size.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed repeats.")
@click.option("--hugepages", is_flag=True, help="Back the region with transparent huge pages.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_placement_cmd(size_mib: int, repeats: int, hugepages: bool, as_json: bool) -> None:
    """Placement-query speed (pages/s) and migration throughput (GB/s) between every pair of memory nodes."""
    from tieremu.bench.placement import bench_placement
    from tieremu.cli.views import placement_bench_table
    from tieremu.numa.topology import discover

    result = bench_placement(discover(), size_mib << 20, repeats, hugepages)
    if as_json:
        _print_json(asdict(result))
        return
    _console().print(placement_bench_table(result))
    for note in result.notes:
        click.echo(f"note: {note}")



@main.command("calibrate")
@click.option("--refresh", is_flag=True, help="Measure again even if this machine has a cached calibration.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
def calibrate_cmd(refresh: bool, as_json: bool) -> None:
    """Measure (or show the cached) local latency and bandwidth that emulated tiers are expressed against.

    Cached per machine (host, CPU model, kernel) so the same tier config means the same slowdown on every run.
    """
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import cache_path, calibration

    cal = calibration(discover(), refresh=refresh)
    if as_json:
        _print_json(cal.to_dict())
        return
    click.echo(f"calibration of {cal.machine} (node {cal.node}, {cal.created_utc}), cached in {cache_path()}")
    click.echo(f"  idle latency, 1 GiB chase with huge pages: {cal.latency_ns:.1f} ns")
    click.echo("  one-thread bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in cal.bandwidth_gbps.items()))


@bench.command("emulation")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed repeats.")
@click.option("--latency-ratio", "latency_ratios", multiple=True, type=click.FloatRange(1.0, 100.0),
              help="A latency target as a multiple of local (repeatable; default: 1.2, 1.5, 2.2, 3, 4).")
@click.option("--bandwidth-ratio", "bandwidth_ratios", multiple=True, type=click.FloatRange(0.01, 1.0),
              help="A bandwidth target as a share of local (repeatable; default: 0.1, 0.25, 0.5, 0.8, 0.9).")
@click.option("--kernel", "kernels", multiple=True, type=click.Choice(["read", "copy"]),
              help="Stream kernels whose bandwidth is paced (repeatable; default: read and copy).")
@click.option("--refresh", is_flag=True, help="Recalibrate first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_emulation_cmd(repeats: int, latency_ratios: tuple[float, ...], bandwidth_ratios: tuple[float, ...],
                        kernels: tuple[str, ...], refresh: bool, as_json: bool) -> None:
    """Emulated tiers against their targets: latency 1.2x-4x and bandwidth 0.1x-0.9x of local, with the error
    of each (goal: within 5%), and the pacing overhead when no slowdown is asked (goal: under 2%)."""
    from tieremu.bench.emulation import bench_emulation
    from tieremu.cli.views import emulation_bench_table
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration

    topo = discover()
    cal = calibration(topo, refresh=refresh)
    chosen = {k: v for k, v in (("latency_ratios", latency_ratios), ("bandwidth_ratios", bandwidth_ratios),
                                ("kernels_", kernels)) if v}
    result = bench_emulation(cal, topo.node(topo.cpu_nodes[0]).cpus[0], repeats=repeats, **chosen)
    if as_json:
        _print_json(asdict(result))
        return
    _console().print(emulation_bench_table(result))


@bench.command("kv")
@click.option("--tiers", "tiers_file", type=click.Path(dir_okay=False), default=None,
              help="Tier map (default: configs/tiers/cxl-expander.yaml); its first two memory tiers are compared.")
@click.option("--preset", default="tiny", show_default=True, help="Model preset (tiny, small, 1b).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1), help="Sequences decoded together.")
@click.option("--prompt-tokens", default=2048, show_default=True, type=click.IntRange(min=8),
              help="Prompt length per sequence, tokens (1/8 of it a prefix shared by every sequence).")
@click.option("--steps", default=16, show_default=True, type=click.IntRange(min=1), help="Decode steps per round.")
@click.option("--block-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per KV block.")
@click.option("--layout", type=click.Choice(["all-layers", "per-layer"]), default="all-layers", show_default=True,
              help="A KV block holds every layer of its tokens, or one layer.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Rounds of every arm, interleaved; medians over them.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_kv_cmd(tiers_file: str | None, preset: str, batch: int, prompt_tokens: int, steps: int, block_tokens: int,
                 layout: str, rounds: int, as_json: bool) -> None:
    """Paged KV decode against contiguous KV (goal: within 1.3x), attention's KV read bandwidth against the probe's,
    TPOT with KV all local, split and all in the slower tier (emulated where the node is missing), and the
    bookkeeping of emulation that asks for no slowdown (goal: under 2%)."""
    from tieremu.bench.kv import bench_kv
    from tieremu.cli.views import kv_bench_table
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration
    from tieremu.tiers.config import load_tier_map
    from tieremu.tiers.resolve import resolve
    from tieremu.workloads.decode import DecodeSpec
    from tieremu.workloads.llama import preset as model_preset

    topo = discover()
    tier_map = load_tier_map(tiers_file or _config("tiers", "cxl-expander.yaml"))
    resolved = resolve(tier_map, topo)
    cal = None
    if resolved.any_emulated:
        cal = calibration(topo)
        resolved = resolve(tier_map, topo, calibration=cal)
    spec = DecodeSpec(batch=batch, prompt_tokens=prompt_tokens, shared_prefix_tokens=prompt_tokens // 8,
                      decode_steps=steps)
    result = bench_kv(model_preset(preset), resolved, cal, spec, block_tokens=block_tokens, layout=layout,
                      rounds=rounds)
    if as_json:
        _print_json(asdict(result) | {"paged_ratio": result.paged_ratio})
        return
    _console().print(kv_bench_table(result))
