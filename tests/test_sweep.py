"""The sweep engine: strict specs, matrix expansion with the bounds, stable run ids, isolated workers that may
crash, and --resume. Uses the synthetic job (figures computed, not measured) so each run costs one process start."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.cli.run import run as run_cmd
from tieremu.errors import ConfigError, ResolutionError
from tieremu.record.row import MetricRow
from tieremu.record.stats import percentile
from tieremu.runner.experiment import latest_folder, run_experiment
from tieremu.runner.jobs import BASELINES, JobRegistry, SyntheticJob, default_registry
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"


def _spec(tmp_path: Path, body: str, name: str = "sweep") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\ntiers: {TIERS}\n{body}")
    return p


SYNTHETIC = "jobs:\n  - kind: synthetic\n    policies: [lru, hotcold]\n    tokens: 8\n    requests: 4\n"


# ---- validation before any work ----

@pytest.mark.parametrize(("body", "message"), [
    ("colour: blue\n" + SYNTHETIC, r"colour: unknown key; valid keys here: .*jobs.*sweep"),
    ("jobs:\n  - kind: synthetic\n    policies: [lru]\n    tokenz: 8\n",
     r"jobs\[0\]\.tokenz: unknown key; valid keys here: .*tokens"),
    ("jobs:\n  - kind: decoed\n",
     r"jobs\[0\]\.kind: unknown job kind 'decoed'; valid: cluster, decode, engine, probe, replay, roundtrip, "
     r"synthetic"),
    ("jobs:\n  - kind: synthetic\n    policies: [lru, lur]\n",
     r"jobs\[0\]\.policies\[1\]: unknown policy 'lur'; valid: all-fastest, all-slowest, hotcold, lfu, lru"),
    (SYNTHETIC + "sweep:\n  capacity: [1, 2]\n", r"sweep\.capacity: no job takes 'capacity'; axes the jobs take: .*"
                                                 r"fast_capacity_mib"),
    (SYNTHETIC + "sweep:\n  policy: [lru, belady]\n", r"sweep\.policy\[1\]: unknown policy 'belady'"),
    ("jobs:\n  - kind: roundtrip\n    policies: [lru]\n", r"jobs\[0\]\.policies: job 'roundtrip' takes no policies"),
    ("jobs: []\n", r"jobs: nothing to run"),
    ("repetitions: 0\n" + SYNTHETIC, r"repetitions: 0: must be an integer >= 1 and <= 1000"),
])
def test_spec_errors_name_the_key_and_the_valid_choices(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(_spec(tmp_path, body))


def test_a_bad_sweep_value_fails_at_expansion_naming_the_point(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, SYNTHETIC + "sweep:\n  fast_capacity_mib: [256, -1]\n"))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.fast_capacity_mib: -1: must be positive "
                                          r"\(sweep point \{'fast_capacity_mib': -1\}\)"):
        expand(spec)


def test_an_unresolvable_tier_map_fails_before_any_folder_exists(tmp_path: Path, missing_node: int) -> None:
    tiers = tmp_path / "t.yaml"
    tiers.write_text(f"name: strict\ntiers:\n  - {{name: dram, nodes: [0]}}\n"
                     f"  - {{name: cxl, nodes: [{missing_node}]}}\n")
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: strict\ntiers: t.yaml\n{SYNTHETIC}")
    with pytest.raises(ResolutionError, match=f"tier 'cxl': node {missing_node} does not exist"):
        run_experiment(load_experiment(spec), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_policy_validation_follows_the_job_declaration() -> None:
    registry = default_registry()
    assert registry.validate_policy(SyntheticJob, "all-slowest") is None
    assert registry.validate_policy(SyntheticJob, "lfu") is None
    assert "unknown policy 'lrux'" in (registry.validate_policy(SyntheticJob, "lrux") or "")
    assert JobRegistry().lookup("synthetic") is None
    assert JobRegistry().lookup("tieremu.runner.jobs:SyntheticJob") is SyntheticJob
    with pytest.raises(ConfigError, match=r"'tieremu\.runner\.jobs:Nope' cannot be loaded"):
        JobRegistry().lookup("tieremu.runner.jobs:Nope")


# ---- expansion ----

def test_matrix_expands_with_both_bounds_beside_every_point(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, "repetitions: 2\n" + SYNTHETIC +
                                 "    sweep: {working_set_mib: [512, 2048]}\n"
                                 f"sweep:\n  fast_capacity_mib: [128, 256, 1024]\n  tiers: [{TIERS}, "
                                 f"{REPO / 'configs/tiers/single-node.yaml'}]\n"))
    runs = expand(spec)
    policies = ("lru", "hotcold", *BASELINES)
    assert len(runs) == 2 * 3 * 2 * len(policies) * 2  # tier maps × capacities × working sets × policies × reps
    points = {(r.tiers, r.axes["fast_capacity_mib"], r.axes["working_set_mib"]) for r in runs}
    assert len(points) == 12
    for point in points:
        here = [r for r in runs if (r.tiers, r.axes["fast_capacity_mib"], r.axes["working_set_mib"]) == point]
        assert sorted({r.policy for r in here}) == sorted(policies)
        assert sorted(r.repetition for r in here if r.policy == "all-fastest") == [0, 1]
    assert all(r.params.fast_capacity_mib == r.axes["fast_capacity_mib"] for r in runs)
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_ids_are_stable_and_change_with_what_the_run_does(tmp_path: Path) -> None:
    first = [r.run_id for r in expand(load_experiment(_spec(tmp_path, SYNTHETIC)))]
    again = [r.run_id for r in expand(load_experiment(_spec(tmp_path, SYNTHETIC)))]
    changed = [r.run_id for r in expand(load_experiment(_spec(tmp_path, SYNTHETIC + "    base_ms: 11\n")))]
    assert first == again
    assert not set(first) & set(changed)
    assert first[0].startswith("synthetic-lru-r0-")


def test_probe_stage_runs_first_once_per_tier_map(tmp_path: Path) -> None:
    runs = expand(load_experiment(_spec(tmp_path, "probe: true\n" + SYNTHETIC)))
    assert [r.kind for r in runs[:1]] == ["probe"] and [r.kind for r in runs].count("probe") == 1


# ---- running: isolation, crashes, resume ----

def _rows(folder: Path) -> list[MetricRow]:
    return [MetricRow.from_dict(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_that_kills_its_process_is_recorded_and_the_others_complete(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, "jobs:\n  - kind: synthetic\n    policies: [lru, lfu]\n    tokens: 8\n"
                                           "    crash: signal\n    crash_policy: lru\n"))
    result = run_experiment(spec, tmp_path / "out")
    folder = result.path
    assert folder.parent == tmp_path / "out" / "sweep" and not folder.name.endswith((".partial", ".failed"))
    status = {r.run_id: r for r in result.records}
    [crashed] = result.failed
    assert crashed.run_id.startswith("synthetic-lru-") and "SIGSEGV" in (crashed.error or "")
    assert "Fatal Python error" in (crashed.error or "")  # faulthandler's dump from the worker's log
    on_disk = json.loads((folder / "runs" / crashed.run_id / "status.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["exitcode"] == -11
    assert sorted(r.policy for r in result.plan.runs if status[r.run_id].status == "done") == \
        ["all-fastest", "all-slowest", "lfu"]
    rows = _rows(folder)
    assert {r.run for r in rows} == {r.run_id for r in result.records if r.status == "done"}
    assert sum(r.metric == "tpot_ms" for r in rows) == 3 * 8
    runs = {r["run_id"]: r for r in map(json.loads, (folder / "runs.jsonl").read_text().splitlines())}
    assert runs[crashed.run_id]["status"] == "failed" and "SIGSEGV" in runs[crashed.run_id]["error"]
    assert all({"load_before", "load_after", "steal_fraction", "noisy", "noisy_why"} <= set(r) for r in runs.values())
    with (folder / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert list(summary[0])[:16] == ["metric", "unit", "origin", "job", "tier", "policy", "phase", "point", "n",
                                     "median", "mean", "ci_low", "ci_high", "min", "max", "noisy_runs"]
    assert not any(r["policy"] == "lru" for r in summary)  # the crashed arm has no figures
    lfu = next(r for r in result.plan.runs if r.policy == "lfu")
    tpots = [r.value for r in rows if r.run == lfu.run_id and r.metric == "tpot_ms"]
    [lfu_tpot] = [r for r in summary if r["policy"] == "lfu" and r["metric"] == "tpot_ms"]
    # one repetition: its run's median, and no interval to claim
    assert (lfu_tpot["n"], lfu_tpot["unit"], lfu_tpot["ci_low"]) == ("1", "ms", "")
    assert float(lfu_tpot["median"]) == pytest.approx(percentile(tpots, 50))
    assert (folder / "report.html").exists()


@pytest.mark.parametrize(("crash", "expected"), [
    ("raise", "RuntimeError: synthetic crash requested (crash: raise)"),
    ("exit", "the worker process exited with code 3 before returning a result"),
    ("hang", "timed out after 5 s and was killed"),  # generous: the other run must not time out
])
def test_every_way_a_run_can_die_is_named(tmp_path: Path, crash: str, expected: str) -> None:
    spec = load_experiment(_spec(tmp_path, "run_timeout_s: 5\njobs:\n  - kind: synthetic\n    policies: []\n"
                                           f"    crash: {crash}\n    crash_policy: all-slowest\n"))
    result = run_experiment(spec, tmp_path / "out", report=False)
    [failed] = result.failed
    assert expected in (failed.error or "")
    assert [r.status for r in result.records] == ["done", "failed"]  # all-fastest ran, all-slowest died


def test_resume_reruns_only_what_failed_and_finishes_the_folder(tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    spec_path = _spec(tmp_path, "jobs:\n  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n"
                                f"    crash: exit\n    crash_policy: lru\n    crash_unless: {marker}\n")
    first = run_experiment(load_experiment(spec_path), tmp_path / "out", report=False)
    [failed] = first.failed
    done_before = {r.run_id: (first.path / "runs" / r.run_id / "status.json").read_text()
                   for r in first.records if r.status == "done"}
    # An interrupted folder is partial; --resume without DIR picks it (the newest of the experiment).
    partial = first.path.with_name(first.path.name + ".partial")
    first.path.rename(partial)
    assert latest_folder(tmp_path / "out", "sweep") == partial

    marker.touch()  # the cause is fixed
    second = run_experiment(load_experiment(spec_path), tmp_path / "out", resume=partial, report=False)
    assert second.path == first.path and not partial.exists()
    assert not second.failed
    by_id = {r.run_id: r for r in second.records}
    assert not by_id[failed.run_id].reused and all(by_id[i].reused for i in done_before)
    for run_id, text in done_before.items():  # untouched: not run again
        assert (second.path / "runs" / run_id / "status.json").read_text() == text
    rows = _rows(second.path)
    assert {r.run for r in rows} == set(by_id) and sum(r.metric == "tpot_ms" for r in rows) == 3 * 4
    manifest = json.loads((second.path / "manifest.json").read_text())
    assert len(manifest["extra"]["earlier_attempts"]) == 1


def test_cli_run_json_and_resume_of_the_latest_folder(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "jobs:\n  - kind: synthetic\n    policies: []\n    tokens: 4\n    crash: exit\n"
                           "    crash_policy: all-slowest\n")
    out = tmp_path / "out"
    first = CliRunner().invoke(run_cmd, [str(spec), "--out", str(out), "--json"])
    assert first.exit_code == 1, first.output  # a failed run fails the command, after the folder is complete
    data = json.loads(first.output)
    assert data["failed"] == 1 and Path(data["path"]).is_dir() and Path(data["report"]).is_file()
    assert data["tiers"][str(TIERS)][0]["backing"] in ("real", "vm")

    again = CliRunner().invoke(run_cmd, [str(spec), "--out", str(out), "--resume", "--json"])
    assert again.exit_code == 1
    resumed = json.loads(again.output)
    assert resumed["path"] == data["path"]
    assert [r["reused"] for r in resumed["runs"]] == [True, False]


def test_cli_bad_spec_creates_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "jobs:\n  - kind: synthetic\n    policies: [lru, nosuch]\n")
    result = CliRunner().invoke(run_cmd, [str(spec), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError) and "unknown policy 'nosuch'" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_a_job_level_tiers_axis_loads_and_resolves_its_maps(tmp_path: Path) -> None:
    single = REPO / "configs" / "tiers" / "single-node.yaml"
    spec = load_experiment(_spec(tmp_path, "probe: true\n" + SYNTHETIC + f"    sweep: {{tiers: [{single}]}}\n"))
    assert set(spec.tier_maps) == {str(TIERS), str(single)}
    runs = expand(spec)
    assert {r.tiers for r in runs} == {str(single)}  # the job's axis replaces the default map
    assert [r.tiers for r in runs if r.kind == "probe"] == [str(single)]  # probed: the map the runs use
