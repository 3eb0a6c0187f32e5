"""The runner's trace-replay job: a Mooncake-format trace, read from a file or generated from a seed, replayed
under a placement policy with the fastest tier limited and the slower ones unlimited.

`mode: simulate` (default) is accounting only: hit ratios, STRR/STAR, migrations and a TTFT estimate, labelled
`simulated`; every move costs its bytes over the tier pair's bandwidth within `budget_gbps`, `pin: false` turns
pinning off, and each result is checked against its bounds (a `bound_check` row per bound, 0 when outside it).
The fast tier is `fast_capacity`: blocks, or a share of the trace's distinct blocks (`10%`).

`mode: execute` stores every trace block as a real KV block in the tier arenas and runs the migration daemon beside
arrivals replayed in scaled wall time (tieremu.workloads.execute): TTFT is measured, emulated tiers pay their delay
and carry their audit, and every resident block is checked afterwards (a corrupted block fails the run). Both modes
write the same metrics, so one report compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tieremu.configfile import Section, positive
from tieremu.errors import ConfigError, WorkloadError
from tieremu.record.row import MetricRow
from tieremu.workloads.capacity import Capacity
from tieremu.workloads.job import Job, RunContext, audit_rows

MIB = 1 << 20
MODES = ("simulate", "execute")
GENERATOR_KINDS = ("mix", "chat", "agent", "rag", "long")
MIN_EPOCH_WALL_S = 0.001  # execute: the daemon's period in wall time (as tieremu.workloads.execute.MIN_EPOCH_S)


@dataclass(frozen=True)
class TraceSource:
    """Where the requests come from: a trace file, or a seeded generator (`tieremu generate-trace` in memory)."""

    path: str | None = None
    kind: str | None = None  # generator: mix or one of its kinds
    requests: int = 0
    seed: int = 0
    rate: float = 4.0  # requests per second

    def load(self) -> list[Any]:
        from tieremu.workloads.generators import generate, mix
        from tieremu.workloads.trace import read_trace

        if self.path is not None:
            return read_trace(self.path)
        if self.kind == "mix":
            return mix(self.requests, seed=self.seed, rate=self.rate)
        return generate(str(self.kind), self.requests, seed=self.seed, rate=self.rate)


@dataclass(frozen=True)
class ReplayParams:
    source: TraceSource
    max_requests: int | None
    mode: str
    fast_capacity: Capacity
    block_mib: float  # the KV a trace block stands for (simulate's byte figures; execute's label)
    epoch_s: float  # the policy's epoch, trace seconds
    time_scale: float  # execute: wall seconds per trace second
    block_kib: int  # execute: what a block really takes in memory here
    budget_gbps: float | None  # the migration budget of every move (execute: the daemon's token bucket)
    pin: bool = True  # simulate: pin the blocks a request has read while it is served


class ReplayJob(Job):
    """Trace replay, simulated or executed: the fastest tier limited, the others unlimited."""

    kind = "replay"
    takes_policies = True
    bounds = ("belady",)  # the trace is known ahead: the bound of demand caches runs beside every policy
    input_files = ("trace",)
    # The static bounds hold every block in one tier that is never limited and never move one: the fast tier's size,
    # pinning and the migration budget change nothing of theirs, so sweeping those runs them once.
    bound_ignores = dict.fromkeys(("all-fastest", "all-slowest"), frozenset(
        {"fast_capacity", "fast_capacity_blocks", "pin", "budget_gbps"}))

    @classmethod
    def parse(cls, section: Section) -> ReplayParams:
        params = ReplayParams(
            source=_source(section),
            max_requests=section.get("max_requests", int, None, check=positive),
            mode=section.get("mode", str, "simulate", choices=MODES),
            fast_capacity=_fast_capacity(section),
            block_mib=section.get("block_mib", float, 64.0, check=positive),
            epoch_s=section.get("epoch_ms", float, 50.0, check=positive) / 1e3,
            time_scale=section.get("time_scale", float, 0.2, check=positive),
            block_kib=section.get("block_kib", int, 64, check=positive),
            budget_gbps=section.get("budget_gbps", float, None, check=positive),
            pin=section.get("pin", bool, True),
        )
        section.done()
        if not params.pin and params.mode == "execute":
            raise section.error("pin", "pin: false is for simulate mode; execute always pins the request's blocks")
        if params.mode == "execute":
            if params.epoch_s * params.time_scale < MIN_EPOCH_WALL_S:
                raise section.error("epoch_ms", f"{params.epoch_s * 1e3:g} ms of trace at time_scale "
                                    f"{params.time_scale} is an epoch of {params.epoch_s * params.time_scale * 1e3:g} "
                                    f"ms of wall time, below {MIN_EPOCH_WALL_S * 1e3:g} ms; raise epoch_ms or "
                                    "time_scale")
            from tieremu.workloads.execute import scaled_layout  # torch: only for execute specs

            try:
                scaled_layout(params.block_kib)
            except ConfigError as exc:
                raise section.error("block_kib", str(exc)) from None
        return params

    @classmethod
    def run(cls, params: ReplayParams, ctx: RunContext) -> list[MetricRow]:
        from tieremu.policy.registry import get_policy
        from tieremu.workloads.simulate import policy_context

        requests = params.source.load()[: params.max_requests]
        if not requests:
            raise WorkloadError(f"replay: {params.source.path or 'the generator'} gave no request")
        policy = get_policy(ctx.policy or "all-fastest", None, policy_context(requests, params.epoch_s))
        if params.mode == "execute":
            return _execute(params, ctx, requests, policy)
        return _simulate(params, ctx, requests, policy)


def _fast_capacity(section: Section) -> Capacity:
    """`fast_capacity: BLOCKS | P%`, or the older `fast_capacity_blocks: N`; 100 blocks if neither is given."""
    if section.has("fast_capacity") and section.has("fast_capacity_blocks"):
        raise section.error("fast_capacity", "give fast_capacity or fast_capacity_blocks, not both")
    key = "fast_capacity" if section.has("fast_capacity") else "fast_capacity_blocks"
    raw = section.get(key, (int, str), 100)
    try:
        return Capacity.parse(raw, key)
    except ConfigError as exc:
        raise section.error(key, str(exc)) from None


def _source(section: Section) -> TraceSource:
    """`trace: FILE` or `generate: {kind, requests, seed, rate}`, exactly one."""
    has_trace, has_generate = section.has("trace"), section.has("generate")
    if has_trace == has_generate:
        raise section.error("trace", "give a trace file (trace: FILE) or a generator (generate: {kind: mix, "
                            "requests: N}), exactly one" + (", not both" if has_trace else ""))
    if has_trace:
        path = section.relative_path(section.get("trace", str))
        if not path.is_file():
            raise section.error("trace", f"{path}: no such trace file")
        return TraceSource(path=str(path))
    gen = section.section("generate")
    source = TraceSource(kind=gen.get("kind", str, "mix", choices=GENERATOR_KINDS),
                         requests=gen.get("requests", int, check=positive), seed=gen.get("seed", int, 0),
                         rate=gen.get("rate", float, 4.0, check=positive))
    gen.done()
    return source


def _capacities(params: ReplayParams, ctx: RunContext, requests: list[Any]) -> dict[str, int | None]:
    from tieremu.workloads.capacity import distinct_blocks

    names = [t.name for t in ctx.resolved.tiers]
    distinct = distinct_blocks(requests) if params.fast_capacity.share is not None else 0
    fast = params.fast_capacity.resolve(distinct, "fast_capacity")
    return {name: fast if i == 0 else None for i, name in enumerate(names)}


def _simulate(params: ReplayParams, ctx: RunContext, requests: list[Any], policy: Any) -> list[MetricRow]:
    from tieremu.kv.compress_tiers import effective_read_gbps, tier_codecs
    from tieremu.workloads.bounds import check
    from tieremu.workloads.simulate import SimTier, simulate

    tiers = [SimTier(name, blocks) for name, blocks in _capacities(params, ctx, requests).items()]
    # A compressed tier's hit reads fewer bytes, then pays the dequantization (kv/compress_tiers.py).
    specs, raw_gbps = {t.name: t.spec for t in ctx.resolved.tiers}, tier_read_gbps(ctx)
    read_gbps = effective_read_gbps(specs, raw_gbps)
    # Its moves carry the compressed bytes over the raw rates, plus the (de)compression (kv/compress_tiers.py).
    settings = {"epoch_s": params.epoch_s, "block_bytes": int(params.block_mib * MIB), "tier_read_gbps": read_gbps,
                "tier_codecs": tier_codecs(specs, raw_gbps)}
    r = simulate(requests, tiers, policy, pin=params.pin, budget_gbps=params.budget_gbps,
                 **settings)  # type: ignore[arg-type]
    # 1 within the bound, 0 outside it: a result outside its bounds is a bug, and the report shows the row.
    bounds = [ctx.row("bound_check", float(b.within), "fraction", r.origin, bound=b.bound, metric_checked=b.metric,
                      checked_value=b.value, limit=b.limit) for b in check(requests, tiers, r, **settings)]
    # Inputs of the estimate, so simulated like it; `backing` says whether the rate is a tier's target.
    rows = [ctx.row("read_gb_per_s", gbps, "GB/s", r.origin, tier=name, backing=ctx.resolved.tier(name).label,
                    use="TTFT estimate: a hit's block is read at this rate")
            for name, gbps in read_gbps.items()]
    return _result_rows(ctx, r) + rows + bounds


def _execute(params: ReplayParams, ctx: RunContext, requests: list[Any], policy: Any) -> list[MetricRow]:
    from tieremu.workloads.execute import execute, scaled_layout

    injector = ctx.injector()
    r = execute(requests, ctx.resolved, policy, block_layout=scaled_layout(params.block_kib),
                capacities=_capacities(params, ctx, requests), time_scale=params.time_scale,
                epoch_s=params.epoch_s * params.time_scale, budget_gbps=params.budget_gbps, injector=injector,
                represented_block_bytes=int(params.block_mib * MIB), seed=ctx.seed)
    if r.blocks_corrupted:
        raise WorkloadError(f"{r.blocks_corrupted} of {r.blocks_checked} KV blocks did not hold what was written "
                            "to them after the replay: a migration or copy lost data")
    rows = _result_rows(ctx, r)
    # How late requests started against their scaled arrival (the replay's own pacing): p99, with p50 and max.
    rows += [ctx.row("start_lag_ms", r.lag_ms.p99, "ms", "measured", p50=r.lag_ms.p50, max=r.lag_ms.max),
             ctx.row("daemon_cpu_s", r.daemon_cpu_s, "s", "measured", epochs=r.epochs, wall_s=r.daemon_wall_s),
             ctx.row("blocks_checked", float(r.blocks_checked), "blocks", r.origin, corrupted=r.blocks_corrupted),
             ctx.row("moves_failed", float(r.moves_failed), "blocks", r.origin, retried=r.moves_retried,
                     skipped=r.moves_skipped, reasons=r.daemon_reasons)]
    return rows + audit_rows(ctx, injector)


def _result_rows(ctx: RunContext, r: Any) -> list[MetricRow]:
    """The figures both modes share, with the result's own origin (simulated, measured or emulated)."""
    rows = [ctx.row("hit_ratio", r.hit_ratio, "fraction", r.origin)]
    rows += [ctx.row("hit_ratio", t.hit_ratio, "fraction", r.origin, tier=t.name) for t in r.tiers]
    rows += [ctx.row("ttft_ms", v, "ms", r.origin, sample=i) for i, v in enumerate(r.ttft_samples_ms)]
    for metric, value, unit in (("strr", r.strr, "fraction"), ("star", r.star, "fraction"),
                                ("migration_gbps", r.migration_gbps, "GB/s"),
                                ("promotions", r.promotions, "blocks"), ("demotions", r.demotions, "blocks"),
                                ("ping_pongs", r.ping_pongs, "blocks"), ("evictions", r.evictions, "blocks"),
                                ("policy_cpu_s", r.policy_cpu_s, "s")):
        rows.append(ctx.row(metric, float(value), unit, r.origin))
    return rows


def tier_read_gbps(ctx: RunContext) -> dict[str, float]:
    """Per tier, the read bandwidth that a hit's block costs in simulate's TTFT estimate: an emulated or shaped
    tier's target, a real tier's calibrated node bandwidth. A tier with neither is left out (its hits cost no
    read time), which happens only on a machine never calibrated whose tiers are all real."""
    from tieremu.probe.calibrate import load_cached  # reads the cache; never measures

    cal = ctx.calibration or load_cached()
    out = {}
    for tier in ctx.resolved.tiers:
        if tier.timing is not None:
            out[tier.name] = tier.timing.target_bandwidth_gbps["read"]
        elif cal is not None and tier.nodes and tier.nodes[0] in cal.read_gbps_by_node:
            out[tier.name] = cal.read_gbps_by_node[tier.nodes[0]]
    return out
