"""What a sweep can run: the job interface, the registry of job kinds, and the jobs shipped with the runner.

A job is a class with a `kind`, a `parse(section) -> params` that validates its own keys, and a
`run(params, ctx) -> list[MetricRow]` that runs in a fresh worker process. Jobs that take policies declare the
names they accept (or None: whatever `tieremu.policy.registry` knows); the all-fastest and all-slowest
baselines are always accepted and added beside every such job by the sweep. A job with `kernel_baseline = True`
also takes `kernel`, Linux's own tiering (runner/kernel_baseline.py), where the machine has memory tiers.

Jobs from other layers register by their `module:Class` path in OPTIONAL_JOBS (skipped while that module is
absent); a spec may also name any Job subclass by path (`kind: mypkg.jobs:MyJob`) without touching the core.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from tieremu.configfile import Section, positive
from tieremu.errors import ConfigError
from tieremu.numbers import MIB, SEED, Range
from tieremu.probe.calibrate import Anchor, anchored
from tieremu.record.row import MetricRow
from tieremu.runner.kernel_baseline import KERNEL_POLICY, kernel_policy_problem
from tieremu.tiers.config import TierMap
from tieremu.tiers.resolve import Backing, ResolvedTierMap
from tieremu.tiers.timing import Calibration
from tieremu.workloads.job import Job, RunContext, audit_rows, tier_origin

__all__ = ["BASELINES", "Job", "JobRegistry", "RunContext", "audit_rows", "default_registry", "job_path",
           "load_job", "tier_origin"]

BASELINES = ("all-fastest", "all-slowest")  # the L100 / L0 bounds run beside every policy
BUILTIN_JOBS = ("tieremu.runner.jobs:ProbeJob", "tieremu.runner.jobs:RoundTripJob",
                "tieremu.runner.jobs:SyntheticJob")
# Jobs living with their own layers (decode, trace replay): listed here once they land; absent modules are skipped.
OPTIONAL_JOBS: tuple[str, ...] = ("tieremu.workloads.jobs:DecodeJob", "tieremu.workloads.replay_job:ReplayJob",
                                  "tieremu.engines.job:EngineJob", "tieremu.cluster.job:ClusterJob")


def job_path(job: type[Job]) -> str:
    return f"{job.__module__}:{job.__qualname__}"


def load_job(path: str) -> type[Job]:
    """The Job class at `module:Class`; ConfigError naming the path when it is not one."""
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # user code: any error while importing it is the spec's problem, shown as such
        raise ConfigError(f"job {path!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Job)):
        raise ConfigError(f"job {path!r} is not a subclass of tieremu.runner.jobs.Job")
    return obj


class JobRegistry:
    """Job kinds by name. Not global: `default_registry()` builds one, tests may build their own."""

    def __init__(self, jobs: Iterable[type[Job]] = ()) -> None:
        self._jobs: dict[str, type[Job]] = {}
        for job in jobs:
            self.register(job)

    def register(self, job: type[Job]) -> None:
        if job.kind in self._jobs and self._jobs[job.kind] is not job:
            raise ConfigError(f"job kind {job.kind!r} is registered twice: {job_path(self._jobs[job.kind])} "
                              f"and {job_path(job)}")
        self._jobs[job.kind] = job

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted(self._jobs))

    def lookup(self, kind: str) -> type[Job] | None:
        """The job of a registered kind, or of a `module:Class` path; None if neither."""
        if kind in self._jobs:
            return self._jobs[kind]
        return load_job(kind) if ":" in kind else None

    def validate_policy(self, job: type[Job], name: str) -> str | None:
        """A problem string if the job cannot run policy `name`, else None."""
        if not job.takes_policies:
            return f"job {job.kind!r} takes no policies"
        if name in BASELINES:
            return None
        if name == KERNEL_POLICY and getattr(job, "kernel_baseline", False):
            return kernel_policy_problem()  # Linux's own tiering: only where the kernel has tiers
        valid = self.valid_policies(job)
        if valid is None:
            return (f"policy {name!r} cannot be checked: job {job.kind!r} uses tieremu.policy.registry, which is "
                    "not installed")
        base = name.partition("{")[0]  # a label: the name, then its parameters (tieremu.policy.registry)
        if base in valid or (job.policies is None and ":" in base):
            if base not in valid and (problem := _user_policy_problem(base)) is not None:
                return problem
            if base != name:
                from tieremu.policy.registry import label_problem

                return label_problem(name)
            return None
        return f"unknown policy {base!r}; valid: {', '.join(sorted(valid | set(BASELINES)))}"

    def valid_policies(self, job: type[Job]) -> frozenset[str] | None:
        if job.policies is not None:
            return job.policies
        try:
            from tieremu.policy import registry  # being written beside the runner: optional until it lands
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("tieremu.policy"):
                return None
            raise
        return frozenset(registry.names())


def default_registry() -> JobRegistry:
    registry = JobRegistry(load_job(p) for p in BUILTIN_JOBS)
    for path in OPTIONAL_JOBS:
        module = path.partition(":")[0]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # that layer has not landed here
            raise
        registry.register(load_job(path))
    return registry


def _user_policy_problem(path: str) -> str | None:
    """Why a `module:Class` policy cannot be used (None: it can). The module is the user's code: whatever its
    import raises is reported, and the class must be a Policy, so that no run fails later for it."""
    from tieremu.policy.base import Policy

    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        return f"policy {path!r} cannot be loaded: {type(exc).__name__}: {exc}"
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        return f"policy {path!r} is not a subclass of tieremu.policy.base.Policy"
    return None


# ---- probe: per-tier latency and bandwidth through each tier's own path, plus loaded-latency curves ----

MAX_PROBE_MIB = 1 << 20  # a chase buffer of 1 TiB: past any node's memory
MAX_PROBE_REPEATS = 1000  # each repeat is a fraction of a second per tier and kernel


@dataclass(frozen=True)
class ProbeParams:
    size_mib: int = 256  # pointer-chase working set per tier
    repeats: int = 3
    kernels: tuple[str, ...] = ("read",)
    loaded: bool = True  # bandwidth-latency curves of the real nodes (needs 2+ CPUs on the initiator node)


class ProbeJob(Job):
    kind = "probe"

    @classmethod
    def parse(cls, section: Section) -> ProbeParams:
        kernels = section.get("kernels", list, ["read"])
        for i, k in enumerate(kernels):
            if k not in ("read", "write", "copy"):
                raise section.error(f"kernels[{i}]", f"{k!r} is not valid; valid: read, write, copy")
        params = ProbeParams(size_mib=section.get("size_mib", int, 256, valid=Range(1, MAX_PROBE_MIB, integer=True)),
                             repeats=section.get("repeats", int, 3, valid=Range(1, MAX_PROBE_REPEATS, integer=True)),
                             kernels=tuple(kernels), loaded=section.get("loaded", bool, True))
        section.done()
        return params

    @classmethod
    def run(cls, params: ProbeParams, ctx: RunContext) -> list[MetricRow]:
        """Real tiers first; their local figures anchor the run (see `anchor_rows`), the emulated and shaped tiers'
        models are resolved against them, then those tiers are probed through their models."""
        from tieremu.numa.topology import discover
        from tieremu.probe.emulated import probe_tiers
        from tieremu.tiers.resolve import resolve

        topology = discover()
        cpu = topology.node(topology.cpu_nodes[0]).cpus[0]
        size = params.size_mib << 20
        probe = {"latency": True, "kernels_": params.kernels, "size": size, "working_set": min(size, 256 << 20),
                 "repeats": params.repeats}
        resolved, cal = ctx.resolved, ctx.calibration
        real = replace(resolved, tiers=tuple(t for t in resolved.tiers if t.timing is None))
        measured = probe_tiers(real, cal, cpu, **probe)  # type: ignore[arg-type]
        rows = []
        modelled = [t for t in resolved.tiers if t.timing is not None]
        if modelled and cal is not None:
            cal, anchor = _anchor_to(measured, resolved, cal, size)
            if anchor is not None:
                resolved = resolve(resolved.tier_map, topology, calibration=cal)
                rows += anchor_rows(ctx, anchor)
            emulated = replace(resolved, tiers=tuple(t for t in resolved.tiers if t.timing is not None))
            measured += probe_tiers(emulated, cal, cpu, **probe)
        for m in measured:
            tier = resolved.tier(m.tier)
            unit = "ns" if m.metric == "latency_ns" else "GB/s"
            # latency rows say how much descheduled time their chase left out (DESCHEDULED_NS): none is hidden
            excluded = m.excluded.to_dict() if m.metric == "latency_ns" else {}
            rows.append(ctx.row(m.metric, m.achieved.median, unit, tier_origin(tier), tier=m.tier,
                                backing=m.backing, requested=m.requested, min=m.achieved.min, max=m.achieved.max,
                                spread=m.achieved.spread, **excluded))
        rows += cls._ratios(measured, ctx, resolved, cal)
        if params.loaded:
            rows += cls._loaded(params, ctx, topology)
        return rows

    @classmethod
    def _ratios(cls, measured: list[Any], ctx: RunContext, resolved: ResolvedTierMap,
                cal: Calibration | None) -> list[MetricRow]:
        """Each emulated tier's achieved figure over the local tier's figure of this same probe (same working set,
        seconds apart): the ratio a reader computes from the report, next to the one the model targeted."""
        if cal is None:
            return []
        local = _local_figures(measured, resolved, cal.node)
        rows = []
        for m in measured:
            model = resolved.tier(m.tier).timing
            if model is None or m.metric not in local or not local[m.metric]:
                continue
            anchor = cal.latency_ns if m.metric == "latency_ns" else \
                cal.bandwidth_gbps[m.metric.removesuffix("_gb_per_s")]
            rows.append(ctx.row(ratio_metric(m.metric), m.achieved.median / local[m.metric], "x", "emulated",
                                tier=m.tier, of=m.metric, target_ratio=(m.requested or math.nan) / anchor,
                                local=local[m.metric], anchor=anchor, achieved=m.achieved.median))
        return rows

    @classmethod
    def _loaded(cls, params: ProbeParams, ctx: RunContext, topology: Any) -> list[MetricRow]:
        from tieremu.probe.loaded import loaded_latency

        initiator = topology.cpu_nodes[0]
        if len(topology.node(initiator).cpus) < 2:
            return []  # one CPU: nothing left to generate load with
        rows = []
        real = [t for t in ctx.resolved.tiers if t.backing in (Backing.REAL, Backing.VM) and t.nodes]
        for node in dict.fromkeys(t.nodes[0] for t in real):
            tier = next(t for t in real if t.nodes[0] == node)
            points = loaded_latency(topology, initiator, node, quick=True, chase_bytes=params.size_mib << 20,
                                    repeats=params.repeats)
            for i, p in enumerate(points):
                rows.append(ctx.row("loaded_latency_ns", p.latency_ns.median, "ns", tier_origin(tier),
                                    tier=tier.name, sample=i, mix=p.mix, traffic_gb_per_s=p.traffic_gb_per_s,
                                    delay_ns=p.delay_ns, memory_node=node, initiator_node=initiator))
        return rows


def ratio_metric(metric: str) -> str:
    """The name of an emulated tier's ratio to local for a probe metric: latency_ratio, read_bw_ratio, ..."""
    return "latency_ratio" if metric == "latency_ns" else f"{metric.removesuffix('_gb_per_s')}_bw_ratio"


