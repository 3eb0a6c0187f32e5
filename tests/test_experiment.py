"""The default experiment and the shipped jobs end to end: result folder, manifest, round-trip and probe figures,
and what a failed experiment leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.record.row import MetricRow
from tieremu.runner import experiment as experiment_mod
from tieremu.runner.experiment import run_experiment
from tieremu.runner.results import ResultDir
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "experiments" / "default.yaml"
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"


def _spec(tmp_path: Path, jobs: str, extra: str = "") -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(f"name: small\ntiers: {TIERS}\n{extra}jobs:\n{jobs}")
    return p


ROUNDTRIP = "  - kind: roundtrip\n    route: [dram, cxl, far]\n    size_mib: 16\n    check_mib: 1\n"


def _rows(folder: Path) -> list[MetricRow]:
    return [MetricRow.from_dict(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_default_spec_validates_and_plans_probe_round_trip_decode_and_replay_with_bounds() -> None:
    spec = load_experiment(DEFAULT)
    assert spec.name == "default" and spec.tier_map.name == "cxl-expander" and spec.probe
    runs = expand(spec)
    # timing jobs repeat (3 by default), accounting-only replay runs once per fast-tier capacity (three), its static
    # bounds once across capacities
    assert [r.kind for r in runs] == ["probe"] + ["roundtrip"] * 3 + ["decode"] * 12 + ["replay"] * 14
    assert runs[1].params.route == ("dram", "cxl", "far")
    # the arms of the decode comparison interleave, ABBA across repetitions, so drift weighs on all alike
    arms = ["lru-epoch", "hotcold", "all-fastest", "all-slowest"]
    assert [(r.repetition, r.policy) for r in runs if r.kind == "decode"] == \
        [(0, a) for a in arms] + [(1, a) for a in reversed(arms)] + [(2, a) for a in arms]
    # the all-fastest / all-slowest bounds run beside every policy of a job
    assert sorted({r.policy for r in runs if r.kind == "decode"}) == ["all-fastest", "all-slowest", "hotcold",
                                                                      "lru-epoch"]
    assert sorted(r.policy for r in runs if r.kind == "replay") == [
        "all-fastest", "all-slowest", *sorted(["belady", "hotcold", "lookahead", "lru"] * 3)]
    assert sorted({r.axes["fast_capacity_blocks"] for r in runs if r.kind == "replay"}) == [25, 100, 400]


def test_round_trip_writes_a_complete_labelled_result_folder(tmp_path: Path, memory_nodes: tuple[int, ...]) -> None:
    result = run_experiment(load_experiment(_spec(tmp_path, ROUNDTRIP, "repetitions: 1\n")), tmp_path / "out")
    assert not result.failed, result.failed
    folder = result.path
    assert folder.parent == tmp_path / "out" / "small" and not folder.name.endswith((".partial", ".failed"))
    assert sorted(p.name for p in folder.iterdir() if p.name != "summary.parquet") == \
        ["manifest.json", "metrics.jsonl", "plots", "report.html", "runs", "runs.jsonl", "summary.csv"]
    [run] = result.plan.runs
    assert sorted(p.name for p in (folder / "runs" / run.run_id).iterdir()) == ["metrics.jsonl", "status.json",
                                                                                "worker.log"]

    manifest = json.loads((folder / "manifest.json").read_text())
    extra = manifest["extra"]
    assert extra["experiment"] == "small" and [r["run_id"] for r in extra["runs"]] == [run.run_id]
    tiers = {t["tier"]: t for t in extra["tiers"]}
    for name, node in (("dram", 0), ("cxl", 1), ("far", 2)):
        assert tiers[name]["backing"] == ("real" if node in memory_nodes else "emulated")
    assert manifest["kernel"].startswith("Linux") and manifest["packages"]["torch"].startswith("2.")
    assert isinstance(manifest["lab_profiles"], list) and manifest["command"]
    assert (extra["calibration"] is None) == (len(memory_nodes) >= 3)

    rows = _rows(folder)
    hops = sorted((r for r in rows if r.metric == "migration_gbps"), key=lambda r: r.seq or 0)
    assert [(h.params["source"], h.params["target"]) for h in hops] == [("dram", "cxl"), ("cxl", "far"),
                                                                          ("far", "dram")]
    assert all(r.value == 1.0 for r in rows if r.metric in ("checksum_ok", "fraction_on_target"))
    assert {r.tier for r in rows if r.metric == "placement_fraction"} == {"dram", "cxl", "far"}
    assert all(r.origin in ("measured", "emulated", "vm") and r.run == run.run_id for r in rows)
    if len(memory_nodes) == 1:  # every hop touches an emulated tier here, and says so
        assert {h.origin for h in hops} == {"emulated"}
        assert all(h.params["moved"] == 0 and h.params["already"] == 16 * 256 for h in hops)
        assert [r.value > 0 for r in rows if r.metric == "hop_injected_s"] == [True] * 3
        audits = {r.tier: r for r in rows if r.metric == "injected_delay_s"}
        assert set(audits) == {"cxl", "far"} and all(a.value > 0 and a.origin == "emulated" for a in audits.values())
        assert audits["cxl"].params["charged_bytes"] == 2 * 16 << 20  # in from dram, out to far


def test_probe_job_measures_every_tier_through_its_own_path(tmp_path: Path, memory_nodes: tuple[int, ...]) -> None:
    jobs = "  - kind: probe\n    size_mib: 8\n    repeats: 1\n    loaded: false\n"
    result = run_experiment(load_experiment(_spec(tmp_path, jobs)), tmp_path / "out", report=False)
    assert not result.failed
    rows = {(r.metric, r.tier): r for r in _rows(result.path)}
    for tier, node in (("dram", 0), ("cxl", 1), ("far", 2)):
        latency = rows[("latency_ns", tier)]
        read = rows[("read_gb_per_s", tier)]
        assert latency.value > 0 and read.value > 0
        emulated = node not in memory_nodes
        assert latency.origin == ("emulated" if emulated else "measured")
        assert (latency.params["requested"] is not None) == emulated  # a target only where a model applies
    if len(memory_nodes) == 1:  # the emulated tiers are slower than the real one they live on
        assert rows[("latency_ns", "far")].value > rows[("latency_ns", "dram")].value
        assert rows[("read_gb_per_s", "far")].value < rows[("read_gb_per_s", "dram")].value


def test_an_experiment_that_fails_is_left_marked_failed_never_complete(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(experiment_mod, "summarise", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_experiment(load_experiment(_spec(tmp_path, ROUNDTRIP)), tmp_path / "out", report=False)
    [entry] = (tmp_path / "out" / "small").iterdir()
    assert entry.name.endswith(".failed")
    assert "disk on fire" in (entry / "error.txt").read_text()
    assert not (entry / "summary.csv").exists()


def test_result_dir_is_partial_until_finished(tmp_path: Path) -> None:
    out = ResultDir(tmp_path, "exp", "t1")
    out.write_json("a.json", {"x": 1})
    assert out.path.name == "t1.partial" and not (tmp_path / "exp" / "t1").exists()
    assert not list(out.path.glob(".*.tmp"))
    final = out.finish()
    assert final == tmp_path / "exp" / "t1" and json.loads((final / "a.json").read_text()) == {"x": 1}


def test_unknown_top_level_key_is_an_error_listing_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colour: unknown key; valid keys here: backend, description, jobs, "
                                          "lab_profile, name, probe, repetitions, run_timeout_s, seed, sweep, tiers"):
        load_experiment(_spec(tmp_path, ROUNDTRIP, "colour: blue\n"))


def test_route_naming_an_unknown_tier_lists_the_tiers(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, "  - kind: roundtrip\n    route: [dram, hbm]\n"))
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.route\[1\]: 'hbm' is not a tier of 'cxl-expander'; "
                                          "tiers: dram, cxl, far"):
        expand(spec)


def test_tier_map_path_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text("name: x\ntiers: nowhere.yaml\nprobe: true\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere.yaml'}: file not found"):
        load_experiment(p)


def test_expected_lab_profile_that_is_not_active_is_warned_in_the_manifest(tmp_path: Path) -> None:
    spec = load_experiment(_spec(tmp_path, "  - kind: synthetic\n    policies: []\n    tokens: 2\n",
                                 "lab_profile: cxl-cpuless-node1\n"))
    result = run_experiment(spec, tmp_path / "out", report=False)
    warnings = json.loads((result.path / "manifest.json").read_text())["extra"]["warnings"]
    assert len(warnings) == 1 and "lab profile 'cxl-cpuless-node1' expected by the spec is not active" in warnings[0]


def test_the_readmes_first_command_runs_the_default_experiment_to_a_report(tmp_path: Path,
                                                                            memory_nodes: tuple[int, ...]) -> None:
    """What `bash scripts/run.sh` runs after set-up, as a user would: every run done, the report's path printed,
    the output ending with the summary table (policy x key metrics), and the tiers that are not real named as such
    in the report."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tieremu", "run", str(DEFAULT), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    tally = next(i for i, line in enumerate(lines) if line.startswith("runs: "))
    planned = len(expand(load_experiment(DEFAULT)))
    assert lines[tally] == f"runs: {planned} done (0 from before), 0 failed, {planned} planned"
    report = Path(lines[tally + 1].removeprefix("report: "))
    folder = Path(lines[tally + 2].removeprefix("results: "))
    table = "\n".join(lines[tally + 3:])  # the output ends with the summary table, one row per job/point/policy
    assert "summary: median over repetitions" in table and lines[-1].startswith("└")
    for job, policy in (("decode", "lru-epoch"), ("decode", "all-slowest"), ("replay", "belady"), ("replay", "lru")):
        assert any(job in line and f" {policy} " in line for line in lines[tally + 3:]), (job, policy, table)
    assert "TPOT p50 ms" in table and "STAR" in table
    assert report == folder / "report.html" and report.is_file() and folder.parent == tmp_path / "default"
    html = report.read_text()
    for tier, node in (("cxl", 1), ("far", 2)):
        if node not in memory_nodes:
            assert f"{tier} (cxl-expander): emulated" in html
    summary = (folder / "summary.csv").read_text()
    for job in ("probe", "roundtrip", "decode", "replay"):
        assert job in summary
