"""Experiment specs (`configs/experiments/*.yaml`), read strictly: unknown keys, unknown job kinds and unknown
policies are errors naming the key path and the valid choices, raised before anything runs.

    name: capacity-sweep
    tiers: ../tiers/cxl-expander.yaml     # default tier map; a `tiers` sweep axis may replace it per run
    lab_profile: cxl-cpuless-node1         # optional: the profile expected active (warned in the manifest if not)
    probe: true                            # optional: a quick per-tier probe before the jobs
    repetitions: 3                         # every run, this many times (a job may override; default: the job's own,
                                           # several for timing jobs, one for accounting-only ones)
    seed: 0
    run_timeout_s: 600                     # a run still going after this is killed and recorded failed
    backend: local                         # optional: local (default) or ray (`tieremu run --backend` wins)
    jobs:
      - kind: synthetic                    # a registered job kind, or `module:Class`
        policies: [lru, {name: hotcold, quota: 8}]   # all-fastest and all-slowest are added beside them
        fast_capacity_mib: 256             # the job's own params, validated by the job
        sweep: {working_set_mib: [512, 2048]}   # axes for this job only
        requires: [cxl]                    # optional, ray backend: hosts that declare these (tieremu ray-node
                                           # --resource cxl) run it; not part of the run id (placement only)
    sweep:                                 # axes for every job that takes them (cartesian product)
      fast_capacity_mib: [256, 1024]
      tiers: [../tiers/single-node.yaml, ../tiers/cxl-expander.yaml]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieremu.configfile import Section, load_yaml
from tieremu.errors import ConfigError
from tieremu.numbers import MAX_SECONDS, Range
from tieremu.runner.jobs import Job, JobRegistry, default_registry
from tieremu.runner.needs import extra_resource
from tieremu.tiers.config import TierMap, load_tier_map

JOB_KEYS = ("kind", "policies", "sweep", "repetitions", "requires")  # read by the runner; every other key is the job's
SPECIAL_AXES = ("policy", "tiers")
BACKENDS = ("local", "ray")  # where runs execute: tieremu.runner.backend
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REPETITIONS = Range(1, 1000, integer=True)  # more is a typo; the sweep's total is bounded too (sweep.MAX_RUNS)
SEEDS = Range(0, 2**63 - 1, integer=True)
# Job keys that were renamed: the old name is refused with the new one (one vocabulary: an epoch is in milliseconds
# everywhere, as `--epoch-ms` on the command line).
RENAMED = {"epoch_s": "epoch_ms (the same epoch in milliseconds: epoch_s 0.05 is epoch_ms 50)"}


class _KeyRecorder(Section):
    """A Section that remembers which keys the job asked for: those are the params a sweep axis may set."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str | Path) -> None:
        super().__init__(data, path, source)
        self.asked: set[str] = set()

    def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        self.asked.add(key)
        return super().get(key, *args, **kwargs)

    def has(self, key: str) -> bool:
        self.asked.add(key)
        return super().has(key)


@dataclass(frozen=True)
class JobSpec:
    index: int  # position in `jobs`, part of every run id
    kind: str
    job: type[Job]
    raw: dict[str, Any]  # the job's own params as written
    params: Any  # the job's parsed params (as written, before sweep values)
    keys: frozenset[str]  # params the job reads: the axes a sweep may set for it
    policies: tuple[str, ...] | None  # None: the job takes no policies
    sweep: dict[str, tuple[Any, ...]]
    repetitions: int
    requires: tuple[str, ...] = ()  # resource names a host must declare to run it (ray backend)

    @property
    def where(self) -> str:
        return f"jobs[{self.index}]"


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str
    tiers: str  # the default tier map, as written
    tier_maps: dict[str, TierMap]  # every tier map a run may use, by the path as written
    lab_profile: str | None
    probe: bool
    jobs: tuple[JobSpec, ...]
    repetitions: int
    seed: int
    run_timeout_s: float
    sweep: dict[str, tuple[Any, ...]]
    source: Path
    backend: str = "local"  # where the runs execute when the command line does not say (tieremu.runner.backend)

    @property
    def tier_map(self) -> TierMap:
        return self.tier_maps[self.tiers]