def _local_figures(measured: list[Any], resolved: ResolvedTierMap, node: int) -> dict[str, float]:
    """The probe's figures of the real tier on the calibration's node (the local memory), by metric."""
    return {m.metric: m.achieved.median for m in measured
            if resolved.tier(m.tier).timing is None and resolved.tier(m.tier).nodes[:1] == (node,)}


def _anchor_to(measured: list[Any], resolved: ResolvedTierMap, cal: Calibration,
               working_set: int) -> tuple[Calibration, Anchor | None]:
    """The run's calibration from the probe's local figures (read bandwidth: the cached one if not probed)."""
    local = _local_figures(measured, resolved, cal.node)
    if "latency_ns" not in local:
        return cal, None  # no real tier on the local node: nothing to anchor to
    return anchored(cal, working_set=working_set, latency_ns=local["latency_ns"],
                    read_gbps=local.get("read_gb_per_s", cal.bandwidth_gbps["read"]))


def anchor_rows(ctx: RunContext, anchor: Anchor) -> list[MetricRow]:
    """The run's anchor as rows: the runner reads them back to resolve every later run's models alike."""
    extra = {"cached": anchor.cached_latency_ns, "refreshed": anchor.refreshed, "working_set": anchor.working_set,
             "node": anchor.node}
    return [ctx.row("local_latency_ns", anchor.run_latency_ns, "ns", "measured", **extra),
            ctx.row("local_read_gb_per_s", anchor.run_read_gbps, "GB/s", "measured",
                    **extra | {"cached": anchor.cached_read_gbps})]


