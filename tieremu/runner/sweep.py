"""A spec's sweep matrix expanded into the list of runs, with the bounds beside every policy and a stable id each.

Per job: tier maps × the cartesian product of its param axes × (its policies + all-fastest + all-slowest) ×
repetitions. Every run's params are parsed and checked against its tier map here, so that a bad axis value
fails before any work. A run id depends only on what the run does, so `--resume` finds the same run again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from tieremu.configfile import Section
from tieremu.errors import ConfigError
from tieremu.runner.jobs import BASELINES, Job, ProbeJob, job_path
from tieremu.runner.spec import ExperimentSpec, JobSpec
from tieremu.tiers.config import TierMap


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    job_index: int | None  # None: the probe stage
    kind: str
    job: type[Job]
    policy: str | None
    tiers: str  # the tier map, as written in the spec
    repetition: int
    axes: dict[str, Any]  # the swept param values of this run
    raw_params: dict[str, Any]  # the job's params as written, with this run's axis values
    params: Any  # the same, parsed by the job

    @property
    def baseline(self) -> bool:
        return self.policy in BASELINES

    @property
    def labels(self) -> dict[str, Any]:
        """What tells this run apart from its neighbours: stamped on every metric row it emits."""
        out: dict[str, Any] = {}
        if self.policy is not None:
            out["policy"] = self.policy
        out |= self.axes
        out["rep"] = self.repetition
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.kind, "job_index": self.job_index, "job_class": job_path(self.job),
                "policy": self.policy, "baseline": self.baseline, "tiers": self.tiers, "repetition": self.repetition,
                "axes": self.axes, "labels": self.labels, "params": self.raw_params}


def expand(spec: ExperimentSpec) -> list[PlannedRun]:
    runs = []
    for job in spec.jobs:
        runs += _job_runs(spec, job)
    if spec.probe:
        used = dict.fromkeys(r.tiers for r in runs) or {spec.tiers: None}
        runs = [_probe_run(spec, tiers) for tiers in used] + runs
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{spec.source}: two runs would share the id {dup!r}: two jobs are identical; "
                          "change one of them")
    return runs


def job_axes(spec: ExperimentSpec, job: JobSpec) -> dict[str, tuple[Any, ...]]:
    """The axes that apply to this job: the top-level ones it takes, then its own (which win)."""
    axes = {a: v for a, v in spec.sweep.items()
            if a == "tiers" or a in job.keys or (a == "policy" and job.policies is not None)}
    return axes | job.sweep


def _job_runs(spec: ExperimentSpec, job: JobSpec) -> list[PlannedRun]:
    axes = job_axes(spec, job)
    tiers_axis = axes.pop("tiers", None)
    policies = _with_bounds(axes.pop("policy", job.policies), job.job.bounds)
    names, values = list(axes), list(axes.values())
    runs = []
    bound_points: set[tuple[Any, ...]] = set()  # (bound, tiers, the point's values that bound depends on)
    for tiers in tiers_axis or (spec.tiers,):
        for combo in itertools.product(*values):
            point = dict(zip(names, combo, strict=True))
            raw = {**job.raw, **point}
            params = _parse(spec, job, raw, point, tiers)
            labelled = ({"tiers": tiers} if tiers_axis else {}) | point
            for policy in policies:
                ignores = job.job.bound_ignores.get(policy or "")
                if ignores is not None:
                    key = (policy, tiers, repr(sorted((a, v) for a, v in point.items() if a not in ignores)))
                    if key in bound_points:
                        continue  # the same bound at a point that differs only where it does not depend
                    bound_points.add(key)
                for rep in range(job.repetitions):
                    runs.append(PlannedRun(
                        run_id=run_id(job.kind, job.index, policy, tiers, rep, raw), job_index=job.index,
                        kind=job.kind, job=job.job, policy=policy, tiers=tiers, repetition=rep, axes=labelled,
                        raw_params=raw, params=params))
    return runs


def _with_bounds(policies: tuple[str, ...] | None, bounds: tuple[str, ...]) -> tuple[str | None, ...]:
    if policies is None:
        return (None,)
    return tuple(dict.fromkeys(policies + bounds + BASELINES))


def _parse(spec: ExperimentSpec, job: JobSpec, raw: dict[str, Any], point: dict[str, Any], tiers: str) -> Any:
    section = Section(raw, job.where, spec.source)
    where = f" (sweep point {point})" if point else ""
    try:
        params = job.job.parse(section)
        section.done()
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None
    tier_map: TierMap = spec.tier_maps[tiers]
    if (problem := job.job.validate(params, tier_map)) is not None:
        key, message = problem
        raise section.error(key, f"{message}{where}; tier map {tiers}")
    return params


def _probe_run(spec: ExperimentSpec, tiers: str) -> PlannedRun:
    params = ProbeJob.parse(Section({}, "probe", spec.source))
    return PlannedRun(run_id=run_id("probe", None, None, tiers, 0, {}), job_index=None, kind="probe", job=ProbeJob,
                      policy=None, tiers=tiers, repetition=0, axes={"tiers": tiers}, raw_params={}, params=params)


def run_id(kind: str, job_index: int | None, policy: str | None, tiers: str, rep: int, raw: dict[str, Any]) -> str:
    """Readable prefix, then a hash of everything that makes the run what it is."""
    key = json.dumps({"job": job_index, "kind": kind, "policy": policy, "tiers": tiers, "rep": rep, "params": raw},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    readable = "-".join(p for p in (kind, policy) if p)
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', readable)}-r{rep}-{digest}"
