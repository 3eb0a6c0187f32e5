"""`tieremu run [SPEC] [--out DIR] [--resume [DIR]] [--dry-run] [--json] [--backend local|ray [--address ADDR]]`: a
sweep, each run in its own worker process (here, or as Ray tasks across hosts), with a progress bar and ETA on a
terminal that names the running run (job, policy, sweep point) and its phase, a summary table at the end, and the
result folder and its report's path printed last. `--dry-run` prints the planned runs and runs nothing."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tieremu.cli.run_views import plan_table, run_name, summary_json, summary_table
from tieremu.record.runs import RunRecord
from tieremu.runner.backend import BACKENDS, choose, open_backend
from tieremu.runner.experiment import ExperimentResult, Plan, latest_folder, run_experiment
from tieremu.runner.spec import ExperimentSpec, load_experiment
from tieremu.runner.sweep import PlannedRun, expand
from tieremu.runner.worker import headline

LATEST = "<latest>"


def default_spec() -> Path:
    """The shipped default experiment: from the source tree tieremu runs from, else relative to here."""
    shipped = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "default.yaml"
    return shipped if shipped.exists() else Path("configs", "experiments", "default.yaml")


class _Reporter:
    """Progress as runs finish: on a terminal a bar with ETA whose line names the running run (job, policy, sweep
    point) and its phase (start-up, running, writing); otherwise one line per run; silent for --json."""

    def __init__(self, console: Console, *, bar: bool, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True) if bar and not quiet else None
        self.task: int | None = None

    def planned(self, plan: Plan, todo: int) -> None:
        if self.quiet:
            return
        for resolved in plan.resolved.values():  # what is real and what is emulated, before any figure
            for t in resolved.tiers:
                self.console.print(f"tier [bold]{t.name}[/] ({resolved.tier_map.name}): {t.label} — {t.reason}",
                                   highlight=False)
        for warning in plan.warnings:
            self.console.print(f"warning: {warning}", style="yellow", highlight=False, markup=False)
        total = len(plan.runs)
        self.console.print(f"{total} runs" if todo == total else
                           f"resuming: {total - todo} of {total} runs already done, {todo} to run", highlight=False)
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("runs", total=todo)

    def started(self, run: PlannedRun) -> None:
        self.phase(run, "queued")

    def phase(self, run: PlannedRun, phase: str) -> None:
        if self.progress is not None and self.task is not None:
            # escaped: the progress line reads markup, and "[running]" would be taken for a style
            self.progress.update(self.task, description=escape(f"{run_name(run)} [{phase}]"))

    def finished(self, run: PlannedRun, record: RunRecord) -> None:
        if self.quiet:
            return
        line = f"{run_name(run)}: {record.status} in {record.seconds:.1f} s ({run.run_id})"
        if record.error:
            line += f" — {headline(record.error)}"
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
            if record.error:
                self.progress.console.print(line, style="red", highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@click.command("run")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Results root; the run lands in OUT/<experiment>/<timestamp>/.")
@click.option("--resume", "resume", is_flag=False, flag_value=LATEST, default=None, metavar="[DIR]",
              help="Continue a result folder (default: the newest of this experiment, finished or not): runs "
                   "already done are kept, failed and missing ones run again.")
@click.option("--dry-run", is_flag=True,
              help="Print the planned runs (job, policy, sweep point, repetition; bounds that run once say so) and "
                   "exit 0: nothing is run, measured or written.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the outcome (with --dry-run: the plan) as JSON (no progress bar).")
@click.option("--strict", is_flag=True,
              help="Exit 3 when any run was noisy (steal, other processes' load): figures from a busy machine are "
                   "kept and flagged, but not passed as clean.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Where the runs execute: local (default; also the spec's `backend:`), one after another here; or "
                   "ray, each run a Ray task on a host that declares what it needs (tieremu ray-node), results "
                   "brought home into the one folder.")
@click.option("--address", default=None, metavar="ADDR",
              help="--backend ray: the cluster's head, HOST:PORT or ray://HOST:PORT (default: $RAY_ADDRESS, else a "
                   "Ray instance started here for this sweep).")
def run(spec: Path | None, out_root: Path, resume: str | None, dry_run: bool, as_json: bool, strict: bool,
        backend: str | None, address: str | None) -> None:
    """Run an experiment spec (default: configs/experiments/default.yaml): every run of its sweep in a worker
    process (fresh for measured runs, warm for simulated replays), the all-fastest and all-slowest bounds beside
    every policy; writes manifest.json, runs.jsonl, metrics.jsonl, summary.csv, runs/, plots/ and report.html.
    Exits 1 if any run failed, 3 with --strict if any was noisy. With --backend ray each run also gets
    runs/<id>/host.json (the host it ran on); run ids are the same on both backends, so --resume continues a
    folder either way."""
    if spec is None and resume not in (None, LATEST) and Path(resume).is_file():
        spec, resume = Path(resume), LATEST  # `run --resume SPEC`: the spec was taken as the folder
    experiment = load_experiment(spec or default_spec())
    if dry_run:
        if resume is not None:
            raise click.UsageError("--dry-run shows the plan of a fresh run; leave out --resume")
        _dry_run(experiment, as_json)
        return
    resume_dir = None
    if resume is not None:
        resume_dir = latest_folder(out_root, experiment.name) if resume == LATEST else Path(resume)
    console = Console(width=max(120, Console().width))
    if not as_json:
        console.print(f"[bold]{experiment.name}[/]" + (f": {experiment.description}" if experiment.description else ""))
    where = open_backend(choose(backend, experiment.backend), address)
    reporter = _Reporter(console, bar=console.is_terminal, quiet=as_json)
    try:
        try:
            result = run_experiment(experiment, out_root, resume=resume_dir, listener=reporter, backend=where)
        finally:
            reporter.close()
            if where is not None:
                where.close()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (tieremu.processes.Terminated)
        _interrupted(exc, spec)
    if as_json:
        click.echo(json.dumps(_as_json(result), indent=2))
    else:
        _print_outcome(console, result)
    if result.failed:
        sys.exit(1)
    if strict and result.noisy:
        click.echo(f"tieremu: --strict: {len(result.noisy)} of {len(result.records)} runs were noisy (see "
                   f"{result.path / 'runs.jsonl'}); run again on a quieter machine", err=True)
        sys.exit(3)


def _dry_run(experiment: ExperimentSpec, as_json: bool) -> None:
    """The planned runs, from the spec alone: expanded and validated as `run` would, nothing measured or written."""
    runs = expand(experiment)
    if as_json:
        click.echo(json.dumps({"experiment": experiment.name, "spec": str(experiment.source), "dry_run": True,
                               "runs": [r.to_dict() for r in runs]}, indent=2, default=str))
        return
    console = Console(width=max(120, Console().width))
    warm = sum(r.worker == "warm" for r in runs)
    console.print(plan_table(runs, f"{experiment.name}: {len(runs)} planned runs ({warm} in the warm worker, "
                                   f"{len(runs) - warm} in fresh processes)"))
    console.print("dry run: nothing was run or written", highlight=False)


def _interrupted(exc: KeyboardInterrupt, spec: Path | None) -> NoReturn:
    """A signal stopped the sweep: say which and where the results are, and exit as a shell reports a death by
    that signal (128 + its number), not with click's bare "Aborted!" and 1."""
    signum = getattr(exc, "signum", signal.SIGINT)
    folder = getattr(exc, "result_folder", None)
    resume = " ".join(["tieremu run", *([str(spec)] if spec else []), "--resume", str(folder)])
    where = f"; the result folder {folder} is marked failed (`{resume}` runs what is missing)" if folder else ""
    click.echo(f"tieremu: run stopped by {signal.Signals(signum).name}{where}", err=True)
    sys.exit(128 + signum)