def anchor_from_rows(cal: Calibration, rows: Iterable[MetricRow]) -> tuple[Calibration, Anchor] | None:
    """The anchor a probe run took (its `local_*` rows), decided again here exactly as the probe decided it."""
    found = {r.metric: r for r in rows if r.metric in ("local_latency_ns", "local_read_gb_per_s")}
    if len(found) < 2:
        return None
    latency = found["local_latency_ns"]
    return anchored(cal, working_set=int(latency.params["working_set"]), latency_ns=latency.value,  # type: ignore
                    read_gbps=found["local_read_gb_per_s"].value)


# ---- roundtrip: a KV-sized tensor placed and migrated through the tiers, checked page by page ----

@dataclass(frozen=True)
class RoundTripParams:
    route: tuple[str, ...] | None  # None: every tier of the map, in order
    size_mib: int
    seed: int
    check_mib: int  # per tier: allocate, bind, ask the kernel where the pages are


class RoundTripJob(Job):
    kind = "roundtrip"
    repetitions = 3  # a timing job: enough runs for a confidence interval

    @classmethod
    def parse(cls, section: Section) -> RoundTripParams:
        route = section.get("route", list, None)
        if route is not None and not all(isinstance(t, str) for t in route):
            raise section.error("route", f"{route!r}: expected a list of tier names")
        params = RoundTripParams(route=None if route is None else tuple(route),
                                 size_mib=section.get("size_mib", int, 256, valid=MIB),
                                 seed=section.get("seed", int, 0, valid=SEED),
                                 check_mib=section.get("check_mib", int, 4, valid=MIB))
        section.done()
        return params

    @classmethod
    def validate(cls, params: RoundTripParams, tier_map: TierMap) -> tuple[str, str] | None:
        names = tier_map.names
        route = params.route or names
        for i, tier in enumerate(route):
            if tier not in names:
                return f"route[{i}]", f"{tier!r} is not a tier of {tier_map.name!r}; tiers: {', '.join(names)}"
        if len(route) < 2:
            return "route", f"{list(route)}: a round trip needs at least two tiers"
        return None

    @classmethod
    def run(cls, params: RoundTripParams, ctx: RunContext) -> list[MetricRow]:
        from tieremu.tiers.check import check_tiers
        from tieremu.workloads.roundtrip import run_roundtrip

        rows = []
        for c in check_tiers(ctx.resolved, params.check_mib << 20):
            rows.append(ctx.row("placement_fraction", c.achieved_fraction, "fraction",
                                tier_origin(ctx.resolved.tier(c.tier)), tier=c.tier, status=c.status,
                                backing=c.backing, reason=c.reason))
        injector = ctx.injector()
        route = list(params.route or ctx.resolved.tier_map.names)
        hops = run_roundtrip(ctx.resolved, route, params.size_mib << 20, params.seed + ctx.seed, injector)
        for i, h in enumerate(hops):
            hop = {"source": h.source, "target": h.target, "target_node": h.target_node, "backing": h.backing,
                   "pages": h.pages, "moved": h.moved, "already": h.already, "failed": sum(h.failed.values()),
                   "note": h.note}
            rows += [ctx.row("migration_gbps", h.gb_per_s, "GB/s", h.origin, tier=h.target, sample=i, **hop),
                     ctx.row("hop_seconds", h.seconds, "s", h.origin, tier=h.target, sample=i, **hop),
                     ctx.row("fraction_on_target", h.fraction_on_target, "fraction", h.origin, tier=h.target,
                             sample=i, **hop),
                     ctx.row("checksum_ok", float(h.checksum_ok), "bool", h.origin, tier=h.target, sample=i, **hop),
                     ctx.row("hop_injected_s", h.injected_seconds, "s", h.origin, tier=h.target, sample=i, **hop)]
        return rows + audit_rows(ctx, injector)


