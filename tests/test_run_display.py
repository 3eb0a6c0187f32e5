"""`tieremu run` as a person sees it, and the warm worker behind simulate replays: `--dry-run` lists the planned runs
and writes nothing; the progress names job, policy, sweep point and phase; the output ends with the summary table;
accounting-only runs share one warm worker process (recorded as `worker: warm`), measured ones get fresh ones."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from rich.console import Console

from tieremu.cli.run import _Reporter
from tieremu.cli.run import run as run_cmd
from tieremu.configfile import Section
from tieremu.numa.topology import discover
from tieremu.record.row import MetricRow
from tieremu.runner.experiment import run_experiment
from tieremu.runner.jobs import RunContext
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import PlannedRun, expand
from tieremu.runner.worker import RUNNING, RunTask, WarmWorker, worker_kind
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve
from tieremu.workloads.job import Job

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
# Two policies and the bounds over two capacities, plus a synthetic job (a kind that gets fresh processes).
SPEC = f"""name: tiny
tiers: {TIERS}
jobs:
  - kind: replay
    generate: {{kind: mix, requests: 12, seed: 1}}
    policies: [lru]
    sweep: {{fast_capacity_blocks: [5, 20]}}
  - kind: synthetic
    policies: []
    tokens: 4
    requests: 2
