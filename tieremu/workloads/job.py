"""The job interface (a kind of work the runner can run) and the context each run gets; jobs of any layer from
here up subclass `Job`, and the runner (above) drives them. Rows are made through `RunContext.row`, so every figure
a job emits is a tieremu.record MetricRow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tieremu.configfile import Section
from tieremu.record.row import MetricRow
from tieremu.tiers.config import TierMap
from tieremu.tiers.resolve import Backing, ResolvedTier, ResolvedTierMap
from tieremu.tiers.timing import Calibration


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
            phase: str | None = None, sample: int | None = None, **params: object) -> MetricRow:
        """A row of this run; `sample` is the sample's index (its `seq`), `phase` when in the run (start / end)."""
        return MetricRow(self.run_id, self.kind, metric, float(value), unit, origin, tier, phase, sample,
                         dict(params))

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
    # Params that name input files (a trace): their contents are part of every run id, so --resume never
    # reuses a result computed from another version of the file.
    input_files: ClassVar[tuple[str, ...]] = ()
    # Per bound (or baseline), the job params its result does not depend on: a sweep over only those runs it once,
    # at the first point, not at every point.
    bound_ignores: ClassVar[Mapping[str, frozenset[str]]] = {}
    # Repetitions when the spec names none: a timing job runs several, so that its figures carry a confidence
    # interval and drift falls on every arm alike (the sweep interleaves them); accounting-only jobs run once.
    repetitions: ClassVar[int] = 1
    # Whether its figures depend on the emulated tiers' timing; if none of a plan's jobs does, the run-start re-measure
    # that anchors the timing models (tieremu.probe.calibrate.anchor) is skipped.
    uses_timing: ClassVar[bool] = True

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


def audit_rows(ctx: RunContext, injector: Any) -> list[MetricRow]:
    """Per emulated or shaped tier, its emulation audit: what was charged (bytes, accesses), what the timing model
    said that costs (owed), what was spun (the row's value), the targets, and the bookkeeping's own time."""
    if injector is None:
        return []
    anchor = {} if ctx.calibration is None else {"local_latency_ns": ctx.calibration.latency_ns,
                                                  "local_read_gb_per_s": ctx.calibration.bandwidth_gbps.get("read")}
    return [ctx.row("injected_delay_s", a.injected_ns / 1e9, "s", "emulated", tier=tier,
                    **{k: v for k, v in a.to_dict().items() if k != "tier"}, **anchor)
            for tier, a in injector.audits.items()]


def tier_origin(tier: ResolvedTier) -> str:
    if tier.backing in (Backing.EMULATED, Backing.SHAPED):
        return "emulated"
    return "vm" if tier.backing == Backing.VM else "measured"
