"""`tieremu replay` (a trace against a tier map under a policy) and `tieremu generate-trace` (a synthetic trace).

The tier map's order is the tier order; a tier's capacity in blocks is its `capacity_mib` over the block size,
or `--capacity TIER=BLOCKS`. The map is only read, never resolved against this machine: simulate needs no memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.table import Table

from tieremu.errors import ConfigError
from tieremu.policy.registry import get_policy, names
from tieremu.tiers.config import TierMap, TierSpec, load_tier_map
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

# Local DRAM read bandwidth assumed for the TTFT estimate when this machine has no calibration cached.
ASSUMED_LOCAL_READ_GBPS = 20.0


@dataclass(frozen=True)
class ReadBandwidth:
    """Per-tier read GB/s for the TTFT estimate, and where the local figure came from."""

    by_tier: dict[str, float]
    local_gbps: float
    local_source: str  # "--local-gbps" | "calibration" | "assumed"


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
            blocks = (spec.capacity_mib << 20) // block_bytes
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
    return ReadBandwidth(by_tier, local_gbps, source)


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


@click.command("replay")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("--tiers", "tier_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Tier map (configs/tiers/*.yaml): its order is the tier order, fastest first.")
@click.option("--policy", required=True, help=f"Policy name: {', '.join(names())}, or package.module:Class.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A policy parameter (repeatable).")
@click.option("--mode", type=click.Choice(["simulate"]), default="simulate", show_default=True,
              help="simulate: accounting only, no memory touched.")
@click.option("--capacity", multiple=True, metavar="TIER=BLOCKS",
              help="A tier's capacity in blocks (repeatable); overrides the map's capacity_mib.")
@click.option("--block-mib", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BLOCK_BYTES / 2**20,
              show_default=True, help="KV bytes of one block (512 tokens of Llama-3-8B in fp16: 64 MiB).")
@click.option("--read-gbps", multiple=True, metavar="TIER=GBPS",
              help="A tier's read bandwidth for the TTFT estimate (repeatable); default from its emulate target.")
@click.option("--local-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Local DRAM read GB/s that bandwidth ratios refer to (default: calibration, else 20).")
@click.option("--epoch-ms", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_EPOCH_S * 1e3,
              show_default=True, help="Policy epoch, in trace milliseconds.")
@click.option("--prefill-tokens-per-s", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_PREFILL_TOKENS_PER_S, show_default=True, help="Cost of a missed token in the TTFT "
              "estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(trace: str, tier_file: str, policy: str, params: tuple[str, ...], mode: str, capacity: tuple[str, ...],
           block_mib: float, read_gbps: tuple[str, ...], local_gbps: float | None, epoch_ms: float,
           prefill_tokens_per_s: float, as_json: bool) -> None:
    """Replay a Mooncake-format TRACE against a tier map under a placement policy."""
    block_bytes = int(block_mib * 2**20)
    tier_map = load_tier_map(tier_file)
    capacities = {k: int(_number(v, int, "--capacity")) for k, v in _pairs(capacity, "--capacity")}
    tiers = sim_tiers(tier_map, block_bytes, capacities)
    bandwidths = {k: _number(v, float, "--read-gbps") for k, v in _pairs(read_gbps, "--read-gbps")}
    bandwidth = read_bandwidth(tier_map, bandwidths, local_gbps)
    requests = read_trace(trace)
    policy_params = parse_params(params)
    chosen = get_policy(policy, policy_params, policy_context(requests, epoch_ms / 1e3))
    result = simulate(requests, tiers, chosen, epoch_s=epoch_ms / 1e3, block_bytes=block_bytes,
                      tier_read_gbps=bandwidth.by_tier, prefill_tokens_per_s=prefill_tokens_per_s,
                      params=policy_params)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    console = Console(width=max(120, Console().width))
    console.print(replay_table(result, Path(trace).name, tier_map.name))
    console.print(replay_summary(result, ceiling_hit_ratio(requests), bandwidth))


def _number(value: str, kind: type[int] | type[float], option: str) -> float:
    try:
        return kind(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a{'n integer' if kind is int else ' number'}",
                                 param_hint=option) from None


def replay_table(result: ReplayResult, trace: str, tier_map: str) -> Table:
    table = Table(title=f"Replay of {trace} on {tier_map} under {result.policy} ({result.origin})")
    for col in ("tier", "capacity blocks", "hits", "hit ratio", "residency", "resident at end", "read GB/s"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for t in result.tiers:
        table.add_row(t.name, "unlimited" if t.capacity_blocks is None else f"{t.capacity_blocks:,}", f"{t.hits:,}",
                      f"{t.hit_ratio:.1%}", f"{t.residency:.1%}", f"{t.resident_blocks:,}",
                      "-" if t.read_gbps is None else f"{t.read_gbps:.1f}")
    if result.capacity_lifted:
        table.caption = f"{result.policy} is a bound: every tier was treated as unlimited"
    return table


def replay_summary(result: ReplayResult, ceiling: float, bandwidth: ReadBandwidth) -> str:
    r, t = result, result.ttft_ms
    return "\n".join([
        f"requests {r.requests:,}  references {r.references:,}  hit ratio {r.hit_ratio:.1%} (ceiling {ceiling:.1%})"
        f"  misses {r.misses:,}  evictions {r.evictions:,}" + (f"  uncached {r.uncached:,}" if r.uncached else ""),
        f"STRR {r.strr:.1%}  STAR {r.star:.1%}  TTFT estimate p50 {t.p50:,.1f} ms  p99 {t.p99:,.1f} ms  "
        f"max {t.max:,.1f} ms  (prefill {r.prefill_tokens_per_s:,.0f} tokens/s; local read "
        f"{bandwidth.local_gbps:.1f} GB/s, {bandwidth.local_source})",
        f"migrations {r.migration_bytes / 2**30:,.1f} GiB = {r.migration_gbps:.3f} GB/s of trace time  promotions "
        f"{r.promotions:,}  demotions {r.demotions:,}  prefetches {r.prefetches:,}  ping-pongs {r.ping_pongs:,}"
        + (f"  skipped moves {r.moves_skipped:,}" if r.moves_skipped else ""),
        f"{r.epochs:,} epochs over {r.trace_s:,.1f} s of trace  wall {r.wall_s:.2f} s  policy CPU "
        f"{r.policy_cpu_s:.2f} s  block {r.block_bytes / 2**20:g} MiB  origin: {r.origin}",
    ])


@click.command("generate-trace")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--kind", type=click.Choice(["mix", *KINDS]), default="mix", show_default=True,
              help="mix = chat 40%, agent 30%, rag 20%, long 10% of requests.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Requests per second.")
def generate_trace(out: str, kind: str, n_requests: int, seed: int, rate: float) -> None:
    """Write a seeded synthetic trace in the Mooncake JSONL format to OUT."""
    requests = mix(n_requests, seed=seed, rate=rate) if kind == "mix" else \
        generate(kind, n_requests, seed=seed, rate=rate)
    write_trace(out, requests)
    refs = sum(len(r.hash_ids) for r in requests)
    click.echo(f"{out}: {len(requests):,} requests, {refs:,} block references, ceiling hit ratio "
               f"{ceiling_hit_ratio(requests):.1%}, {requests[-1].arrival_s:,.1f} s of arrivals")


if __name__ == "__main__":  # until both are registered in tieremu.cli: python -m tieremu.workloads.replay_cli ...
    click.Group(commands=[replay, generate_trace])()
