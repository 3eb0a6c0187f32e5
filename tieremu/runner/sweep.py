"""A spec's sweep matrix expanded into the list of runs, with the bounds beside every policy and a stable id each.

Per job: tier maps × the cartesian product of its param axes × repetitions × (its policies + all-fastest +
all-slowest), the arms interleaved: every repetition runs each arm once, in ABBA order across repetitions.
Every run's params are parsed and checked against its tier map here, so that a bad axis value fails before any
work. A run id depends only on what the run does, so `--resume` finds the same run again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieremu import __version__
from tieremu.configfile import Section
from tieremu.errors import ConfigError
from tieremu.runner.jobs import BASELINES, Job, ProbeJob, job_path
from tieremu.runner.spec import ExperimentSpec, JobSpec
from tieremu.runner.worker import worker_kind
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

    @property
    def worker(self) -> str:
        """`fresh` (a new interpreter for this run) or `warm` (the warm worker: accounting-only runs)."""
        return worker_kind(self.kind, self.params)

    @property
    def shared_axes(self) -> tuple[str, ...]:
        """Swept axes this run's result does not depend on: a bound that runs once for every value of them (its
        labels show the first point's value)."""
        ignores = self.job.bound_ignores.get(self.policy or "", frozenset())
        return tuple(a for a in self.axes if a in ignores)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.kind, "job_index": self.job_index, "job_class": job_path(self.job),
                "policy": self.policy, "baseline": self.baseline, "tiers": self.tiers, "repetition": self.repetition,
                "axes": self.axes, "labels": self.labels, "params": self.raw_params, "worker": self.worker,
                "once_across": list(self.shared_axes)}


MAX_RUNS = 100_000  # a sweep bigger than this is a mistake (and would take years): refused before it is built


def expand(spec: ExperimentSpec) -> list[PlannedRun]:
    total = sum(_run_count(spec, job) for job in spec.jobs)
    if total > MAX_RUNS:
        raise ConfigError(f"{spec.source}: the sweep expands to {total} runs, more than {MAX_RUNS}; shrink the axes "
                          "or repetitions")
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
            defines = definition(spec, tiers, {k: raw.get(k) for k in job.job.input_files})
            labelled = ({"tiers": tiers} if tiers_axis else {}) | point
            arms = []
            for policy in policies:
                ignores = job.job.bound_ignores.get(policy or "")
                if ignores is not None:
                    key = (policy, tiers, repr(sorted((a, v) for a, v in point.items() if a not in ignores)))
                    if key in bound_points:
                        continue  # the same bound at a point that differs only where it does not depend
                    bound_points.add(key)
                arms.append(policy)
            for rep in range(job.repetitions):
                for policy in _arms_order(tuple(arms), rep):
                    runs.append(PlannedRun(
                        run_id=run_id(job.kind, job.index, policy, tiers, rep, raw, defines), job_index=job.index,
                        kind=job.kind, job=job.job, policy=policy, tiers=tiers, repetition=rep, axes=labelled,
                        raw_params=raw, params=params))
    return runs


def _run_count(spec: ExperimentSpec, job: JobSpec) -> int:
    axes = job_axes(spec, job)
    count = len(axes.pop("tiers", (spec.tiers,))) * len(_with_bounds(axes.pop("policy", job.policies), job.job.bounds))
    for values in axes.values():
        count *= len(values)
    return count * job.repetitions


def _arms_order(policies: tuple[str | None, ...], rep: int) -> tuple[str | None, ...]:
    """The arms of one comparison (policies and their bounds) in repetition `rep`: forward, then backward (ABBA
    across repetitions), so a machine that slows down or warms up over the sweep weighs on every arm alike."""
    return policies if rep % 2 == 0 else policies[::-1]


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
    defines = definition(spec, tiers, {})
    return PlannedRun(run_id=run_id("probe", None, None, tiers, 0, {}, defines), job_index=None, kind="probe",
                      job=ProbeJob, policy=None, tiers=tiers, repetition=0, axes={"tiers": tiers}, raw_params={},
                      params=params)


def run_id(kind: str, job_index: int | None, policy: str | None, tiers: str, rep: int, raw: dict[str, Any],
           defines: str = "") -> str:
    """Readable prefix, then a hash of everything that makes the run what it is (`defines`: see `definition`)."""
    key = json.dumps({"job": job_index, "kind": kind, "policy": policy, "tiers": tiers, "rep": rep, "params": raw,
                      "defines": defines}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    readable = "-".join(p for p in (kind, policy) if p)
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', readable)}-r{rep}-{digest}"


def definition(spec: ExperimentSpec, tiers: str, inputs: dict[str, Any]) -> str:
    """A digest of what defines a run beyond its own params, so that `--resume` never takes a result of a changed
    experiment for this one: the spec's seed, tieremu's version, the contents of its tier map and of the files
    its job reads (`Job.input_files`: a trace), not just their paths."""
    tier_map = spec.tier_maps[tiers]
    files = {str(v): _file_digest(spec.source.parent / v) for v in inputs.values() if isinstance(v, str) and v}
    key = {"seed": spec.seed, "version": __version__,
           "tier_map": _file_digest(tier_map.source) if tier_map.source is not None else tiers,
           "files": {k: d for k, d in files.items() if d is not None}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str | None:
    """sha256 of a regular file's contents (None: not a regular file, so the value is not a file name)."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _digest_of(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: Path, inode: int, size: int, mtime_ns: int) -> str | None:
    """Cached by identity, size and time: a sweep names one trace in many runs, and an edit changes the key."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