# ---- synthetic: cheap, deterministic figures in the shape of a decode job, for tests of the sweep engine ----

CRASH_MODES = ("none", "raise", "exit", "signal", "hang")


@dataclass(frozen=True)
class SyntheticParams:
    tokens: int  # TPOT samples per run
    requests: int  # TTFT samples per run
    base_ms: float  # TPOT with all KV in the fastest tier
    slow_factor: float  # TPOT multiplier with all KV in the slowest tier
    working_set_mib: int
    fast_capacity_mib: int
    crash: str  # how a run dies: none | raise | exit (os._exit(3)) | signal (SIGSEGV) | hang
    crash_policy: str | None  # only runs of this policy crash (None: every run)
    crash_unless: str | None  # ... unless this file exists (so a test can fix the cause, then --resume)


class SyntheticJob(Job):
    """Figures computed, not measured (origin `simulated`): the share of KV the fast tier holds is
    min(1, capacity / working set) times the policy's quality; TPOT interpolates between the bounds."""

    kind = "synthetic"
    uses_timing = False  # figures computed from its params: no emulated timing is involved
    takes_policies = True
    policies = frozenset({"lru", "lfu", "hotcold"})
    QUALITY: ClassVar[dict[str, float]] = {"lru": 0.9, "lfu": 0.85, "hotcold": 0.95}
    EPOCHS: ClassVar[int] = 8
    EPOCH_S: ClassVar[float] = 0.05
    KV_BYTES_PER_TOKEN: ClassVar[int] = 128 << 10

    @classmethod
    def parse(cls, section: Section) -> SyntheticParams:
        params = SyntheticParams(
            tokens=section.get("tokens", int, 32, check=positive),
            requests=section.get("requests", int, 8, check=positive),
            base_ms=section.get("base_ms", float, 10.0, check=positive),
            slow_factor=section.get("slow_factor", float, 3.0,
                                    check=lambda v: None if v >= 1 else "must be 1 or more"),
            working_set_mib=section.get("working_set_mib", int, 1024, check=positive),
            fast_capacity_mib=section.get("fast_capacity_mib", int, 512, check=positive),
            crash=section.get("crash", str, "none", choices=CRASH_MODES),
            crash_policy=section.get("crash_policy", str, None),
            crash_unless=section.get("crash_unless", str, None),
        )
        section.done()
        return params

    @classmethod
    def fast_share(cls, params: SyntheticParams, policy: str | None) -> float:
        if policy == "all-fastest":
            return 1.0
        if policy == "all-slowest":
            return 0.0
        return min(1.0, params.fast_capacity_mib / params.working_set_mib) * cls.QUALITY.get(policy or "", 1.0)

    @classmethod
    def run(cls, params: SyntheticParams, ctx: RunContext) -> list[MetricRow]:
        cls._maybe_crash(params, ctx)
        rng = random.Random(ctx.seed)
        fast, slow = ctx.resolved.tiers[0].name, ctx.resolved.tiers[-1].name
        share = cls.fast_share(params, ctx.policy)
        tpot_ms = params.base_ms * (share + (1 - share) * params.slow_factor)
        tpots = [tpot_ms * (1 + 0.1 * rng.random()) for _ in range(params.tokens)]
        rows = [ctx.row("tpot_ms", v, "ms", "simulated", sample=i) for i, v in enumerate(tpots)]
        rows += [ctx.row("ttft_ms", 20 * tpot_ms * (1 + 0.1 * rng.random()), "ms", "simulated", sample=i)
                 for i in range(params.requests)]
        rows += [ctx.row("tokens_per_s", 1000 * len(tpots) / sum(tpots), "tokens/s", "simulated"),
                 ctx.row("hit_ratio", 1.0, "fraction", "simulated"),
                 ctx.row("hit_ratio", share, "fraction", "simulated", tier=fast),
                 ctx.row("hit_ratio", 1 - share, "fraction", "simulated", tier=slow),
                 ctx.row("strr", 1 - share, "fraction", "simulated"),
                 ctx.row("star", 1 - share, "fraction", "simulated"),
                 ctx.row("kv_bytes_per_token", cls.KV_BYTES_PER_TOKEN * share, "B", "simulated", tier=fast),
                 ctx.row("kv_bytes_per_token", cls.KV_BYTES_PER_TOKEN * (1 - share), "B", "simulated", tier=slow)]
        static = ctx.policy in BASELINES  # bounds never move blocks
        for e in range(cls.EPOCHS):
            moves = 0 if static else rng.randint(0, 20)
            rows += [ctx.row("promotions", moves, "blocks", "simulated", sample=e, time_s=e * cls.EPOCH_S),
                     ctx.row("migration_gbps", moves * 2 / 1024 / cls.EPOCH_S, "GB/s", "simulated", sample=e,
                             time_s=e * cls.EPOCH_S)]
        return rows

    @classmethod
    def _maybe_crash(cls, params: SyntheticParams, ctx: RunContext) -> None:
        if params.crash == "none" or (params.crash_policy is not None and params.crash_policy != ctx.policy):
            return
        if params.crash_unless is not None and Path(params.crash_unless).exists():
            return
        if params.crash == "raise":
            raise RuntimeError(f"synthetic crash requested (crash: raise) in run {ctx.run_id}")
        if params.crash == "exit":
            os._exit(3)
        if params.crash == "signal":
            os.kill(os.getpid(), signal.SIGSEGV)
        threading.Event().wait()  # hang: only a timeout ends this run
