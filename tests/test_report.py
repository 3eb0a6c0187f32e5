"""`tieremu report`: tables per job and policy with the bounds and slowdown, provenance, comparisons, plots, and
refusal of anything unfinished. The folders come from real sweeps of the synthetic job."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.cli.report import report as report_cmd
from tieremu.errors import ReportError
from tieremu.record.row import MetricRow
from tieremu.record.stats import percentile
from tieremu.report.load import ResultSet, load_result
from tieremu.report.plots import all_plots
from tieremu.report.tables import Table, comparison_table, job_tables, provenance
from tieremu.runner.experiment import run_experiment
from tieremu.runner.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(root: Path, name: str, base_ms: float) -> Path:
    spec = root / f"{name}.yaml"
    spec.write_text(f"name: {name}\ntiers: {TIERS}\njobs:\n  - kind: synthetic\n    policies: [lru]\n"
                    f"    tokens: 16\n    requests: 4\n    base_ms: {base_ms}\n"
                    "sweep:\n  fast_capacity_mib: [256, 1024]\n")
    return run_experiment(load_experiment(spec), root / "out", report=False).path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sweep(tmp_path_factory.mktemp("a"), "capsweep", 10.0)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sweep(tmp_path_factory.mktemp("b"), "capsweep", 20.0)


def _copy(folder: Path, tmp_path: Path, name: str | None = None) -> Path:
    target = tmp_path / "capsweep" / (name or folder.name)
    shutil.copytree(folder, target)
    return target


def _table(tables: list[Table], title: str) -> Table:
    return next(t for t in tables if t.title == title)


def _column(table: Table, name: str) -> list[str]:
    i = table.columns.index(name)
    return [row[i] for row in table.rows]


def _tpot_p50(result: ResultSet, policy: str, capacity: int) -> float:
    runs = {r.run_id for r in result.runs if r.labels.get("policy") == policy
            and r.labels.get("fast_capacity_mib") == capacity}
    return percentile([r.value for r in result.rows if r.run in runs and r.metric == "tpot_ms"], 50)


def test_summary_per_policy_has_the_bounds_and_slowdown_against_all_fastest(folder: Path) -> None:
    result = load_result(folder)
    summary = _table(job_tables(result), "synthetic: summary per policy")
    assert summary.columns[:4] == ["policy", "fast_capacity_mib", "runs", "origin"]
    assert {"TPOT p50 ms", "TPOT p99 ms", "TTFT p50 ms", "TTFT p99 ms", "tokens/s", "hit dram", "hit far", "STRR",
            "STAR", "slowdown vs all-fastest"} <= set(summary.columns)
    # the migration rate in the unit that suits its figures (kB/s, MB/s or GB/s), the figures 1 to 999 in it
    [migration] = [c for c in summary.columns if c.startswith("migration ")]
    rates = [float(v.split()[0]) for v in _column(summary, migration) if v not in ("-", "0")]
    assert migration.split()[1] in ("kB/s", "MB/s", "GB/s") and rates and all(1 <= r < 1000 for r in sorted(rates)[
        len(rates) // 2:len(rates) // 2 + 1])
    assert [(r[0], r[1]) for r in summary.rows] == [(p, c) for c in ("256", "1024")
                                                    for p in ("all-fastest", "lru", "all-slowest")]
    for row, slowdown in zip(summary.rows, _column(summary, "slowdown vs all-fastest"), strict=True):
        policy, capacity = row[0], int(row[1])
        expected = _tpot_p50(result, policy, capacity) / _tpot_p50(result, "all-fastest", capacity)
        assert slowdown == f"{expected:.2f}x"
    hits = dict(zip(((r[0], r[1]) for r in summary.rows), _column(summary, "hit dram"), strict=True))
    assert hits[("all-fastest", "256")] == "1.00" and hits[("all-slowest", "256")] == "0"
    assert float(hits[("lru", "256")]) < float(hits[("lru", "1024")]) < 1  # more fast capacity, more fast hits
    assert set(_column(summary, "origin")) == {"simulated"} and set(_column(summary, "runs")) == {"1/1"}


def test_provenance_states_the_origins_and_the_emulated_tiers(folder: Path, memory_nodes: tuple[int, ...]) -> None:
    lines = provenance(load_result(folder))
    rows = len((folder / "metrics.jsonl").read_text().splitlines())
    assert lines[0] == f"origin of the figures: simulated ({rows} rows)"
    if 1 not in memory_nodes:
        assert "cxl (cxl-expander): emulated — node 1 missing" in lines[1]
    assert lines[2] == "runs: 6 done, 0 failed, 6 planned"


def test_unfinished_failed_and_broken_folders_are_refused(folder: Path, tmp_path: Path) -> None:
    partial = _copy(folder, tmp_path, folder.name + ".partial")
    with pytest.raises(ReportError, match=re.escape(f"{partial}: the run is still going or was interrupted")):
        load_result(partial)
    failed = _copy(folder, tmp_path, folder.name + ".failed")
    with pytest.raises(ReportError, match=re.escape(f"{failed}: the experiment failed (.failed)")):
        load_result(failed)
    broken = _copy(folder, tmp_path)
    with (broken / "metrics.jsonl").open("a") as f:
        f.write('{"run": "x"}\n')
    lines = len((broken / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ReportError, match=re.escape(f"metrics.jsonl:{lines}: not a metric row: missing")):
        load_result(broken)
    (broken / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics\.jsonl: missing"):
        load_result(broken)
    result = CliRunner().invoke(report_cmd, [str(partial)])
    assert isinstance(result.exception, ReportError)


def _append(folder: Path, rows: list[MetricRow]) -> None:
    with (folder / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r.to_dict()) + "\n" for r in rows)


def test_unknown_metrics_are_tabulated_generically(folder: Path, tmp_path: Path) -> None:
    copy = _copy(folder, tmp_path)
    run = load_result(copy).runs[1]
    values = [3.0, 1.0, 8.0]
    _append(copy, [MetricRow(run.run_id, "synthetic", "widgets", v, "w", "measured", "dram", seq=i,
                             params=dict(run.labels))
                   for i, v in enumerate(values)])
    other = _table(job_tables(load_result(copy)), "synthetic: other figures")
    [row] = [r for r in other.rows if r[2] == "widgets[dram]"]
    assert row[:2] == [run.labels["policy"], str(run.labels["fast_capacity_mib"])]
    assert row[3:] == ["3", "3.00", "1.00", "8.00", "w", "measured"]


def test_side_by_side_comparison_of_two_folders(folder: Path, other: Path) -> None:
    a, b = load_result(folder), load_result(other)
    table = comparison_table([a, b])
    assert table.columns[:2] == ["job", "policy / sweep point"]
    assert {"TPOT p50 A", "TPOT p50 B", "slowdown A", "slowdown B"} <= set(table.columns)
    row = next(r for r in table.rows if r[1] == "lru, fast_capacity_mib=256")
    tpot_a, tpot_b = (float(row[table.columns.index(f"TPOT p50 {x}")]) for x in "AB")
    assert tpot_a == pytest.approx(_tpot_p50(a, "lru", 256), abs=0.01)
    assert tpot_b == pytest.approx(_tpot_p50(b, "lru", 256), abs=0.01)
    assert tpot_b == pytest.approx(2 * tpot_a, rel=0.01)  # base_ms doubled, same seeds
    assert f"A = {a.name}" in table.note and f"B = {b.name}" in table.note


def test_plots_are_drawn_from_what_the_rows_hold(folder: Path, tmp_path: Path) -> None:
    copy = _copy(folder, tmp_path)
    names = {p.name for p in all_plots([load_result(copy)])}
    # 16 tokens and 4 requests a run: too few samples for a CDF, each is drawn as a point; the capacity sweep gets
    # the fast tier's hit ratio and STAR against capacity besides the headline
    assert names == {"synthetic-tpot_ms-samples", "synthetic-ttft_ms-samples", "synthetic-hits-per-tier",
                     "synthetic-tpot_p50-per-policy", "synthetic-tpot_p50-vs-fast_capacity_mib",
                     "synthetic-hit-vs-fast_capacity_mib", "synthetic-star-vs-fast_capacity_mib",
                     "synthetic-migration_gbps-over-time"}
    run = load_result(copy).runs[0]
    _append(copy, [MetricRow(run.run_id, "probe", "loaded_latency_ns", 100 + 10 * t, "ns", "measured", "dram", seq=i,
                             params={"mix": "100/0", "traffic_gb_per_s": float(t)}) for i, t in enumerate((0, 5, 10))])
    plots = all_plots([load_result(copy)])
    assert "bandwidth-latency" in {p.name for p in plots}
    assert all(p.png.startswith(PNG) and len(p.png) > 5000 and b"<svg" in p.svg for p in plots)


def test_cli_prints_tables_and_writes_one_self_contained_page(folder: Path, other: Path, tmp_path: Path) -> None:
    text = CliRunner().invoke(report_cmd, [str(folder)])
    assert text.exit_code == 0, text.output
    assert "synthetic: summary per policy" in text.output and "slowdown vs all-fastest" in text.output
    assert "origin of the figures: simulated" in text.output

    page = CliRunner().invoke(report_cmd, [str(folder), str(other), "--html", "--out", str(tmp_path / "page")])
    assert page.exit_code == 0, page.output
    out = tmp_path / "page" / "comparison.html"
    assert page.output.strip() == str(out)
    html = out.read_text()
    figures = sorted((tmp_path / "page" / "comparison-plots").iterdir())  # every figure as files too, for papers
    assert {f.suffix for f in figures} == {".svg", ".png", ".json"} and len(figures) >= 11
    assert "comparison of result folders" in html
    assert html.count("<svg") == html.count("<figure") >= 5 and "<img" not in html  # inline SVG, no image files
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from anywhere

    default = CliRunner().invoke(report_cmd, [str(folder), "--html"])
    assert default.output.strip() == str(folder / "report.html") and (folder / "report.html").exists()
