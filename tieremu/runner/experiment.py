"""Running an experiment spec: plan (everything that can refuse does so here), then every run in its own worker
process, results written as runs finish, then the summary, plots and report; `--resume` picks a folder up again.

Folder layout (results/<experiment>/<timestamp>/, `.partial` until finished; tieremu.record.SCHEMA_VERSION):
    manifest.json            schema_version, machine, tiers as resolved, calibration, command line, the run list
    runs.jsonl               one RunRecord per run: labels, status, seconds, error, load and steal, noisy and why
    metrics.jsonl            one MetricRow per line, every run (rebuilt from runs/ at the end, in plan order)
    summary.csv              long format: one line per run group x metric x tier x phase (n, median, mean, CI...)
    summary.parquet          the same, when pyarrow is installed
    runs/<run_id>/           status.json (its RunRecord), metrics.jsonl, worker.log; host.json for a run on
                             another backend (ray): the manifest of the host it ran on
    plots/, report.html      written by tieremu.report from the files above
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tieremu.errors import ConfigError
from tieremu.numa.topology import Topology, discover
from tieremu.probe.calibrate import Anchor, anchor, calibration
from tieremu.processes import terminate_raises
from tieremu.record import SCHEMA_VERSION
from tieremu.record.row import MetricRow
from tieremu.record.runs import DONE, FAILED, LoadSample, RunRecord
from tieremu.record.summary import SummaryRow, summarise, to_table
from tieremu.runner import manifest
from tieremu.runner.backend import Backend, RunResult, Submission
from tieremu.runner.jobs import ProbeParams, RunContext, anchor_from_rows, job_path
from tieremu.runner.needs import run_needs
from tieremu.runner.results import ReopenedResultDir, ResultDir, ResultError
from tieremu.runner.spec import ExperimentSpec
from tieremu.runner.sweep import PlannedRun, expand
from tieremu.runner.worker import (
    FRESH,
    STARTING,
    WARM,
    WRITING,
    PhaseCallback,
    RunOutcome,
    RunTask,
    WarmWorker,
    run_isolated,
)
from tieremu.safefile import UnsafeFileError, atomic_write, open_append
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.tiers.timing import Calibration

HOST_MANIFEST = "host.json"


@dataclass(frozen=True)
class Plan:
    spec: ExperimentSpec
    topology: Topology
    resolved: dict[str, ResolvedTierMap]  # by tier map path as written
    calibration: Calibration | None  # the run's: the cache, or the run's own figures where it was off (anchor)
    runs: list[PlannedRun]
    warnings: list[str]
    anchor: Anchor | None = None  # the run-start re-measure the ratios were resolved against
    cached_calibration: Calibration | None = None


@dataclass(frozen=True)
class ExperimentResult:
    path: Path
    plan: Plan
    records: list[RunRecord]
    report: Path | None
    summary: list[SummaryRow] = field(default_factory=list)  # summary.csv's rows, for the closing table

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == FAILED]

    @property
    def noisy(self) -> list[RunRecord]:
        return [r for r in self.records if r.noisy]


class Listener(Protocol):
    """Told about progress (the CLI draws a progress bar from it). A listener may also have
    `phase(run, phase)`: told a local run's phase as it changes (tieremu.runner.worker: start-up, running, writing)."""

    def planned(self, plan: Plan, todo: int) -> None: ...
    def started(self, run: PlannedRun) -> None: ...
    def finished(self, run: PlannedRun, record: RunRecord) -> None: ...


def plan_experiment(spec: ExperimentSpec) -> Plan:
    """Expand the sweep and resolve every tier map against this machine: refusals happen here, before any folder."""
    runs = expand(spec)
    topology = discover()
    resolved = {path: resolve(tier_map, topology) for path, tier_map in spec.tier_maps.items()}
    cal = cached = anchored = None
    if any(r.any_emulated for r in resolved.values()):
        cal = cached = calibration(topology)  # cached per machine: the same config means the same slowdown
        # Ratios are to this run's local memory, as the probe sees it: the probe stage, first of the runs, anchors
        # them with its own local figures (run_experiment re-resolves the later runs); without one, a re-measure here.
        if not spec.probe and any(r.job.uses_timing for r in runs):
            cal, anchored = anchor(cached, topology, working_set=ProbeParams.size_mib << 20)
        resolved = {path: resolve(spec.tier_maps[path], topology, calibration=cal) for path in resolved}
    return Plan(spec, topology, resolved, cal, runs, _lab_warnings(spec), anchored, cached)


