"""The runner's decode job: real decode over the tiered KV cache (trace replay is replay_job.py).

Each run is one policy at one point of the sweep, in its own worker process. Baselines: `all-fastest` puts every
KV block in the fastest memory tier with no capacity limit (L100), `all-slowest` in the slowest memory tier (L0);
any other policy gets the fast tier limited to `fast_capacity_mib` and a migration daemon running it in epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tieremu.configfile import Section
from tieremu.numbers import MAX_COUNT, MAX_GBPS, MAX_MIB, MAX_SECONDS, MAX_THREADS, MAX_TOKENS, SEED, Range
from tieremu.record.row import MetricRow
from tieremu.tiers.config import TierMap
from tieremu.tiers.resolve import ResolvedTierMap
from tieremu.workloads.job import Job, RunContext, audit_rows, tier_origin

MIB = 1 << 20
TIMELINE_EPOCHS = 5  # daemon epochs per window of the migrations-over-time series
DEVICES = ("auto", "cpu", "cuda")
MAX_BATCH = 4096  # sequences decoded together: past any serving batch
MAX_BLOCK_TOKENS = 4096  # tokens per KV block: paged caches use 16-256


@dataclass(frozen=True)
class DecodeParams:
    preset: str
    batch: int
    prompt_tokens: int
    shared_prefix_tokens: int
    decode_steps: int
    block_tokens: int
    layout: str
    fast_capacity_mib: float  # the fastest tier's KV capacity for online policies
    epoch_ms: float
    budget_gbps: float | None
    seed: int
    threads: int  # torch intra-op threads: 1 leaves a core to the daemon and keeps OpenMP spin-waits out of TPOT
    device: str = "auto"  # where the model runs: auto (a real cuda tier's GPU, else the CPU), cpu or cuda


def decode_device(requested: str, resolved: ResolvedTierMap) -> str:
    """The torch device a decode runs on: `auto` is the GPU of the map's first real cuda tier (its HBM is the
    working set), else the CPU; `cuda` is that same GPU, or device 0 when the map has no real cuda tier (every KV
    block is then staged from host tiers)."""
    gpu = next((t.device for t in resolved.tiers if t.device is not None), None)
    if requested == "auto":
        return gpu or "cpu"
    if requested == "cuda":
        return gpu or "cuda:0"
    return requested


class DecodeJob(Job):
    kind = "decode"
    repetitions = 3  # a timing job: enough runs for a confidence interval
    takes_policies = True

    @classmethod
    def parse(cls, section: Section) -> DecodeParams:
        from tieremu.kv.layout import LAYOUTS

        budget = section.get("budget_gbps", float, None, valid=Range(0, MAX_GBPS, lo_closed=False))
        params = DecodeParams(
            preset=section.get("preset", str, "tiny", choices=("tiny", "small", "1b")),
            batch=section.get("batch", int, 4, valid=Range(1, MAX_BATCH, integer=True)),
            prompt_tokens=section.get("prompt_tokens", int, 512, valid=Range(1, MAX_TOKENS, integer=True)),
            shared_prefix_tokens=section.get("shared_prefix_tokens", int, 128,
                                             valid=Range(0, MAX_TOKENS, integer=True)),
            decode_steps=section.get("decode_steps", int, 32, valid=Range(1, MAX_COUNT, integer=True)),
            block_tokens=section.get("block_tokens", int, 16, valid=Range(1, MAX_BLOCK_TOKENS, integer=True)),
            layout=section.get("layout", str, "all-layers", choices=LAYOUTS),
            fast_capacity_mib=section.get("fast_capacity_mib", float, 2.0, valid=Range(0, MAX_MIB, lo_closed=False)),
            epoch_ms=section.get("epoch_ms", float, 10.0, valid=Range(0, MAX_SECONDS * 1000, lo_closed=False)),
            budget_gbps=budget,
            seed=section.get("seed", int, 0, valid=SEED),
            threads=section.get("threads", int, 1, valid=Range(1, MAX_THREADS, integer=True)),
            device=section.get("device", str, "auto", choices=DEVICES),
        )
        section.done()
        if params.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise section.error("device", "'cuda' asked, but there is no CUDA device here "
                                    "(torch.cuda.is_available() is False); use device: auto (the GPU when the tier "
                                    "map has a real cuda tier, else the CPU) or cpu")
        if not 0 <= params.shared_prefix_tokens < params.prompt_tokens * 3 // 4:
            raise section.error("shared_prefix_tokens", f"{params.shared_prefix_tokens}: must be 0 or more and below "
                                f"3/4 of prompt_tokens ({params.prompt_tokens * 3 // 4})")
        return params

    @classmethod
    def validate(cls, params: DecodeParams, tier_map: TierMap) -> tuple[str, str] | None:
        if not [t for t in tier_map.tiers if not t.is_file]:
            return "tiers", f"tier map {tier_map.name!r} has no memory tier to hold KV blocks"
        return None

    @classmethod
    def run(cls, params: DecodeParams, ctx: RunContext) -> list[MetricRow]:
        import torch

        from tieremu.kv.cache import TieredKVCache
        from tieremu.kv.compress_store import TierCompression
        from tieremu.kv.layout import KVLayout
        from tieremu.kv.placement import Spill, Vector
        from tieremu.workloads.compress_decode import compression_rows
        from tieremu.workloads.decode import DecodeSpec, run_decode
        from tieremu.workloads.llama import LlamaModel, preset

        config = preset(params.preset)
        torch.set_num_threads(params.threads)
        torch.manual_seed(params.seed + ctx.seed)
        spec = DecodeSpec(batch=params.batch, prompt_tokens=params.prompt_tokens,
                          shared_prefix_tokens=params.shared_prefix_tokens, decode_steps=params.decode_steps,
                          seed=params.seed + ctx.seed)
        layout = KVLayout(config.layers, config.kv_heads, config.head_dim, params.block_tokens, torch.float32,
                          params.layout)
        memory = [t.name for t in ctx.resolved.tiers if not t.spec.is_file]
        fast, slowest = memory[0], memory[-1]
        # Every memory tier can hold the whole run (so a run never fails for space) except the fast tier under an
        # online policy: its limit is what the policy must work with.
        whole = params.batch * layout.blocks_for(params.prompt_tokens * 5 // 4 + params.decode_steps + 1) + 8
        capacities = {t.name: whole for t in ctx.resolved.tiers}
        policy_name = ctx.policy or "all-fastest"
        daemon = None
        if policy_name == "all-fastest":
            placement = Vector({fast: 1.0})
        elif policy_name == "all-slowest":
            placement = Vector({slowest: 1.0})
        else:
            capacities[fast] = max(1, int(params.fast_capacity_mib * MIB) // layout.block_bytes)
            placement = Spill()
        device = decode_device(params.device, ctx.resolved)
        model = LlamaModel(config, seed=params.seed, device=device)
        injector = ctx.injector()
        with TieredKVCache(ctx.resolved, layout, capacities=capacities, placement=placement,
                           injector=injector, device=device) as cache:
            TierCompression.attach(cache)  # tiers with `compression:` hold their blocks compressed
            if policy_name not in ("all-fastest", "all-slowest"):
                from tieremu.daemon.daemon import MigrationDaemon
                from tieremu.policy.registry import get_policy

                daemon = MigrationDaemon(cache, get_policy(policy_name), epoch_s=params.epoch_ms / 1e3,
                                         budget_gbps=params.budget_gbps)
                daemon.start()
            began = time.monotonic()
            try:
                result = run_decode(model, cache, spec)
            finally:
                report = daemon.stop() if daemon is not None else None
            span = (began, time.monotonic())
            resident = {t: cache.pool.used(t) for t in cache.pool.order}
        rows = _decode_rows(ctx, result, report, resident, fast, layout.block_bytes) + audit_rows(ctx, injector)
        rows += compression_rows(ctx, cache, model, spec)  # none unless a tier is compressed
        if report is not None:
            rows += _migration_windows(ctx, report.records, span, TIMELINE_EPOCHS * params.epoch_ms / 1e3)
        return rows


def _migration_windows(ctx: RunContext, records: Any, span: tuple[float, float], window_s: float) -> list[MetricRow]:
    """The daemon's migrations over the run, window by window (the report's migrations-over-time plot)."""
    from tieremu.daemon.timeline import migration_timeline

    order = [t.name for t in ctx.resolved.tiers]
    windows = migration_timeline(records, order, start=span[0], end=span[1], window_s=window_s)
    origin = "emulated" if any(t.timing is not None for t in ctx.resolved.tiers) else "measured"
    return [ctx.row("window_migration_gbps", w.gbps, "GB/s", origin, sample=i, time_s=round(w.start_s, 6),
                    window_s=round(w.seconds, 6), bytes=w.bytes, promotions=w.promotions, demotions=w.demotions,
                    failed=w.failed)
            for i, w in enumerate(windows)]


def _decode_rows(ctx: RunContext, result: Any, report: Any, resident: dict[str, int], fast: str,
                 block_bytes: int) -> list[MetricRow]:
    emulated = {t.name for t in ctx.resolved.tiers if t.timing is not None}
    touched = {t for t, b in result.kv_bytes_read.items() if b} | {t for t, n in resident.items() if n}
    origin = "emulated" if touched & emulated else tier_origin(ctx.resolved.tier(fast))
    rows = [ctx.row("ttft_ms", s * 1e3, "ms", origin, sample=i) for i, s in enumerate(result.ttft_s)]
    rows += [ctx.row("tpot_ms", s * 1e3, "ms", origin, sample=i) for i, s in enumerate(result.tpot_s)]
    rows.append(ctx.row("tokens_per_s", result.tokens_per_s, "tokens/s", origin))
    for tier, per_token in result.kv_bytes_per_token.items():
        tier_row_origin = tier_origin(ctx.resolved.tier(tier))
        rows.append(ctx.row("kv_bytes_per_token", per_token, "B", tier_row_origin, tier=tier))
    out_tokens = len(result.tpot_s) * len(result.ttft_s) or 1
    for tier, staged in result.kv_bytes_staged.items():
        if staged:  # only a model on a GPU stages: host -> device bytes per generated token, per source tier
            rows.append(ctx.row("kv_staged_bytes_per_token", staged / out_tokens, "B",
                                tier_origin(ctx.resolved.tier(tier)), tier=tier))
    total_read = sum(result.kv_bytes_read.values()) or 1
    rows.append(ctx.row("star", sum(b for t, b in result.kv_bytes_read.items() if t != fast) / total_read,
                        "fraction", origin))
    total_resident = sum(resident.values()) or 1
    rows.append(ctx.row("strr", sum(n for t, n in resident.items() if t != fast) / total_resident, "fraction",
                        origin))
    for when, placed in (("start", result.placement_start), ("end", result.placement_end)):
        for p in placed:
            if not p.blocks:
                continue  # nothing there to ask the kernel about
            rows.append(ctx.row("placement_fraction", p.on_tier, "fraction", tier_origin(ctx.resolved.tier(p.tier)),
                                tier=p.tier, phase=when, blocks=p.blocks, pages=p.pages))
    rows.append(ctx.row("prefix_tokens", float(sum(result.prefix_tokens)), "tokens", origin))
    rows.append(ctx.row("injected_delay_s", result.injected_s, "s", "emulated" if emulated else origin,
                        accounting_s=result.accounting_s))
    if report is not None:
        rows += [ctx.row("migration_gbps", report.migration_gbps, "GB/s", origin, moved=report.moved,
                         failed=report.failed, skipped=report.skipped, bytes=report.bytes),
                 ctx.row("daemon_cpu_s", report.cpu_seconds, "s", "measured", epochs=report.epochs)]
    return rows
