"""`tieremu replay` (a trace against a tier map under a policy) and `tieremu generate-trace` (a synthetic trace).

The tier map's order is the tier order; a tier's capacity in blocks is its `capacity_mib` over the block size
(`--block-mib`, the KV a trace block stands for), or `--capacity TIER=BLOCKS` or `TIER=P%` (a share of the trace's
distinct blocks): the same block counts in both modes. Simulate only reads the map (it needs no memory); execute
resolves it against this machine and stores each block at 1/1024 of its size in real memory (64 MiB -> 64 KiB).
A tier with `compression:` holds its capacity_mib's worth of compressed blocks (ratio-times more) and its hits are
charged the compressed bytes plus the dequantization (tieremu.kv.compress_tiers); simulate mode only.

Policies come in families (tieremu.policy.base.FAMILIES): demand caches (lru, lfu, belady) promote on access;
tiering daemons (lru-epoch, hotcold, lookahead, layerahead) move blocks at epochs; static placements never move.
Simulate checks every result against its bounds (tieremu.workloads.bounds) and flags one outside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml
from rich.console import Console
from rich.table import Table

from tieremu.cli import units
from tieremu.errors import ConfigError, WorkloadError
from tieremu.kv.compress_tiers import TierCodec, capacity_blocks, effective_read_gbps, tier_codecs
from tieremu.numbers import MAX_GBPS, MAX_MIB, MAX_RATIO, MAX_SECONDS, Range, number_problem
from tieremu.policy.base import PolicyContext
from tieremu.policy.registry import BUILTIN, get_policy, names
from tieremu.tiers.config import TierMap, TierSpec, load_tier_map
from tieremu.workloads.bounds import BoundCheck, check
from tieremu.workloads.capacity import Capacity, distinct_blocks
from tieremu.workloads.generators import KINDS, generate, mix
from tieremu.workloads.simulate import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_EPOCH_S,
    DEFAULT_PREFILL_TOKENS_PER_S,
    ReplayResult,
    SimTier,
    policy_context,
    simulate,
)
from tieremu.workloads.trace import ceiling_hit_ratio, read_trace, write_trace


class Number(click.ParamType):
    """A float option checked by tieremu.numbers: finite and within range (click's FloatRange lets NaN through)."""

    name = "number"

    def __init__(self, lo: float | None = 0, hi: float | None = None, *, lo_open: bool = True) -> None:
        self.valid = Range(lo, hi, lo_closed=not lo_open)

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number; expected {self.valid.describe()}", param, ctx)
        if (problem := number_problem(number, self.valid)) is not None:
            self.fail(problem, param, ctx)
        return number


if TYPE_CHECKING:  # execute mode needs torch and the KV cache: imported only when it runs
    from tieremu.tiers.emulation import DelayInjector
    from tieremu.tiers.resolve import ResolvedTierMap
    from tieremu.workloads.execute import ExecuteResult

# Execute mode's defaults, as in tieremu.workloads.execute (kept here so that the CLI starts without torch).
EXECUTE_TIME_SCALE = 0.2
# Execute stores a block at 1/EXECUTE_SCALE of the KV it stands for: --block-mib 64 (the default) takes 64 KiB here,
# so one option sizes a block in both modes.
EXECUTE_SCALE = 1024
EXECUTE_BLOCK_KIB = int(DEFAULT_BLOCK_BYTES / 2**20 * (1024 / EXECUTE_SCALE))

# Local DRAM read bandwidth assumed for the TTFT estimate when this machine has no calibration cached.
ASSUMED_LOCAL_READ_GBPS = 20.0


@dataclass(frozen=True)
class ReadBandwidth:
    """Per-tier read GB/s for the TTFT estimate, and where the local figure came from."""

    by_tier: dict[str, float]
    local_gbps: float
    local_source: str  # "--local-gbps" | "calibration" | "assumed"
    codecs: dict[str, TierCodec] = field(default_factory=dict)  # compressed tiers: their moves carry fewer bytes


def _pairs(values: Sequence[str], option: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint=option)
        out.append((key.strip(), rest.strip()))
    return out


def parse_params(values: Sequence[str]) -> dict[str, object]:
    """`key=value` pairs; values are read as YAML scalars or lists (0.9, 8, true, [0.5, 0.5], text)."""
    params: dict[str, object] = {}
    for key, raw in _pairs(values, "--param"):
        try:
            params[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            params[key] = raw
    return params


def parse_capacities(tier_map: TierMap, values: Sequence[str]) -> dict[str, Capacity]:
    """`--capacity TIER=BLOCKS|P%` pairs, checked against the map before the trace is read."""
    out = {}
    for name, raw in _pairs(values, "--capacity"):
        if name not in tier_map.names:
            raise ConfigError(f"--capacity names tier {name!r}; tiers of {tier_map.name}: {', '.join(tier_map.names)}")
        out[name] = Capacity.parse(raw, f"--capacity {name}")
    return out


def sim_tiers(tier_map: TierMap, block_bytes: int, overrides: Mapping[str, int]) -> list[SimTier]:
    for name, blocks in overrides.items():
        if name not in tier_map.names:
            raise ConfigError(f"--capacity names tier {name!r}; tiers of {tier_map.name}: {', '.join(tier_map.names)}")
        if blocks < 1:
            raise ConfigError(f"--capacity {name}={blocks}: give 1 block or more (leave it out for unlimited)")
    tiers = []
    for spec in tier_map.tiers:
        blocks = overrides.get(spec.name)
        if blocks is None and spec.capacity_mib is not None:
            blocks = capacity_blocks(spec, block_bytes)  # a compressed tier holds ratio-times more blocks
            if blocks < 1:
                raise ConfigError(f"tier {spec.name}: capacity_mib={spec.capacity_mib} holds no block of "
                                  f"{block_bytes / 2**20:g} MiB; raise capacity_mib or lower --block-mib")
        tiers.append(SimTier(spec.name, blocks))
    return tiers


def read_bandwidth(tier_map: TierMap, overrides: Mapping[str, float], local_gbps: float | None) -> ReadBandwidth:
    """A tier's read bandwidth: --read-gbps, else its emulate target (absolute, or a ratio of local DRAM)."""
    source = "--local-gbps"
    if local_gbps is None:
        local_gbps, source = _calibrated_local_read()
    for name in overrides:
        if name not in tier_map.names:
            raise ConfigError(f"--read-gbps names tier {name!r}; tiers of {tier_map.name}: "
                              f"{', '.join(tier_map.names)}")
    by_tier = {spec.name: overrides.get(spec.name, _target_read(spec, local_gbps)) for spec in tier_map.tiers}
    specs = {spec.name: spec for spec in tier_map.tiers}
    codecs = tier_codecs(specs, by_tier)  # type: ignore[arg-type]
    by_tier = effective_read_gbps(specs, by_tier)  # type: ignore[assignment]
    return ReadBandwidth(by_tier, local_gbps, source, codecs)


def _target_read(spec: TierSpec, local_gbps: float) -> float:
    target = spec.emulate
    if target is None:
        return local_gbps
    if target.bandwidth_gbps is not None:
        return target.bandwidth_gbps
    return (target.bandwidth_ratio or 1.0) * local_gbps


def _calibrated_local_read() -> tuple[float, str]:
    from tieremu.probe.calibrate import load_cached  # reads the cache only; never measures

    cached = load_cached()
    if cached is not None and cached.bandwidth_gbps.get("read"):
        return cached.bandwidth_gbps["read"], "calibration"
    return ASSUMED_LOCAL_READ_GBPS, "assumed"


def _policy_help() -> str:
    families = {"demand": "demand caches", "daemon": "tiering daemons", "static": "static placements"}
    parts = [f"{label}: {', '.join(n for n in names() if BUILTIN[n].family == family)}"
             for family, label in families.items()]
    return f"Policy name ({'; '.join(parts)}), or package.module:Class."


@click.command("replay")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("--tiers", "tier_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Tier map (configs/tiers/*.yaml): its order is the tier order, fastest first.")
@click.option("--policy", required=True, help=_policy_help())
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A policy parameter (repeatable).")
@click.option("--mode", type=click.Choice(["simulate", "execute"]), default="simulate", show_default=True,
              help="simulate: accounting only, no memory touched. execute: real KV blocks in the tiers' memory, a "
              "migration daemon, arrivals in (scaled) real time.")
@click.option("--capacity", multiple=True, metavar="TIER=BLOCKS|P%",
              help="A tier's capacity in blocks, or as a share of the trace's distinct blocks (fast=10%) "
              "(repeatable); overrides the map's capacity_mib.")
@click.option("--no-pin", "no_pin", is_flag=True,
              help="simulate: do not pin the blocks a request has read while it is served (for comparison with "
              "textbook caches over the flattened stream).")
@click.option("--block-mib", type=Number(0, MAX_MIB), default=DEFAULT_BLOCK_BYTES / 2**20,
              show_default=True, help="KV a trace block stands for, MiB (512 tokens of Llama-3-8B in fp16: 64). "
              "execute stores it at 1/1024 of that in real memory (64 MiB -> 64 KiB; a multiple of 4 KiB).")
@click.option("--read-gbps", multiple=True, metavar="TIER=GBPS",
              help="A tier's read bandwidth for the TTFT estimate (repeatable); default from its emulate target.")
@click.option("--local-gbps", type=Number(0, MAX_GBPS), default=None,
              help="Local DRAM read GB/s that bandwidth ratios refer to (default: calibration, else 20).")
@click.option("--epoch-ms", type=Number(0, MAX_SECONDS * 1e3), default=DEFAULT_EPOCH_S * 1e3,
              show_default=True, help="Policy epoch, in trace milliseconds.")
@click.option("--prefill-tokens-per-s", type=Number(0, 1e9),
              default=DEFAULT_PREFILL_TOKENS_PER_S, show_default=True, help="Cost of a missed token in the TTFT "
              "estimate.")
@click.option("--max-requests", type=click.IntRange(min=1), default=None,
              help="Replay only the trace's first N requests.")
@click.option("--time-scale", type=Number(0, MAX_RATIO), default=EXECUTE_TIME_SCALE,
              show_default=True, help="execute: wall seconds per trace second (0.1 replays 10x faster than the "
              "trace; late requests start at once).")
@click.option("--budget-gbps", type=Number(0, MAX_GBPS), default=None,
              help="Migration budget, GB/s (default: none; simulate still charges every move its bytes over the "
              "tier pair's bandwidth, execute's daemon then moves without limit).")
@click.option("--epochs-between-requests", "inline_epochs", is_flag=True,
              help="execute: run the daemon's epochs in the replay's thread at simulate's instants instead of "
              "in its own thread (same decisions as simulate; no concurrency).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(trace: str, tier_file: str, policy: str, params: tuple[str, ...], mode: str, capacity: tuple[str, ...],
           no_pin: bool, block_mib: float, read_gbps: tuple[str, ...], local_gbps: float | None, epoch_ms: float,
           prefill_tokens_per_s: float, max_requests: int | None, time_scale: float,
           budget_gbps: float | None, inline_epochs: bool, as_json: bool) -> None:
    """Replay a Mooncake-format TRACE against a tier map under a placement policy."""
    block_bytes = int(block_mib * 2**20)
    tier_map = load_tier_map(tier_file)
    shares = parse_capacities(tier_map, capacity)
    policy_params = parse_params(params)
    get_policy(policy, policy_params, PolicyContext(future=()))  # names and values checked before any work
    compressed = [t.name for t in tier_map.tiers if t.compression.enabled]
    if compressed and mode == "execute":
        raise ConfigError(f"tier(s) {', '.join(compressed)} of {tier_map.name} are compressed: execute mode stores "
                          "blocks uncompressed, so replay them with --mode simulate (decode runs store them "
                          "compressed)")
    if no_pin and mode == "execute":
        raise ConfigError("--no-pin is for simulate mode: execute always pins the blocks of the request it serves")
    requests = read_trace(trace)[:max_requests]
    distinct = distinct_blocks(requests) if any(c.share is not None for c in shares.values()) else 0
    capacities = {name: c.resolve(distinct, f"--capacity {name}") for name, c in shares.items()}
    tiers = sim_tiers(tier_map, block_bytes, capacities)
    chosen = get_policy(policy, policy_params, policy_context(requests, epoch_ms / 1e3))
    console = Console(width=max(120, Console().width))
    if mode == "execute":
        from tieremu.workloads.execute import execute, scaled_layout

        layout = _execute_layout(scaled_layout, block_mib)  # checked before anything is allocated
        resolved, injector = resolve_here(tier_map)
        result = execute(requests, resolved, chosen, block_layout=layout,
                         capacities={t.name: t.capacity_blocks for t in tiers}, time_scale=time_scale,
                         epoch_s=epoch_ms / 1e3 * time_scale, budget_gbps=budget_gbps, injector=injector,
                         represented_block_bytes=block_bytes, daemon_thread=not inline_epochs, params=policy_params)
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
        else:
            console.print(replay_table(result, Path(trace).name, tier_map.name))
            console.print(execute_summary(result, ceiling_hit_ratio(requests)))
        if result.blocks_corrupted:
            raise WorkloadError(f"{result.blocks_corrupted} of {result.blocks_checked} KV blocks did not hold what "
                                "was written to them after the replay: a migration or copy lost data")
        return
    bandwidths = {k: _number(v, float, "--read-gbps") for k, v in _pairs(read_gbps, "--read-gbps")}
    bandwidth = read_bandwidth(tier_map, bandwidths, local_gbps)
    settings = {"epoch_s": epoch_ms / 1e3, "block_bytes": block_bytes, "tier_read_gbps": bandwidth.by_tier,
                "prefill_tokens_per_s": prefill_tokens_per_s, "tier_codecs": bandwidth.codecs}
    result = simulate(requests, tiers, chosen, params=policy_params, pin=not no_pin, budget_gbps=budget_gbps,
                      **settings)  # type: ignore[arg-type]
    bounds = check(requests, tiers, result, **settings)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "bounds": [asdict(b) for b in bounds]}, indent=2))
        return
    console.print(replay_table(result, Path(trace).name, tier_map.name))
    console.print(replay_summary(result, ceiling_hit_ratio(requests), bandwidth))
    console.print(bounds_line(bounds))