def load_experiment(path: str | Path, registry: JobRegistry | None = None) -> ExperimentSpec:
    return parse_experiment(load_yaml(path), registry)


def parse_experiment(doc: Section, registry: JobRegistry | None = None) -> ExperimentSpec:
    """A spec from its top-level section (every key read through `doc`, so the reference of keys can watch it:
    tieremu.runner.reference)."""
    registry = registry or default_registry()
    name = doc.get("name", str, check=lambda v: None if NAME.match(v) else
                   "use letters, digits, '.', '_' or '-' (it names the result folder)")
    description = doc.get("description", str, "")
    tiers = doc.get("tiers", str)
    tier_maps = {tiers: _tier_map(doc, "tiers", tiers)}
    lab_profile = doc.get("lab_profile", str, None)
    probe = doc.get("probe", bool, False)
    repetitions = doc.get("repetitions", int, None, valid=REPETITIONS)
    seed = doc.get("seed", int, 0, valid=SEEDS)
    run_timeout_s = doc.get("run_timeout_s", float, 600.0, valid=Range(0, MAX_SECONDS, lo_closed=False))
    backend = doc.get("backend", str, "local", choices=BACKENDS)
    sweep = _axes(doc.section("sweep", default_empty=True))
    for written in sweep.get("tiers", ()):
        if written not in tier_maps:
            tier_maps[written] = _tier_map(doc, "sweep.tiers", written)
    jobs = tuple(_job(i, s, registry, repetitions) for i, s in enumerate(doc.sections("jobs")))
    for job in jobs:  # a job's own tiers axis: its maps are loaded (and checked) here too
        for written in job.sweep.get("tiers", ()):
            if written not in tier_maps:
                tier_maps[written] = _tier_map(doc, f"{job.where}.sweep.tiers", written)
    if not jobs and not probe:
        raise doc.error("jobs", "nothing to run: list at least one job (kinds: "
                                f"{', '.join(registry.kinds)}) or set probe: true")
    doc.done()
    spec = ExperimentSpec(name, description, tiers, tier_maps, lab_profile, probe, jobs, repetitions or 1, seed,
                          run_timeout_s, sweep, doc.source, backend)
    _check_global_axes(spec, doc, registry)
    return spec


def _tier_map(doc: Section, key: str, written: str) -> TierMap:
    """A tier map the spec names; its errors say which key of the spec named it."""
    try:
        return load_tier_map(doc.relative_path(written))
    except ConfigError as exc:
        raise doc.error(key, f"tier map {written!r}: {exc}") from None


def _job(index: int, s: Section, registry: JobRegistry, repetitions: int | None) -> JobSpec:
    kind = s.get("kind", str)
    try:
        job = registry.lookup(kind)  # a `module:Class` kind imports the user's module: its error is shown here
    except ConfigError as exc:
        raise s.error("kind", str(exc)) from None
    if job is None:
        raise s.error("kind", f"unknown job kind {kind!r}; valid: {', '.join(registry.kinds)} "
                              "(or a Job subclass as module:Class)")
    policies = None
    if job.takes_policies:
        policies = _policy_labels(s, "policies", tuple(s.get("policies", list)))
        _check_policies(s, "policies", policies, job, registry)
    elif s.has("policies"):
        raise s.error("policies", f"job {kind!r} takes no policies")
    sweep = _axes(s.section("sweep", default_empty=True))
    reps = s.get("repetitions", int, repetitions or job.repetitions, valid=REPETITIONS)
    requires = tuple(s.get("requires", list, []))
    for i, name in enumerate(requires):
        if not isinstance(name, str):
            raise s.error(f"requires[{i}]", f"expected a resource name, got {name!r}")
        try:
            extra_resource(name)
        except ConfigError as exc:
            raise s.error(f"requires[{i}]", str(exc)) from None
    raw = {k: v for k, v in s.data.items() if k not in JOB_KEYS}
    for old, new in RENAMED.items():
        for where in (old, f"sweep.{old}"):
            if old in (raw if where == old else sweep):
                raise s.error(where, f"renamed: use {new}")
    own = _KeyRecorder(raw, s.path, s.source)
    params = job.parse(own)
    own.done()  # the job's own keys; the runner's were read above, so `s` has no unknown key left
    keys = frozenset(own.asked)
    for axis, values in sweep.items():
        if axis == "policy":
            if policies is None:
                raise s.error("sweep.policy", f"job {kind!r} takes no policies")
            _check_policies(s, "sweep.policy", values, job, registry)
        elif axis != "tiers" and axis not in keys:
            raise s.error(f"sweep.{axis}", f"job {kind!r} has no param {axis!r}; it can sweep: "
                                           f"{', '.join(sorted(keys | _special(job)))}")
    return JobSpec(index, kind, job, raw, params, keys, policies, sweep, reps, requires)