def _print_outcome(console: Console, result: ExperimentResult) -> None:
    for record in result.noisy:  # before the tally, so that the last lines stay the outcome and the paths
        console.print(f"noisy: {record.run_id}: {'; '.join(record.noisy_why)}", style="yellow", highlight=False)
    done = sum(r.status == "done" for r in result.records)
    reused = sum(r.reused for r in result.records)
    console.print(f"runs: {done} done ({reused} from before), {len(result.failed)} failed, "
                  f"{len(result.records)} planned", highlight=False)
    for record in result.failed:
        console.print(f"failed: {record.run_id}: {headline(record.error)}", style="red", highlight=False)
    if result.report is not None:
        console.print(f"report: {result.report}", highlight=False, soft_wrap=True)
    console.print(f"results: {result.path}", highlight=False, soft_wrap=True)
    main_map = result.plan.resolved.get(result.plan.spec.tiers)
    fast = main_map.tiers[0].name if main_map is not None and main_map.tiers else None
    table = summary_table(result.summary, result.plan.runs, fast)
    if table is not None:  # printed last and not live: it stays on screen, and ends a log
        natural = Console(width=1000).measure(table).maximum  # as wide as it needs: a squeezed table breaks cells
        Console(width=max(console.width, natural), file=console.file).print(table)


def _as_json(result: ExperimentResult) -> dict[str, object]:
    return {"experiment": result.plan.spec.name, "path": str(result.path),
            "report": str(result.report) if result.report else None,
            "tiers": {path: [{"tier": t.name, "backing": t.label, "reason": t.reason} for t in r.tiers]
                      for path, r in result.plan.resolved.items()},
            "warnings": result.plan.warnings, "failed": len(result.failed),
            "noisy": [{"run_id": r.run_id, "why": r.noisy_why} for r in result.noisy],
            "summary": summary_json(result.summary),
            "runs": [r.to_dict() for r in result.records]}