def _execute_layout(scaled_layout: Callable[[int], object], block_mib: float) -> object:
    """Execute's real block: the --block-mib block at 1/EXECUTE_SCALE, in whole KiB; a refusal names --block-mib."""
    kib = block_mib * 1024 / EXECUTE_SCALE
    if kib != int(kib):
        raise ConfigError(f"--block-mib {block_mib:g}: execute stores a block in {kib:g} KiB, not a whole number of "
                          "KiB; give a multiple of 4 (MiB)")
    try:
        return scaled_layout(int(kib))
    except ConfigError as exc:
        raise ConfigError(f"--block-mib {block_mib:g}: execute stores a block in {int(kib)} KiB: {exc}") from None


def bounds_line(bounds: Sequence[BoundCheck]) -> str:
    outside = [b for b in bounds if not b.within]
    head = "OUTSIDE ITS BOUNDS (a bug in the policy or the replay)" if outside else "within its bounds"
    return f"bounds: {head}: " + "; ".join(b.describe() for b in bounds)


def resolve_here(tier_map: TierMap) -> tuple[ResolvedTierMap, DelayInjector | None]:
    """The map resolved on this machine; emulated and shaped tiers get their timing models (from the cached
    calibration, measured first if there is none) and an injector that makes them that slow."""
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration
    from tieremu.tiers.emulation import DelayInjector
    from tieremu.tiers.resolve import resolve

    topo = discover()
    resolved = resolve(tier_map, topo)
    if not resolved.any_emulated:
        return resolved, None
    cal = calibration(topo)
    resolved = resolve(tier_map, topo, calibration=cal)
    models = [t.timing for t in resolved.tiers if t.timing is not None]
    return resolved, DelayInjector(models, cal) if models else None


