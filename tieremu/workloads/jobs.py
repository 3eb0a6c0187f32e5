"""The runner's decode job: real decode over the tiered KV cache (trace replay is replay_job.py).

Each run is one policy at one point of the sweep, in its own worker process. Baselines: `all-fastest` puts every
KV block in the fastest tier with no capacity limit (L100), `all-slowest` in the slowest tier, a file tier (NVMe)
when the map ends with one (L0). Any other policy fills the tiers in the map's order, each up to its `capacity_mib`
(the fastest up to `fast_capacity_mib` when the spec gives it), spilling down through a file tier, with a migration
daemon running the policy in epochs. A tier without `capacity_mib` holds whatever reaches it.

Policy `kernel` (accepted by the runner where the kernel has memory tiers; tieremu/runner/kernel_baseline.py holds
its knobs for the run) places blocks the same way, then leaves their pages to Linux's own tiering (promotion on
NUMA hint faults, demotion on reclaim) with no tieremu daemon, and records the kernel's promotions and demotions
from /proc/vmstat; its rows carry `tiering: kernel-tiering`.

With an emulated GPU tier that has a host link model, the model is taken to run on that GPU: KV read from or
written to any other tier crosses the emulated link, charged by the delay injector and reported (`link_delay_s`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

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
KERNEL_POLICY = "kernel"  # Linux's own tiering as a baseline (the runner's kernel_baseline.py holds its knobs)
KERNEL_LABEL = "kernel-tiering"
DEFAULT_FAST_MIB = 2.0  # the fastest tier's KV capacity for online policies when neither spec nor tier map gives one


@dataclass(frozen=True)
class DecodeParams:
    preset: str
    batch: int
    prompt_tokens: int
    shared_prefix_tokens: int
    decode_steps: int
    block_tokens: int
    layout: str
    fast_capacity_mib: float | None  # the fastest tier's KV capacity for online policies (None: the tier map's)
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
    kernel_baseline: ClassVar[bool] = True  # takes policy `kernel`: Linux's own tiering on its own

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
            fast_capacity_mib=section.get("fast_capacity_mib", float, None,
                                          valid=Range(0, MAX_MIB, lo_closed=False)),
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
        if all(t.capacity_mib is not None for t in tier_map.tiers):
            # Every tier is bounded: a run that cannot fit would fail mid-decode, so refuse it now.
            import torch

            from tieremu.kv.layout import KVLayout
            from tieremu.workloads.llama import preset

            config = preset(params.preset)
            layout = KVLayout(config.layers, config.kv_heads, config.head_dim, params.block_tokens, torch.float32,
                              params.layout)
            room = sum(_capacities(tier_map, params, layout).values())
            need = _blocks_needed(params, layout)
            if room < need:
                given = ", ".join(f"{t.name} {t.capacity_mib}" for t in tier_map.tiers)
                return "tiers", (f"tier map {tier_map.name!r} holds {room} KV blocks of {layout.block_bytes >> 10} "
                                 f"KiB in all (capacity_mib {given}); the decode may need {need}: raise a "
                                 "capacity_mib or lower batch / prompt_tokens")
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
        order = [t.name for t in ctx.resolved.tiers]
        fast, slowest = order[0], order[-1]
        whole = _blocks_needed(params, layout)
        policy_name = ctx.policy or "all-fastest"
        daemon = None
        kernel = _KernelRun.start() if policy_name == KERNEL_POLICY else None
        if policy_name in ("all-fastest", "all-slowest"):
            # A bound holds the whole run in its one tier, whatever the map's capacities (L100 / L0).
            bound = fast if policy_name == "all-fastest" else slowest
            capacities = {name: whole for name in order}
            placement = Vector({bound: 1.0})
        else:
            capacities = _capacities(ctx.resolved.tier_map, params, layout)
            placement = Spill()
        device = decode_device(params.device, ctx.resolved)
        model = LlamaModel(config, seed=params.seed, device=device)
        injector = ctx.injector()
        with TieredKVCache(ctx.resolved, layout, capacities=capacities, placement=placement,
                           injector=injector, device=device, kernel_managed=kernel is not None) as cache:
            TierCompression.attach(cache)  # tiers with `compression:` hold their blocks compressed
            if policy_name not in ("all-fastest", "all-slowest", KERNEL_POLICY):
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
        rows = (_decode_rows(ctx, result, report, resident, fast, layout.block_bytes) + audit_rows(ctx, injector)
                + _link_rows(ctx, injector) + _file_rows(ctx, result))
        rows += compression_rows(ctx, cache, model, spec)  # none unless a tier is compressed
        if report is not None:
            rows += _migration_windows(ctx, report.records, span, TIMELINE_EPOCHS * params.epoch_ms / 1e3)
        if kernel is not None:
            rows = kernel.finish(ctx, rows, tier_origin(ctx.resolved.tier(fast)))
        return rows


class _KernelRun:
    """Policy `kernel`: checks that the kernel can tier and is set to, snapshots its counters, and reports what it
    did. The knobs themselves are held by the runner around the run (lab profile kernel-tiering, restored after)."""

    def __init__(self, tiering: Any, before: Any) -> None:
        self.tiering = tiering
        self.before = before

    @classmethod
    def start(cls) -> _KernelRun:
        from tieremu.daemon.kernel import KernelTiering
        from tieremu.errors import WorkloadError

        tiering = KernelTiering()
        where = tiering.applicability()
        if not where.applicable:
            raise WorkloadError(f"policy {KERNEL_POLICY!r} (kernel-tiering) cannot act here: {where.reason}")
        knobs = tiering.knobs()
        if not knobs.ready:  # run outside the runner, which holds the lab profile for the run
            raise WorkloadError(f"policy {KERNEL_POLICY!r} (kernel-tiering) needs the kernel's tiering on: "
                                f"{knobs.describe()}")
        return cls(tiering, tiering.snapshot())

    def finish(self, ctx: RunContext, rows: list[MetricRow], origin: str) -> list[MetricRow]:
        delta = self.tiering.delta(self.before, self.tiering.snapshot())
        facts = delta.to_dict()
        rows = [*rows, ctx.row("kernel_promoted_pages", delta.promoted, "pages", origin, **facts),
                ctx.row("kernel_demoted_pages", delta.demoted, "pages", origin, **facts)]
        for row in rows:
            row.params["tiering"] = KERNEL_LABEL
        return rows


def _blocks_needed(params: DecodeParams, layout: Any) -> int:
    """KV blocks a decode run can hold at once: every prompt at its longest, plus the decoded tokens."""
    return params.batch * layout.blocks_for(params.prompt_tokens * 5 // 4 + params.decode_steps + 1) + 8


def _capacities(tier_map: TierMap, params: DecodeParams, layout: Any) -> dict[str, int]:
    """Blocks per tier for an online policy: each tier's capacity_mib (the fastest's from fast_capacity_mib when
    given, 2 MiB when neither says), a tier without one as much as the whole run needs."""
    whole = _blocks_needed(params, layout)
    out = {}
    for i, tier in enumerate(tier_map.tiers):
        mib = tier.capacity_mib
        if i == 0 and params.fast_capacity_mib is not None:
            mib = params.fast_capacity_mib
        elif i == 0 and mib is None:
            mib = DEFAULT_FAST_MIB
        out[tier.name] = whole if mib is None else max(1 if i == 0 else 0, int(mib * MIB) // layout.block_bytes)
    return out


def _link_rows(ctx: RunContext, injector: Any) -> list[MetricRow]:
    """Per emulated GPU tier with a host link model: the link's time injected, with the model's parameters."""
    if injector is None:
        return []
    return [ctx.row("link_delay_s", a.injected_ns / 1e9, "s", "emulated", tier=tier,
                    model="emulated host link (PCIe)", gbps=a.gbps, latency_us=a.latency_ns / 1e3,
                    charged_bytes=a.charged_bytes, transfers=a.transfers, owed_s=a.owed_ns / 1e9,
                    accounting_s=a.accounting_ns / 1e9,
                    device_reads="blocks in the tier are read at host memory speed, nothing injected")
            for tier, a in injector.link_audits.items()]


def _file_rows(ctx: RunContext, result: Any) -> list[MetricRow]:
    """Per file tier, what went through its file during decode: real I/O, timed (GB/s of the reads)."""
    rows = []
    for tier, io in result.file_io.items():
        if not io.reads and not io.writes:
            continue
        gbps = io.bytes_read / io.read_s / 1e9 if io.read_s > 0 else 0.0
        rows.append(ctx.row("file_read_gbps", gbps, "GB/s", tier_origin(ctx.resolved.tier(tier)), tier=tier,
                            **io.to_dict(), through="pread of each block's layer span into a bounce buffer",
                            speed="device (O_DIRECT)" if io.direct else "page cache (the filesystem refused "
                            "O_DIRECT)"))
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
        rows.append(ctx.row("kv_bytes_read", result.kv_bytes_read[tier], "B", tier_row_origin, tier=tier,
                            blocks_resident=resident.get(tier, 0)))
        rows += [ctx.row("kv_step_bytes_read", step[tier], "B", tier_row_origin, tier=tier, sample=i)
                 for i, step in enumerate(result.kv_bytes_read_by_step)]
    out_tokens = len(result.tpot_s) * len(result.ttft_s) or 1
    linked = any(t.timing is not None and t.timing.link is not None for t in ctx.resolved.tiers)
    for tier, staged in result.kv_bytes_staged.items():
        if staged:  # a model on a GPU (or an emulated one with a link) stages host -> device bytes per source tier
            staged_origin = "emulated" if linked else tier_origin(ctx.resolved.tier(tier))
            rows.append(ctx.row("kv_staged_bytes_per_token", staged / out_tokens, "B", staged_origin, tier=tier))
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