"""


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC)
    return path


@dataclass(frozen=True)
class PidParams:
    crash: str = "none"


class PidJob(Job):
    """Says which process ran it (and prints to its log); dies as asked."""

    kind = "pid"

    @classmethod
    def parse(cls, section: Section) -> PidParams:
        return PidParams(section.get("crash", str, "none"))

    @classmethod
    def run(cls, params: PidParams, ctx: RunContext) -> list[MetricRow]:
        print(f"hello from {ctx.run_id}", flush=True)
        if params.crash == "exit":
            os._exit(3)
        if params.crash == "hang":
            time.sleep(3600)
        return [ctx.row("pid", os.getpid(), "pid", "simulated")]


def _task(tmp_path: Path, run_id: str, crash: str = "none") -> RunTask:
    resolved = resolve(load_tier_map(TIERS), discover())
    ctx = RunContext(run_id, "pid", None, 0, 0, resolved, None, tmp_path / run_id)
    return RunTask(f"{__name__}:PidJob", PidParams(crash), ctx)


def test_the_warm_worker_reuses_one_process_and_survives_a_crash_and_a_timeout(tmp_path: Path) -> None:
    phases: list[str] = []
    with WarmWorker() as warm:
        first = warm.run(_task(tmp_path, "a"), 60, phases.append)
        second = warm.run(_task(tmp_path, "b"), 60)
        assert first.ok and second.ok, (first.error, second.error)
        pid = first.rows[0].value
        assert second.rows[0].value == pid != os.getpid()  # one process, not the runner's
        assert phases == [RUNNING]
        # each run's output in its own log, nothing of one run in another's
        assert (tmp_path / "a" / "worker.log").read_text() == "hello from a\n"
        assert (tmp_path / "b" / "worker.log").read_text() == "hello from b\n"
        died = warm.run(_task(tmp_path, "c", "exit"), 60)
        assert not died.ok and "exited with code 3" in (died.error or "") and "(warm worker)" in (died.error or "")
        assert "hello from c" in (died.error or "")  # the log's tail is quoted
        hung = warm.run(_task(tmp_path, "d", "hang"), 1)
        assert not hung.ok and "timed out after 1 s and was killed" in (hung.error or "")
        after = warm.run(_task(tmp_path, "e"), 60)
        assert after.ok and after.rows[0].value not in (pid, died.rows[0].value if died.rows else None)


def test_only_simulate_replays_are_warm() -> None:
    @dataclass
    class Mode:
        mode: str

    assert worker_kind("replay", Mode("simulate")) == "warm"
    assert worker_kind("replay", Mode("execute")) == "fresh"
    for kind in ("decode", "engine", "probe", "roundtrip", "synthetic", "mine"):
        assert worker_kind(kind, Mode("simulate")) == "fresh"


class Phases:
    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def planned(self, plan: Any, todo: int) -> None:
        pass

    def started(self, run: PlannedRun) -> None:
        self.seen[run.run_id] = []

    def phase(self, run: PlannedRun, phase: str) -> None:
        self.seen[run.run_id].append(phase)

    def finished(self, run: PlannedRun, record: Any) -> None:
        pass


def test_a_sweep_records_which_worker_ran_each_run_and_reports_phases(tmp_path: Path) -> None:
    listener = Phases()
    result = run_experiment(load_experiment(_spec(tmp_path)), tmp_path / "out", report=False, listener=listener)
    assert not result.failed
    manifest = json.loads((result.path / "manifest.json").read_text())
    planned = {r["run_id"]: r for r in manifest["extra"]["runs"]}
    for run in result.plan.runs:
        status = json.loads((result.path / "runs" / run.run_id / "status.json").read_text())
        expected = "warm" if run.kind == "replay" else "fresh"
        assert status["worker"] == planned[run.run_id]["worker"] == expected, run.run_id
        assert listener.seen[run.run_id] == ["start-up", "running", "writing"]
    assert sum(r.kind == "replay" for r in result.plan.runs) == 6  # lru, belady at 2 points; the static bounds once


def test_dry_run_lists_the_planned_runs_and_writes_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = CliRunner().invoke(run_cmd, [str(spec), "--dry-run", "--out", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    assert "8 planned runs (6 in the warm worker, 2 in fresh processes)" in out.output
    assert "fast_capacity_blocks=*" in out.output and "belady (bound)" in out.output
    assert "nothing was run or written" in out.output
    as_json = CliRunner().invoke(run_cmd, [str(spec), "--dry-run", "--json", "--out", str(tmp_path / "results")])
    data = json.loads(as_json.output)
    assert data["dry_run"] and [r["run_id"] for r in data["runs"]] == [r.run_id for r in expand(load_experiment(spec))]
    assert {r["worker"] for r in data["runs"] if r["job"] == "replay"} == {"warm"}
    assert [r["once_across"] for r in data["runs"] if r["policy"] == "all-fastest" and r["job"] == "replay"] == [
        ["fast_capacity_blocks"]]
    assert not (tmp_path / "results").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_the_output_names_runs_and_ends_with_the_summary_table(tmp_path: Path) -> None:
    out = CliRunner().invoke(run_cmd, [str(_spec(tmp_path)), "--out", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    lines = out.output.rstrip().splitlines()
    assert any(line.startswith("replay#0 lru fast_capacity_blocks=5 rep 0: done in ") for line in lines)
    assert any(line.startswith("replay#0 all-fastest fast_capacity_blocks=* rep 0: done") for line in lines)
    head = next(i for i, line in enumerate(lines) if "summary: median over repetitions" in line)
    assert lines[head - 1].startswith("results: ") and lines[-1].startswith("└")
    table = "\n".join(lines[head:])
    for heading in ("hit ratio dram", "STAR", "TPOT p50 ms"):
        assert heading in table
    rows = [line for line in lines[head:] if line.startswith("│")]
    assert len(rows) == 6 + 2  # replay: 2 points x (lru, belady) + each static bound once; synthetic: 2 bounds
    assert any("fast_capacity_blocks=*" in r and "all-slowest" in r for r in rows)


def test_the_progress_line_names_the_run_and_its_phase(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    reporter = _Reporter(console, bar=True, quiet=False)
    assert reporter.progress is not None
    reporter.task = reporter.progress.add_task("runs", total=1)
    run = next(r for r in expand(load_experiment(_spec(tmp_path))) if r.policy == "lru")
    reporter.started(run)
    reporter.phase(run, "running")
    task = reporter.progress.tasks[0]
    assert task.description == r"replay#0 lru fast_capacity_blocks=5 rep 0 \[running]"  # markup-escaped
    shown = Console(file=io.StringIO(), width=200, record=True)
    shown.print(reporter.progress.columns[1].render(task))
    assert "replay#0 lru fast_capacity_blocks=5 rep 0 [running]" in shown.export_text()


def test_report_prints_json_and_writes_its_page_into_the_out_folder(tmp_path: Path) -> None:
    from tieremu.cli.report import report as report_cmd

    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ntiers: {TIERS}\njobs:\n  - {{kind: synthetic, policies: [], tokens: 4, requests: 2}}\n")
    folder = run_experiment(load_experiment(spec), tmp_path / "out", report=False).path
    as_json = CliRunner().invoke(report_cmd, [str(folder), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["folders"][0]["path"] == str(folder) and data["tables"]
    assert {"title", "columns", "rows", "note"} <= set(data["tables"][0])
    page = CliRunner().invoke(report_cmd, [str(folder), "--out", str(tmp_path / "pages")])
    assert page.exit_code == 0, page.output
    html = tmp_path / "pages" / "report.html"
    assert Path(page.stdout.strip()) == html and html.is_file()
    as_file = CliRunner().invoke(report_cmd, [str(folder), "--out", str(tmp_path / "page.html")])
    assert as_file.exit_code == 2 and "--out is the folder the page goes into" in as_file.output
    assert not (tmp_path / "page.html").exists()


def test_probe_all_json_prints_the_folder_and_its_figures(tmp_path: Path, monkeypatch: Any) -> None:
    from tieremu.cli import probe as probe_cli

    def fake_run_all(topology: object, plan: object, out_root: Path, step: Any) -> Path:
        step("latency", 1)()
        folder = out_root / "probe" / "t"
        folder.mkdir(parents=True)
        (folder / "probe.json").write_text('{"latency": {"matrix": [[100.0]]}}')
        return folder

    monkeypatch.setattr(probe_cli, "run_all", fake_run_all)
    out = CliRunner().invoke(probe_cli.probe, ["all", "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)  # the progress went to stderr
    assert data == {"path": str(tmp_path / "probe" / "t"), "probe": {"latency": {"matrix": [[100.0]]}}}


def test_a_simulated_replay_gives_the_same_figures_warm_as_fresh(tmp_path: Path) -> None:
    """The warm worker carries nothing from one run into the next: the same replay, run second in the warm worker
    after another policy's run, gives exactly the figures of a fresh process (CPU time aside)."""
    from tieremu.runner.worker import run_isolated
    from tieremu.workloads.replay_job import ReplayJob

    params = ReplayJob.parse(Section({"generate": {"kind": "mix", "requests": 30, "seed": 4},
                                      "fast_capacity_blocks": 20}, "jobs[0]", tmp_path / "s.yaml"))
    resolved = resolve(load_tier_map(TIERS), discover())

    def task(run_id: str, policy: str) -> RunTask:
        ctx = RunContext(run_id, "replay", policy, 0, 0, resolved, None, tmp_path / run_id)
        return RunTask("tieremu.workloads.replay_job:ReplayJob", params, ctx)

    def figures(rows: list[MetricRow]) -> list[tuple[str, str | None, float]]:
        return [(r.metric, r.tier, r.value) for r in rows if r.metric != "policy_cpu_s"]

    fresh = run_isolated(task("fresh", "hotcold"), 120)
    with WarmWorker() as warm:
        assert warm.run(task("other", "lru"), 120).ok
        again = warm.run(task("warm", "hotcold"), 120)
    assert fresh.ok and again.ok, (fresh.error, again.error)
    assert figures(again.rows) == figures(fresh.rows) and len(figures(fresh.rows)) > 10