def _policy_labels(s: Section, key: str, entries: tuple[Any, ...]) -> tuple[Any, ...]:
    """Policy entries as labels: a name stays a name; `{name: hotcold, quota: 8}` becomes `hotcold{"quota":8}`."""
    labels = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            params = dict(entry)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise s.error(f"{key}[{i}]", f"a policy entry with parameters needs a name: {entry!r}")
            from tieremu.policy.registry import policy_label

            entry = policy_label(name, params)
        labels.append(entry)
    return tuple(labels)


def _check_policies(s: Section, key: str, names: tuple[Any, ...], job: type[Job], registry: JobRegistry) -> None:
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise s.error(f"{key}[{i}]", f"expected a policy name, got {name!r}")
        if (problem := registry.validate_policy(job, name)) is not None:
            raise s.error(f"{key}[{i}]", problem)


def _axes(s: Section) -> dict[str, tuple[Any, ...]]:
    axes = {}
    for axis in list(s.data):
        values = s.get(axis, list)
        if not values:
            raise s.error(axis, "an axis needs at least one value")
        if any(isinstance(v, (dict, list)) for v in values) and not (axis == "policy" and all(
                isinstance(v, (str, dict)) for v in values)):
            raise s.error(axis, f"{values!r}: axis values must be scalars (policy entries may be {{name: ...}})")
        if len(set(map(repr, values))) != len(values):
            raise s.error(axis, f"{values!r}: a value is listed twice")
        if axis == "tiers" and not all(isinstance(v, str) for v in values):
            raise s.error(axis, f"{values!r}: expected tier map paths")
        axes[axis] = _policy_labels(s, axis, tuple(values)) if axis == "policy" else tuple(values)
    s.done()
    return axes


def _special(job: type[Job]) -> set[str]:
    return {"tiers", "policy"} if job.takes_policies else {"tiers"}


def _check_global_axes(spec: ExperimentSpec, doc: Section, registry: JobRegistry) -> None:
    """A top-level axis must apply to at least one job (else it is a typo); policies are checked per job."""
    for axis, values in spec.sweep.items():
        if axis in RENAMED:
            raise doc.error(f"sweep.{axis}", f"renamed: use {RENAMED[axis]}")
        takers = [j for j in spec.jobs if axis in j.keys or axis in _special(j.job)]
        if axis != "tiers" and not takers:
            known = sorted({k for j in spec.jobs for k in j.keys | _special(j.job)})
            raise doc.error(f"sweep.{axis}", f"no job takes {axis!r}; axes the jobs take: {', '.join(known)}")
        if axis == "policy":
            for j in takers:
                for i, name in enumerate(values):
                    if (problem := registry.validate_policy(j.job, name)) is not None:
                        raise doc.error(f"sweep.policy[{i}]", f"{problem} (for {j.where}, kind {j.kind!r})")
