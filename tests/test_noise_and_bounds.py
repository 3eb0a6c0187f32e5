"""Figures you can trust: a run beside a CPU hog is flagged noisy (runs.jsonl, summary, report header, --strict);
a policy whose CI lies beyond a bound's CI is flagged "outside bounds"; the summary is long-format with CIs; the
statistics function itself; and result folders the report cannot read are refused with a clear message."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.cli.report import report as report_cmd
from tieremu.cli.run import run as run_cmd
from tieremu.errors import ReportError
from tieremu.record.row import MetricRow
from tieremu.record.runs import DONE, RunRecord
from tieremu.record.stats import describe
from tieremu.report.load import ResultSet, load_result
from tieremu.report.tables import Table, job_tables, provenance

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
HOG = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end:\n    pass\n"  # spins: pure CPU


def _spec(tmp_path: Path, reps: int = 2) -> Path:
    spec = tmp_path / "noise.yaml"
    spec.write_text(f"name: noise\ntiers: {TIERS}\nrepetitions: {reps}\njobs:\n  - kind: synthetic\n"
                    "    policies: [lru]\n    tokens: 16\n    requests: 4\n")
    return spec


@pytest.fixture
def cpu_hog() -> Iterator[list[subprocess.Popen]]:
    """One spinning process per CPU, started here and stopped (by pid) when the test ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 1)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def test_runs_beside_a_cpu_hog_are_flagged_noisy_everywhere(tmp_path: Path, cpu_hog: list) -> None:
    out = CliRunner().invoke(run_cmd, [str(_spec(tmp_path)), "--out", str(tmp_path / "out"), "--strict", "--json"])
    assert out.exit_code == 3, out.output  # --strict refuses to pass a noisy run set as clean
    assert "--strict" in out.output and "were noisy" in out.output
    [folder] = (tmp_path / "out" / "noise").iterdir()
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 6 and all(r["status"] == DONE for r in runs)
    for r in runs:
        assert r["noisy"], r
        assert any("other processes used" in why for why in r["noisy_why"]), r["noisy_why"]
        assert r["others_fraction"] > 0.25 and r["load_before"]["busy_ticks"] <= r["load_after"]["busy_ticks"]
    with (folder / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert summary and all(row["noisy_runs"] == "2" for row in summary)  # both repetitions of every group
    header = provenance(load_result(folder))
    noisy_line = next(line for line in header if line.startswith("NOISY:"))
    assert noisy_line.startswith("NOISY: 6 of 6 runs ran on a busy machine")
    assert all(r["run_id"] in noisy_line for r in runs)


def test_summary_is_long_format_with_a_ci_per_group(tmp_path: Path) -> None:
    out = CliRunner().invoke(run_cmd, [str(_spec(tmp_path, reps=3)), "--out", str(tmp_path / "out"), "--json"])
    assert out.exit_code == 0, out.output
    [folder] = (tmp_path / "out" / "noise").iterdir()
    with (folder / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    tpot = {r["policy"]: r for r in summary if r["metric"] == "tpot_ms"}
    assert set(tpot) == {"lru", "all-fastest", "all-slowest"}
    metrics = [MetricRow.from_dict(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for policy, row in tpot.items():
        assert (row["n"], row["unit"], row["origin"], row["job"], row["tier"]) == ("3", "ms", "simulated",
                                                                                  "synthetic", "")
        per_run: dict[str, list[float]] = {}
        for m in metrics:
            if m.metric == "tpot_ms" and m.policy == policy:
                per_run.setdefault(m.run, []).append(m.value)
        expected = describe([statistics.median(v) for v in per_run.values()])  # over the runs' own medians
        assert float(row["median"]) == pytest.approx(expected.median)
        assert float(row["ci_low"]) == pytest.approx(expected.ci_low) and float(row["ci_high"]) == \
            pytest.approx(expected.ci_high)
        assert float(row["ci_low"]) < float(row["mean"]) < float(row["ci_high"])
    hits = {(r["policy"], r["tier"]) for r in summary if r["metric"] == "hit_ratio"}
    assert ("lru", "dram") in hits and ("lru", "far") in hits and ("lru", "") in hits  # tier is a column
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [(r["labels"]["rep"], r["labels"]["policy"]) for r in runs] == [
        (0, "lru"), (0, "all-fastest"), (0, "all-slowest"), (1, "all-slowest"), (1, "all-fastest"), (1, "lru"),
        (2, "lru"), (2, "all-fastest"), (2, "all-slowest")]  # arms interleaved, ABBA
    assert json.loads((folder / "manifest.json").read_text())["extra"]["schema_version"] == 2
    # the terminal report shows the interval beside the figure
    text = CliRunner().invoke(report_cmd, [str(folder)]).output
    assert re.search(r"\d\.\d+ \[\d+\.\d+-\d+\.\d+\]", text), text


def test_describe_is_the_t_interval_of_the_mean() -> None:
    s = describe([10.0, 12.0, 11.0, math.nan])
    assert (s.n, s.median, s.mean, s.min, s.max) == (3, 11.0, 11.0, 10.0, 12.0)
    assert s.ci_high - s.mean == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * sd / sqrt(n)
    one = describe([5.0])
    assert one.median == 5.0 and not one.has_ci and describe([]).n == 0


def _fed(tpot_by_policy: dict[str, list[float]]) -> ResultSet:
    """A result set built from given per-run TPOT figures (3 samples each, all equal to the run's figure)."""
    runs, rows = [], []
    for policy, per_run in tpot_by_policy.items():
        for rep, value in enumerate(per_run):
            run_id = f"decode-{policy}-r{rep}"
            labels = {"policy": policy, "rep": rep}
            runs.append(RunRecord(run_id, "decode", labels, DONE, 1.0, None))
            rows += [MetricRow(run_id, "decode", "tpot_ms", value, "ms", "measured", seq=i, params=labels)
                     for i in range(3)]
    return ResultSet(Path("/fed/decode/20260101-000000"), {"extra": {"runs": [], "schema_version": 2}}, rows, runs)


def _bounds(table: Table) -> dict[str, str]:
    return {row[0]: row[table.columns.index("bounds")] for row in table.rows}


def test_a_policy_beating_all_fastest_beyond_its_ci_is_flagged_outside_bounds() -> None:
    result = _fed({"lru": [3.0, 3.1, 2.9], "hotcold": [6.0, 6.2, 5.9], "slowpoke": [12.0, 12.5, 12.2],
                   "all-fastest": [5.0, 5.1, 4.9], "all-slowest": [10.0, 10.2, 9.9]})
    [summary] = [t for t in job_tables(result) if t.title.startswith("decode: summary")]
    bounds = _bounds(summary)
    assert bounds["lru"] == "outside bounds (faster than all-fastest)"
    assert bounds["slowpoke"] == "outside bounds (slower than all-slowest)"
    assert bounds["hotcold"] == "within" and bounds["all-fastest"] == "" and bounds["all-slowest"] == ""
    assert "outside bounds: the policy's CI lies beyond a bound's CI" in summary.note


def test_overlapping_cis_or_single_runs_are_not_flagged() -> None:
    overlap = _fed({"lru": [4.0, 5.5, 4.6], "all-fastest": [5.0, 5.1, 4.9], "all-slowest": [10.0, 10.2, 9.9]})
    [summary] = [t for t in job_tables(overlap) if t.title.startswith("decode: summary")]
    assert _bounds(summary)["lru"] == "within"
    single = _fed({"lru": [3.0], "all-fastest": [5.0], "all-slowest": [10.0]})
    [summary] = [t for t in job_tables(single) if t.title.startswith("decode: summary")]
    assert _bounds(summary)["lru"] == "-"  # one run: no interval, nothing can be told


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fin")
    out = CliRunner().invoke(run_cmd, [str(_spec(root, reps=1)), "--out", str(root / "out"), "--json"])
    assert out.exit_code == 0, out.output
    [folder] = (root / "out" / "noise").iterdir()
    return folder


def _refused(folder: Path) -> str:
    out = CliRunner().invoke(report_cmd, [str(folder)])
    assert isinstance(out.exception, ReportError), out.output
    return str(out.exception)


def test_report_refuses_foreign_unreadable_and_newer_folders(finished: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert _refused(foreign) == (f"{foreign}: not a tieremu result folder (no manifest.json); give a folder that "
                                 "`tieremu run` wrote: results/<experiment>/<timestamp>/")
    unreadable = tmp_path / "noise" / "unreadable"
    unreadable.mkdir(parents=True)
    (unreadable / "manifest.json").mkdir()  # reading it fails even as root, unlike a chmod
    assert _refused(unreadable).startswith(f"{unreadable / 'manifest.json'}: cannot be read: ")
    newer = tmp_path / "noise" / finished.name
    shutil.copytree(finished, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["extra"]["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    assert "schema_version 99 is not one this tieremu reads (1 to 2)" in _refused(newer)


def test_report_reads_a_schema_1_folder(finished: Path, tmp_path: Path) -> None:
    """An old folder: no runs.jsonl, no schema_version, `sample` instead of `seq`: read, noise said unrecorded."""
    old = tmp_path / "noise" / finished.name
    shutil.copytree(finished, old)
    (old / "runs.jsonl").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["extra"]["schema_version"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["sample"] = row.pop("seq")
        row.pop("phase")
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for status in (old / "runs").glob("*/status.json"):
        data = json.loads(status.read_text())
        status.write_text(json.dumps({k: data[k] for k in ("run_id", "status", "seconds", "error", "rows")}))
    result = load_result(old)
    assert result.schema_version == 1 and len(result.runs) == 3 and all(r.status == DONE for r in result.runs)
    assert {r.seq for r in result.rows if r.metric == "tpot_ms"} == set(range(16))
    assert "noise: not recorded (a schema 1 folder)" in provenance(result)
    assert CliRunner().invoke(report_cmd, [str(old)]).exit_code == 0
