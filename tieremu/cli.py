"""The `tieremu` command line: one click group, a subcommand per job; each subcommand's work lives in its layer."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console

from tieremu import __version__
from tieremu.bench.emulation import bench_emulation
from tieremu.bench.placement import bench_placement
from tieremu.daemon.attach_cli import daemon
from tieremu.errors import TieremuError
from tieremu.lab.cli import lab
from tieremu.numa.sysfs import ROOT_ENV
from tieremu.numa.topology import discover
from tieremu.probe.calibrate import cache_path, calibration
from tieremu.report.cli import report
from tieremu.runner.manifest import topology_summary
from tieremu.runner.probe_cli import probe
from tieremu.runner.run_cli import run
from tieremu.tiers.check import NOT_ENFORCED, check_tiers
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve
from tieremu.views import (
    checks_table,
    emulation_bench_table,
    kv_bench_table,
    placement_bench_table,
    topology_table,
)
from tieremu.vm.cli import vm
from tieremu.workloads.replay_cli import generate_trace, parse_params, replay


class _Group(click.Group):
    """Prints TieremuError as one clear line and exits 2 instead of showing a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TieremuError as exc:
            click.echo(f"tieremu: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tieremu")
def main() -> None:
    """tieremu: memory-tier emulation testbed for LLM inference on real Linux NUMA."""


def _config(*parts: str) -> str:
    """A shipped config: from the source tree tieremu runs from, else relative to the working directory."""
    shipped = Path(__file__).resolve().parents[1] / "configs" / Path(*parts)
    return str(shipped if shipped.exists() else Path("configs", *parts))


