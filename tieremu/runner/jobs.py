"""What a sweep can run: the job interface, the registry of job kinds, and the jobs shipped with the runner.

A job is a class with a `kind`, a `parse(section) -> params` that validates its own keys, and a
`run(params, ctx) -> list[MetricRow]` that runs in a fresh worker process. Jobs that take policies declare the
names they accept (or None: whatever `tieremu.policy.registry` knows); the all-fastest and all-slowest
baselines are always accepted and added beside every such job by the sweep.

Jobs from other layers register by their `module:Class` path in OPTIONAL_JOBS (skipped while that module is
absent); a spec may also name any Job subclass by path (`kind: mypkg.jobs:MyJob`) without touching the core.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tieremu.configfile import Section, positive
from tieremu.errors import ConfigError
from tieremu.runner.metrics import MetricRow
from tieremu.tiers.config import TierMap
from tieremu.tiers.resolve import Backing, ResolvedTier, ResolvedTierMap
from tieremu.tiers.timing import Calibration

BASELINES = ("all-fastest", "all-slowest")  # the L100 / L0 bounds run beside every policy
BUILTIN_JOBS = ("tieremu.runner.jobs:ProbeJob", "tieremu.runner.jobs:RoundTripJob",
                "tieremu.runner.jobs:SyntheticJob")
# Jobs living with their own layers (decode, trace replay): listed here once they land; absent modules are skipped.
OPTIONAL_JOBS: tuple[str, ...] = ("tieremu.workloads.jobs:DecodeJob", "tieremu.workloads.replay_job:ReplayJob",
                                  "tieremu.engines.job:EngineJob")


@dataclass(frozen=True)
class RunContext:
    """Everything a job needs to know about the run it is executing (picklable: it crosses to the worker)."""

    run_id: str
    kind: str
    policy: str | None
    repetition: int
    seed: int
    resolved: ResolvedTierMap
    calibration: Calibration | None
    workdir: Path  # runs/<run_id>/: for artefacts the job wants to keep

    def row(self, metric: str, value: float, unit: str, origin: str, *, tier: str | None = None,
            sample: int | None = None, **params: object) -> MetricRow:
        return MetricRow(self.run_id, self.kind, metric, float(value), unit, origin, tier, sample, dict(params))

    def injector(self) -> Any:
        """A DelayInjector for the emulated and shaped tiers of this run, or None when every tier is real."""
        models = [t.timing for t in self.resolved.tiers if t.timing is not None]
        if not models or self.calibration is None:
            return None
        from tieremu.tiers.emulation import DelayInjector  # loads native kernels: only in the worker

        return DelayInjector(models, self.calibration)


class Job(ABC):
    kind: ClassVar[str]
    takes_policies: ClassVar[bool] = False
    # Policy names the job accepts; None: the policy registry's names. Baselines are always accepted.
    policies: ClassVar[frozenset[str] | None] = None
    # Bounds run beside every policy of the job besides the BASELINES (all-fastest / all-slowest): an offline
    # optimum where the job knows the future (a trace replay runs Belady).
    bounds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def parse(cls, section: Section) -> Any:
        """The job's params (a dataclass) from its spec section; ConfigError with the key path if invalid."""

    @classmethod
    def validate(cls, params: Any, tier_map: TierMap) -> tuple[str, str] | None:
        """(key, problem) if params do not fit this tier map (checked for every run before any work)."""
        return None

    @classmethod
    @abstractmethod
    def run(cls, params: Any, ctx: RunContext) -> list[MetricRow]:
        """Run once in a fresh worker process and return the figures."""


def job_path(job: type[Job]) -> str:
    return f"{job.__module__}:{job.__qualname__}"


def load_job(path: str) -> type[Job]:
    """The Job class at `module:Class`; ConfigError naming the path when it is not one."""
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"job {path!r} cannot be loaded: {exc}") from None
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
        valid = self.valid_policies(job)
        if valid is None:
            return (f"policy {name!r} cannot be checked: job {job.kind!r} uses tieremu.policy.registry, which is "
                    "not installed")
        if name in valid or (job.policies is None and ":" in name and _importable(name)):
            return None
        return f"unknown policy {name!r}; valid: {', '.join(sorted(valid | set(BASELINES)))}"

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


def _importable(path: str) -> bool:
    module, _, attr = path.partition(":")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def audit_rows(ctx: RunContext, injector: Any) -> list[MetricRow]:
    """Per emulated or shaped tier, its emulation audit: what was charged (bytes, accesses), what the timing model
    said that costs (owed), what was spun (the row's value), the targets, and the bookkeeping's own time."""
    if injector is None:
        return []
    return [ctx.row("injected_delay_s", a.injected_ns / 1e9, "s", "emulated", tier=tier,
                    **{k: v for k, v in a.to_dict().items() if k != "tier"})
            for tier, a in injector.audits.items()]


def tier_origin(tier: ResolvedTier) -> str:
    if tier.backing in (Backing.EMULATED, Backing.SHAPED):
        return "emulated"
    return "vm" if tier.backing == Backing.VM else "measured"


# ---- probe: per-tier latency and bandwidth through each tier's own path, plus loaded-latency curves ----

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
        params = ProbeParams(size_mib=section.get("size_mib", int, 256, check=positive),
                             repeats=section.get("repeats", int, 3, check=positive),
                             kernels=tuple(kernels), loaded=section.get("loaded", bool, True))
        section.done()
        return params

    @classmethod
    def run(cls, params: ProbeParams, ctx: RunContext) -> list[MetricRow]:
        from tieremu.numa.topology import discover
        from tieremu.probe.emulated import probe_tiers

        topology = discover()
        cpu = topology.node(topology.cpu_nodes[0]).cpus[0]
        size = params.size_mib << 20
        rows = []
        measured = probe_tiers(ctx.resolved, ctx.calibration, cpu, latency=True,  # type: ignore[arg-type]
                               kernels_=params.kernels, size=size, working_set=min(size, 256 << 20),
                               repeats=params.repeats)
        for m in measured:
            tier = ctx.resolved.tier(m.tier)
            unit = "ns" if m.metric == "latency_ns" else "GB/s"
            rows.append(ctx.row(m.metric, m.achieved.median, unit, tier_origin(tier), tier=m.tier,
                                backing=m.backing, requested=m.requested, min=m.achieved.min, max=m.achieved.max,
                                spread=m.achieved.spread))
        if params.loaded:
            rows += cls._loaded(params, ctx, topology)
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


# ---- roundtrip: a KV-sized tensor placed and migrated through the tiers, checked page by page ----

@dataclass(frozen=True)
class RoundTripParams:
    route: tuple[str, ...] | None  # None: every tier of the map, in order
    size_mib: int
    seed: int
    check_mib: int  # per tier: allocate, bind, ask the kernel where the pages are


class RoundTripJob(Job):
    kind = "roundtrip"

    @classmethod
    def parse(cls, section: Section) -> RoundTripParams:
        route = section.get("route", list, None)
        if route is not None and not all(isinstance(t, str) for t in route):
            raise section.error("route", f"{route!r}: expected a list of tier names")
        params = RoundTripParams(route=None if route is None else tuple(route),
                                 size_mib=section.get("size_mib", int, 256, check=positive),
                                 seed=section.get("seed", int, 0),
                                 check_mib=section.get("check_mib", int, 4, check=positive))
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