def _number(value: str, kind: type[int] | type[float], option: str) -> float:
    try:
        return kind(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a{'n integer' if kind is int else ' number'}",
                                 param_hint=option) from None


def replay_table(result: ReplayResult, trace: str, tier_map: str) -> Table:
    table = Table(title=f"Replay of {trace} on {tier_map} under {result.policy} ({result.origin})")
    family = {"demand": "a demand cache", "daemon": "a tiering daemon", "static": "a static placement"}
    table.caption = f"{result.policy} is {family.get(result.family, result.family)}" + (
        "; belady is Belady's MIN with bypass, the bound of every demand cache's fastest tier"
        if result.policy == "belady" else "")
    for col in ("tier", "capacity blocks", "hits", "hit ratio", "residency", "resident at end", "read GB/s"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for t in result.tiers:
        table.add_row(t.name, "unlimited" if t.capacity_blocks is None else f"{t.capacity_blocks:,}", f"{t.hits:,}",
                      f"{t.hit_ratio:.1%}", f"{t.residency:.1%}", f"{t.resident_blocks:,}",
                      "-" if t.read_gbps is None else f"{t.read_gbps:.1f}")
    if result.capacity_lifted:
        table.caption = f"{result.policy} is a bound: every tier was treated as unlimited"
    if not result.pinned:
        table.caption += "; blocks not pinned (--no-pin)"
    return table


def _hits_line(r: ReplayResult, ceiling: float) -> str:
    return (f"requests {r.requests:,}  references {r.references:,}  hit ratio {r.hit_ratio:.1%} (ceiling "
            f"{ceiling:.1%})  misses {r.misses:,}  evictions {r.evictions:,}"
            + (f"  uncached {r.uncached:,}" if r.uncached else ""))


def replay_summary(result: ReplayResult, ceiling: float, bandwidth: ReadBandwidth) -> str:
    r, t = result, result.ttft_ms
    return "\n".join([
        _hits_line(r, ceiling),
        f"STRR {r.strr:.1%}  STAR {r.star:.1%}  TTFT estimate p50 {t.p50:,.1f} ms  p99 {t.p99:,.1f} ms  "
        f"max {t.max:,.1f} ms  (prefill {r.prefill_tokens_per_s:,.0f} tokens/s; local read "
        f"{units.rate(bandwidth.local_gbps)}, {bandwidth.local_source})",
        f"migrations {units.amount(r.migration_bytes)} = {units.rate(r.migration_gbps)} (budget "
        f"{'none' if r.budget_gbps is None else units.rate(r.budget_gbps)})  promotions "
        f"{r.promotions:,}  demotions {r.demotions:,}  prefetches {r.prefetches:,}  ping-pongs {r.ping_pongs:,}"
        + (f"  skipped moves {r.moves_skipped:,}" if r.moves_skipped else "")
        + (f"  deferred (budget) {r.moves_deferred:,}" if r.moves_deferred else "")
        + f"  requests that waited for a block in flight {r.waited_requests:,}",
        f"{r.epochs:,} epochs over {r.trace_s:,.1f} s of trace  wall {r.wall_s:.3f} s ({r.core} core, "
        f"{r.references / r.wall_s / 1e6 if r.wall_s else 0:,.1f} M references/s)  policy CPU "
        f"{r.policy_cpu_s:.2f} s  block {units.size(r.block_bytes)}  origin: {r.origin}",
    ])


def execute_summary(result: ExecuteResult, ceiling: float) -> str:
    r, t, lag = result, result.ttft_ms, result.lag_ms
    backings = ", ".join(f"{name} {kind}" for name, kind in r.backings.items())
    delay = f"emulated delay paid {r.injected_s:.3f} s" if r.delay_injected else "no delay injected"
    return "\n".join([
        _hits_line(r, ceiling),
        f"STRR {r.strr:.1%}  STAR {r.star:.1%}  TTFT measured p50 {t.p50:,.2f} ms  p99 {t.p99:,.2f} ms  max "
        f"{t.max:,.2f} ms (reads of hits, room-making and writes of misses)  start lag p50 {lag.p50:,.1f} ms  p99 "
        f"{lag.p99:,.1f} ms",
        f"migrations {units.amount(r.migration_bytes)} = {units.rate(r.migration_gbps)} of wall time  promotions "
        f"{r.promotions:,}  demotions {r.demotions:,} ({r.admission_demotions:,} on the request path)  prefetches "
        f"{r.prefetches:,}  ping-pongs {r.ping_pongs:,}  skipped {r.moves_skipped:,}  failed {r.moves_failed:,}  "
        f"retried {r.moves_retried:,}",
        f"daemon {r.epochs:,} epochs of {r.epoch_s * 1e3:g} ms ({r.epoch_s / r.time_scale * 1e3:g} ms of trace) "
        f"{'in its thread' if r.daemon_thread else 'between requests'}: CPU {r.daemon_cpu_s:.2f} s over "
        f"{r.daemon_wall_s:.2f} s  policy CPU on the request path {r.policy_cpu_s:.2f} s  {delay}",
        f"{r.trace_s:,.1f} s of trace at time scale {r.time_scale:g}: wall {r.wall_s:.2f} s  blocks "
        f"{units.size(r.block_bytes)} standing for {units.size(r.represented_block_bytes)}  checked "
        f"{r.blocks_checked:,}, corrupted {r.blocks_corrupted:,}  tiers: {backings}  origin: {r.origin}",
    ])


@click.command("generate-trace")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder the trace is written to (created if missing).")
@click.option("--name", default=None, metavar="FILE",
              help="File name of the trace in --out (default: <kind>-<requests>-seed<seed>.jsonl).")
@click.option("--kind", type=click.Choice(["mix", *KINDS]), default="mix", show_default=True,
              help="mix = chat 40%, agent 30%, rag 20%, long 10% of requests.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), required=True,
              help="How many requests to generate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed: the same seed, kind and count give the same trace, byte for byte.")
@click.option("--rate", type=Number(0, 1e6), default=4.0, show_default=True,
              help="Requests per second.")
@click.option("--json", "as_json", is_flag=True, help="Print the trace's path and figures as JSON.")
@click.argument("stray", nargs=-1, required=False, metavar="")
def generate_trace(out_dir: Path, name: str | None, kind: str, n_requests: int, seed: int, rate: float,
                   as_json: bool, stray: tuple[str, ...]) -> None:
    """Write a seeded synthetic trace in the Mooncake JSONL format into the folder --out."""
    if stray:  # the file used to be an argument: say what replaced it
        target = Path(stray[0])
        raise click.UsageError(f"the trace is written into a folder: --out {target.parent} --name {target.name} "
                               f"(not a file argument, {stray[0]!r})")
    file_name = name or f"{kind}-{n_requests}-seed{seed}.jsonl"
    if Path(file_name).name != file_name or file_name in (".", ".."):
        raise ConfigError(f"--name {file_name!r}: a file name, not a path (the folder is --out)")
    requests = mix(n_requests, seed=seed, rate=rate) if kind == "mix" else \
        generate(kind, n_requests, seed=seed, rate=rate)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create the folder ({exc.strerror})") from None
    out = out_dir / file_name
    write_trace(out, requests)
    refs = sum(len(r.hash_ids) for r in requests)
    ceiling = ceiling_hit_ratio(requests)
    if as_json:
        click.echo(json.dumps({"path": str(out), "kind": kind, "requests": len(requests), "seed": seed,
                               "rate": rate, "block_references": refs, "ceiling_hit_ratio": ceiling,
                               "arrivals_s": requests[-1].arrival_s}, indent=2))
        return
    click.echo(f"{out}: {len(requests):,} requests, {refs:,} block references, ceiling hit ratio "
               f"{ceiling:.1%}, {requests[-1].arrival_s:,.1f} s of arrivals")


if __name__ == "__main__":  # until both are registered in tieremu.cli: python -m tieremu.cli.replay ...
    click.Group(commands=[replay, generate_trace])()