def _console() -> Console:
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
    cal = calibration(discover(), refresh=refresh)
    if as_json:
        _print_json(cal.to_dict())
        return
    click.echo(f"calibration of {cal.machine} (node {cal.node}, {cal.created_utc}), cached in {cache_path()}")
    click.echo(f"  idle latency, 1 GiB chase with huge pages: {cal.latency_ns:.1f} ns")
    click.echo("  one-thread bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in cal.bandwidth_gbps.items()))


@bench.command("emulation")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed repeats.")
@click.option("--refresh", is_flag=True, help="Recalibrate first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_emulation_cmd(repeats: int, refresh: bool, as_json: bool) -> None:
    """Emulated tiers against their targets: latency 1.2x-4x and bandwidth 0.1x-0.9x of local, with the error
    of each (goal: within 5%), and the pacing overhead when no slowdown is asked (goal: under 2%)."""
    topo = discover()
    cal = calibration(topo, refresh=refresh)
    result = bench_emulation(cal, topo.node(topo.cpu_nodes[0]).cpus[0], repeats=repeats)
    if as_json:
        _print_json(asdict(result))
        return
    _console().print(emulation_bench_table(result))


@bench.command("kv")
@click.option("--tiers", "tiers_file", type=click.Path(dir_okay=False), default=None,
              help="Tier map (default: configs/tiers/cxl-expander.yaml); its first two memory tiers are compared.")
@click.option("--preset", default="tiny", show_default=True, help="Model preset (tiny, small, 1b).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-tokens", default=2048, show_default=True, type=click.IntRange(min=8))
@click.option("--steps", default=16, show_default=True, type=click.IntRange(min=1), help="Decode steps per round.")
@click.option("--block-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--layout", type=click.Choice(["all-layers", "per-layer"]), default="all-layers", show_default=True)
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_kv_cmd(tiers_file: str | None, preset: str, batch: int, prompt_tokens: int, steps: int, block_tokens: int,
                 layout: str, rounds: int, as_json: bool) -> None:
    """Paged KV decode against contiguous KV (goal: within 1.3x), attention's KV read bandwidth against the probe's,
    TPOT with KV all local, split and all in the slower tier (emulated where the node is missing), and the
    bookkeeping of emulation that asks for no slowdown (goal: under 2%)."""
    from tieremu.bench.kv import bench_kv
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


# -- real engines (tieremu.engines): here until the commands move to the tieremu/cli/ package -------------------

@main.group()
def engine() -> None:
    """Real serving engines (vLLM's CPU build) on tieremu's tiers."""


@engine.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--engine", "engine_name", default="vllm", show_default=True, help="The serving engine (vllm).")
@click.option("--tiers", "tier_file", required=True, type=click.Path(dir_okay=False),
              help="Tier map of the connector's store (each tier needs capacity_mib).")
@click.option("--policy", default="lru", show_default=True, help="Placement policy of the store.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A policy parameter (repeatable).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A local Hugging Face model directory; default: a tiny Llama built here from a fixed seed.")
@click.option("--kv-tier", default=None, help="Place the engine's own KV tensor on this tier's node.")
@click.option("--max-requests", type=click.IntRange(min=1), default=None, help="Only the first N requests.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per trace hash id; also the engine's KV block size.")
@click.option("--max-output-tokens", type=click.IntRange(min=1), default=None,
              help="Cap each request's output tokens (default: the trace's output_length).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Model and KV dtype (bf16 linear layers are ~3x slower on CPUs without AMX).")
@click.option("--time-scale", type=float, default=0.2, show_default=True, help="Wall seconds per trace second.")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True,
              help="Seconds an engine run may take before it is stopped.")
@click.option("--check-outputs", is_flag=True,
              help="Run again without the connector and compare generated token ids (vLLM's prefix cache off).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def engine_replay_cmd(trace: str, engine_name: str, tier_file: str, policy: str, params: tuple[str, ...],
                      model: str | None, kv_tier: str | None, max_requests: int | None, block_tokens: int,
                      max_output_tokens: int | None, dtype: str,
                      time_scale: float, timeout_s: float, check_outputs: bool, as_json: bool) -> None:
    """Replay a Mooncake-format TRACE against a real engine whose KV connector stores blocks in tieremu's tiers."""
    from tieremu.engines.replay import EngineReplayConfig, engine_replay
    from tieremu.workloads.trace import read_trace

    requests = read_trace(trace)[:max_requests]
    result = engine_replay(EngineReplayConfig(
        trace_requests=requests, tiers=Path(tier_file), policy=policy, policy_params=parse_params(params),
        engine=engine_name, model=None if model is None else Path(model), kv_tier=kv_tier, block_tokens=block_tokens,
        check_outputs=check_outputs, dtype=dtype, time_scale=time_scale, timeout_s=timeout_s,
        max_output_tokens=max_output_tokens))
    if as_json:
        _print_json(result.to_dict())
    else:
        hits = result.connector.get("hits_by_tier", {})
        click.echo(f"{result.engine} on {result.model}: {result.requests} requests, policy {result.policy} "
                   f"({result.origin})")
        click.echo(f"TTFT p50 {result.ttft_ms.p50:.1f} ms p99 {result.ttft_ms.p99:.1f} ms; TPOT p50 "
                   f"{result.tpot_ms.p50:.2f} ms p99 {result.tpot_ms.p99:.2f} ms; {result.tokens_per_s:.0f} tokens/s")
        click.echo(f"connector: stored {result.connector.get('stored_blocks')} blocks, loaded "
                   f"{result.connector.get('loaded_blocks')}; hits by tier {hits}")
        if result.kv_placement is not None:
            p = result.kv_placement
            click.echo(f"KV tensor: tier {p['tier']} node {p['requested_node']}: "
                       f"{p['achieved_fraction']:.1%} of {p['pages']} pages there")
        if result.outputs_match is not None:
            click.echo(f"outputs match without the connector: {result.outputs_match}")
        for note in result.notes:
            click.echo(f"note: {note}")
    if result.outputs_match is False:
        raise click.ClickException(f"generated tokens differ with and without the connector for requests "
                                   f"{result.mismatched_requests[:10]}")


# Subcommand groups that live with their layer.
for _group in (vm, probe, lab, run, report, replay, generate_trace, daemon):
    main.add_command(_group)
