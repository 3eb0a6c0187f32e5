"""`tieremu cluster validate SPEC`: the executed cluster and the simulator on the same short prefix, errors reported
as finite numbers (the <10% / <20% targets are the CLI's and the benchmark's output, not asserted here: they depend
on this machine's speed); a bad SPEC refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli.root import main as cli_main
from tieremu.cluster import replay
from tieremu.cluster.validate import load_validate_spec
from tieremu.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIERS = ROOT / "configs" / "tiers" / "cluster-peer.yaml"
GOOD = {"name": "t", "tiers": str(TIERS), "trace": str(MOONCAKE_TRACE), "max_requests": 12, "instances": 3,
        "sharing": "p2p", "pull": "estimate", "link": "10,10", "block_kib": 16, "time_scale": 0.5,
        "namespaces": False}


def _spec(tmp_path: Path, **change: object) -> Path:
    doc = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "validate.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_validate_runs_both_modes_and_reports_finite_errors(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli_main, ["cluster", "validate", str(_spec(tmp_path)), "--json"])
    assert out.exit_code in (0, 1), out.output  # 1: the check failed (speed-dependent), still a full report
    report = json.loads(out.output[out.output.index("{"):])
    v = report["validation"]
    for key in ("ttft_p50_error", "ttft_p99_error", "throughput_error"):
        assert math.isfinite(v[key]), key
    for side in ("executed", "simulated"):
        assert set(v[side]) == {"ttft_p50_ms", "ttft_p99_ms", "throughput_tokens_per_s"}
        assert all(x > 0 and math.isfinite(x) for x in v[side].values())
    assert v["passed"] == (abs(v["ttft_p50_error"]) < 0.10 and abs(v["ttft_p99_error"]) < 0.20)
    assert report["completed_executed"] == report["completed_simulated"] == report["requests"] == 12
    assert len(report["per_request"]) == 12
    assert report["executed_origin"] in ("emulated", "measured") and report["simulated_origin"] == "simulated"
    assert report["model"]["origin"] == "measured" and report["model"]["fit"]["samples"] == 12
    # Both sides saw the same blocks: the same share computed or pulled, up to pull-or-recompute decisions.
    exe, sim = report["executed_hits"], report["simulated_hits"]
    assert exe["local"] == pytest.approx(sim["local"])
    assert exe["peer"] + exe["miss"] == pytest.approx(sim["peer"] + sim["miss"])
    # The report is a serving-time model for simulate mode, whose results then show the validation's errors.
    saved = tmp_path / "validated.json"
    saved.write_text(json.dumps(report))
    args = ["cluster", "replay", str(MOONCAKE_TRACE), "--mode", "simulate", "--servtime", str(saved),
            "--max-requests", "40", "--instances", "4"]
    table = CliRunner().invoke(cli_main, args)
    assert table.exit_code == 0, table.output
    assert f"validated: {v['ttft_p50_error']:+.1%} / {v['ttft_p99_error']:+.1%}" in table.output
    simulated = json.loads(CliRunner().invoke(cli_main, [*args, "--json"]).output)
    assert simulated["validation"]["ttft_p99_error"] == v["ttft_p99_error"]
    assert simulated["servtime"]["name"] == "executed-instances"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model": report["model"], "validation": {}}))
    out = CliRunner().invoke(cli_main, [*args[:-4], "--servtime", str(broken)])
    assert out.exit_code != 0 and "without TTFT errors" in out.output


@pytest.mark.parametrize(("change", "match"), [
    ({"rounds": 3}, "rounds: unknown key"),
    ({"faults": ["kill-peer@3"]}, "faults"),
    ({"max_requests": None}, "max_requests"),
    ({"sharing": "all"}, "sharing"),
    ({"tiers": "nowhere.yaml"}, "tiers"),
    ({"time_scale": -1}, "time_scale"),
])
def test_bad_spec_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict,
                                          match: str) -> None:
    def no_work(*_args: object) -> None:
        raise AssertionError("an instance was started for a bad spec")

    monkeypatch.setattr(replay.Cluster, "start", no_work)
    with pytest.raises(ConfigError, match=match):
        load_validate_spec(_spec(tmp_path, **change))
    out = CliRunner().invoke(cli_main, ["cluster", "validate", str(_spec(tmp_path, **change))])
    assert out.exit_code != 0 and match.split(":")[0] in out.output