def run_experiment(spec: ExperimentSpec, out_root: Path, *, resume: Path | None = None,
                   listener: Listener | None = None, report: bool = True,
                   backend: Backend | None = None) -> ExperimentResult:
    """Plan, run every run not done yet (here one after another, or on `backend`: tieremu.runner.backend), write the
    folder's files and report."""
    plan = plan_experiment(spec)
    out = ReopenedResultDir(resume, spec.name) if resume is not None else ResultDir(out_root, spec.name)
    with out, terminate_raises():
        _write_manifest(out, plan, resumed=resume is not None)
        previous = _previous_records(out.path) if resume is not None else {}
        todo = [r for r in plan.runs if previous.get(r.run_id) is None]
        if listener:
            listener.planned(plan, len(todo))
        records = {run_id: rec for run_id, rec in previous.items() if rec is not None}
        for run in plan.runs:  # --resume: a probe done before anchors the runs still to do, as it did then
            if run.kind == "probe" and run.run_id in records:
                plan = _anchored_by_probe(out, plan, run)
        if backend is None:
            with WarmWorker() as warm:  # started only if a run needs no fresh process (worker.worker_kind)
                for run in todo:
                    if listener:
                        listener.started(run)
                    records[run.run_id] = _execute(out, plan, run, warm, _phases(listener, run))
                    if listener:
                        listener.finished(run, records[run.run_id])
                    if run.kind == "probe" and records[run.run_id].status == DONE:
                        plan = _anchored_by_probe(out, plan, run)
        else:
            plan = _execute_on(backend, out, plan, todo, records, listener)
        ordered = [records[r.run_id] for r in plan.runs]
        rows = _collect_rows(out.path, plan.runs)
        out.write_text("metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
        out.write_text("runs.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in ordered))
        summary = summarise(rows, ordered)
        table = to_table(summary)
        out.write_csv("summary.csv", table)
        _write_parquet(out.path / "summary.parquet", table)
        report_path = _write_report(out) if report else None
    final = out.final
    return ExperimentResult(final, plan, ordered, final / report_path.name if report_path else None, summary)


def latest_folder(out_root: Path, experiment: str) -> Path:
    """The newest result folder of an experiment, finished or not (what `--resume` without DIR picks)."""
    base = out_root / experiment
    folders = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name) if base.is_dir() else []
    if not folders:
        raise ConfigError(f"--resume: no result folder of experiment {experiment!r} under {base}")
    return folders[-1]


def tier_resolution(resolved: ResolvedTierMap) -> list[dict[str, object]]:
    return [
        {"tier": t.name, "kind": t.spec.kind, "backing": t.label, "origin": t.backing.origin, "nodes": list(t.nodes),
         "device": t.device,
         "requested_nodes": list(t.spec.nodes), "policy": t.spec.policy.name.lower(), "reason": t.reason,
         "capacity_mib": t.spec.capacity_mib,
         "emulation_targets": t.spec.emulate.describe() if t.spec.emulate else None,
         "timing_model": t.timing.to_dict() if t.timing else None}
        for t in resolved.tiers
    ]


def _lab_warnings(spec: ExperimentSpec) -> list[str]:
    if spec.lab_profile is None:
        return []
    from tieremu.lab import active_profiles

    active = [p.get("name") for p in active_profiles() if p.get("applied_utc")]
    if spec.lab_profile in active:
        return []
    return [f"lab profile {spec.lab_profile!r} expected by the spec is not active (active: "
            f"{', '.join(map(str, active)) or 'none'}): figures are from the machine as it is; "
            f"apply it with: sudo scripts/setup-lab.sh {spec.lab_profile}"]


def _write_manifest(out: ResultDir, plan: Plan, *, resumed: bool) -> None:
    spec = plan.spec
    earlier: list[dict[str, Any]] = []  # the attempts before this --resume: when, and with which command
    old = out.path / "manifest.json"
    if resumed and old.exists():
        previous = json.loads(old.read_text())  # checked to be a tieremu manifest when the folder was reopened
        earlier = [*previous.get("extra", {}).get("earlier_attempts", []),
                   {"created_utc": previous.get("created_utc"), "command": previous.get("command")}]
    out.write_json("manifest.json", manifest.collect(
        plan.topology, schema_version=SCHEMA_VERSION, experiment=spec.name, description=spec.description,
        spec=str(spec.source),
        spec_text=spec.source.read_text(), tier_map=str(spec.tier_map.source),
        tiers=tier_resolution(plan.resolved[spec.tiers]),
        tier_maps={path: {"name": r.tier_map.name, "source": str(r.tier_map.source), "tiers": tier_resolution(r)}
                   for path, r in plan.resolved.items()},
        calibration=plan.calibration.to_dict() if plan.calibration else None,
        calibration_cached=plan.cached_calibration.to_dict() if plan.cached_calibration else None,
        calibration_anchor=plan.anchor.to_dict() if plan.anchor else None,
        lab_profile_expected=spec.lab_profile, warnings=plan.warnings,
        runs=[r.to_dict() for r in plan.runs], earlier_attempts=earlier,
    ).to_dict())


def _update_manifest(out: ResultDir, plan: Plan) -> None:
    """The manifest once the probe has anchored the run: the tiers as now resolved, the run's calibration and the
    anchor beside the cached calibration; the rest (when, which command, earlier attempts) as first written."""
    data = json.loads((out.path / "manifest.json").read_text())
    extra = data["extra"]
    extra["tiers"] = tier_resolution(plan.resolved[plan.spec.tiers])
    for path, r in plan.resolved.items():
        extra["tier_maps"][path]["tiers"] = tier_resolution(r)
    extra["calibration"] = plan.calibration.to_dict() if plan.calibration else None
    extra["calibration_anchor"] = plan.anchor.to_dict() if plan.anchor else None
    out.write_json("manifest.json", data)


def _previous_records(folder: Path) -> dict[str, RunRecord | None]:
    """Runs already done in this folder (kept by --resume); failed or missing ones map to None (run again)."""
    out: dict[str, RunRecord | None] = {}
    for status in (folder / "runs").glob("*/status.json"):
        try:
            data = json.loads(status.read_text())
            done = data.get("status") == DONE and (status.parent / "metrics.jsonl").exists()
            record = replace(RunRecord.from_dict(data), reused=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # A corrupt or half-written status (a crash, a full disk): the run is not done, so it runs again.
            out[status.parent.name] = None
            continue
        out[record.run_id] = record if done else None
    return out


def _context(out: ResultDir, plan: Plan, run: PlannedRun) -> RunContext:
    workdir = out.path / "runs" / run.run_id
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultError(f"cannot create {workdir}: {exc.strerror}") from None
    return RunContext(run.run_id, run.kind, run.policy, run.repetition, plan.spec.seed + run.repetition,
                      plan.resolved[run.tiers], plan.calibration, workdir)


def _phases(listener: Listener | None, run: PlannedRun) -> PhaseCallback:
    """The run's phase changes, for a listener that wants them (`phase(run, phase)`); else nothing."""
    told = getattr(listener, "phase", None)
    return (lambda phase: told(run, phase)) if told is not None else (lambda phase: None)


def _execute(out: ResultDir, plan: Plan, run: PlannedRun, warm: WarmWorker | None = None,
             on_phase: PhaseCallback | None = None) -> RunRecord:
    context = _context(out, plan, run)
    task = RunTask(job_path(run.job), run.params, context)
    tell = on_phase or (lambda phase: None)
    before = LoadSample.now()
    tell(STARTING)
    if warm is not None and run.worker == WARM:
        outcome: RunOutcome = warm.run(task, plan.spec.run_timeout_s, tell)
    else:
        outcome = run_isolated(task, plan.spec.run_timeout_s, tell)
    after = LoadSample.now()
    tell(WRITING)
    return _write_run(out, run, RunResult(outcome, before, after), worker=run.worker if warm is not None else FRESH)


def _execute_on(backend: Backend, out: ResultDir, plan: Plan, todo: list[PlannedRun],
                records: dict[str, RunRecord], listener: Listener | None) -> Plan:
    """The runs to do on a backend that runs many at once: the probe stage first (it anchors the timing models
    of the runs after it), then all the others; each run's files written as it comes home."""
    for batch in ([r for r in todo if r.kind == "probe"], [r for r in todo if r.kind != "probe"]):
        if not batch:
            continue
        submissions = [_submission(out, plan, run) for run in batch]
        for run in batch:
            if listener:
                listener.started(run)
        # closed on the way out of an error or Ctrl-C too: the backend stops the runs still going at once
        with contextlib.closing(backend.execute(submissions)) as results:
            for run, result in results:
                records[run.run_id] = _write_run(out, run, result)
                if listener:
                    listener.finished(run, records[run.run_id])
                if run.kind == "probe" and records[run.run_id].status == DONE:
                    plan = _anchored_by_probe(out, plan, run)
    return plan


def _submission(out: ResultDir, plan: Plan, run: PlannedRun) -> Submission:
    requires = plan.spec.jobs[run.job_index].requires if run.job_index is not None else ()
    needs = run_needs(plan.resolved[run.tiers], timed=run.job.uses_timing, lab_profile=plan.spec.lab_profile,
                      requires=requires)
    task = RunTask(job_path(run.job), run.params, _context(out, plan, run))
    return Submission(run, task, needs, plan.spec.run_timeout_s)


def _write_run(out: ResultDir, run: PlannedRun, result: RunResult, worker: str = FRESH) -> RunRecord:
    """A run's files in runs/<run_id>/: what it left on its host, the host's manifest (remote runs), its rows,
    then its status."""
    outcome = result.outcome
    workdir = out.path / "runs" / run.run_id
    for name, data in result.files.items():
        target = (workdir / name).resolve()
        if workdir.resolve() not in target.parents:  # a name from another machine never writes outside the run's folder
            raise ResultError(f"run {run.run_id} returned a file outside its folder: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_text(target, data)
    if result.host is not None:
        _atomic_text(workdir / HOST_MANIFEST, json.dumps(result.host, indent=2, default=str) + "\n")
    rows = [r.stamped(run.run_id, run.kind, run.labels) for r in outcome.rows]
    _atomic_text(workdir / "metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    record = RunRecord(run.run_id, run.kind, run.labels, DONE if outcome.ok else FAILED, outcome.seconds,
                       outcome.error, len(rows)).with_load(result.before, result.after)
    status = record.to_dict() | {"exitcode": outcome.exitcode, "worker": worker,
                                 "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if result.host is not None:
        status["host"] = result.host.get("hostname")
    # status.json last: a run counts as done only once its rows are safely on disk
    _atomic_text(workdir / "status.json", json.dumps(status, indent=2) + "\n")
    try:  # readable while the sweep goes on; rebuilt at the end
        with open_append(out.path / "metrics.jsonl") as live:
            live.write("".join(json.dumps(r.to_dict()) + "\n" for r in rows).encode())
    except (UnsafeFileError, OSError) as exc:
        raise ResultError(f"cannot write {out.path / 'metrics.jsonl'}: {exc}") from None
    return record


def _atomic_text(path: Path, text: str | bytes) -> None:
    try:
        atomic_write(path, text)
    except UnsafeFileError as exc:
        raise ResultError(str(exc)) from None


def _collect_rows(folder: Path, runs: list[PlannedRun]) -> list[MetricRow]:
    rows = []
    for run in runs:
        path = folder / "runs" / run.run_id / "metrics.jsonl"
        if path.exists():
            rows += [MetricRow.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]
    return rows


def _anchored_by_probe(out: ResultDir, plan: Plan, probe: PlannedRun) -> Plan:
    """The plan with every tier map re-resolved against the anchor the probe run took (its local figures), and the
    manifest rewritten to say so; the plan as it was when the probe took none or the plan is already anchored."""
    if plan.anchor is not None or plan.cached_calibration is None:
        return plan
    taken = anchor_from_rows(plan.cached_calibration, _collect_rows(out.path, [probe]))
    if taken is None:
        return plan
    cal, record = taken
    resolved = {path: resolve(plan.spec.tier_maps[path], plan.topology, calibration=cal) for path in plan.resolved}
    anchored_plan = replace(plan, resolved=resolved, calibration=cal, anchor=record)
    _update_manifest(out, anchored_plan)
    return anchored_plan


def _write_parquet(path: Path, table: list[dict[str, Any]]) -> None:
    """summary.csv again as Parquet, when pyarrow is installed (optional: nothing else needs it)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    pq.write_table(pa.Table.from_pylist([{k: None if v == "" else v for k, v in r.items()} for r in table]), path)


def _write_report(out: ResultDir) -> Path:
    from tieremu.report.html import write_report  # matplotlib: imported only when a report is drawn
    from tieremu.report.load import load_result

    return write_report([load_result(out.path, allow_partial=True)], out.path / "report.html",
                        plots_dir=out.path / "plots")
