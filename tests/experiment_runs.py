"""Running a small experiment spec from a test: write it, run every job in its worker, return its metric rows.

Tests import it as `from experiment_runs import run_jobs` (tests/ is on sys.path, as for fixture_paths).
"""

from __future__ import annotations

import json
from pathlib import Path

from tieremu.runner.experiment import run_experiment
from tieremu.runner.spec import load_experiment


def run_jobs(tmp_path: Path, tiers: Path, jobs: str, name: str = "t") -> list[dict]:
    """Run the spec `name` on tier map `tiers` with the YAML list `jobs` (lines starting "  - "), once per arm and
    without the report; every run must succeed. Its metrics.jsonl rows."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\ntiers: {tiers}\nrepetitions: 1\njobs:\n{jobs}")  # one run per arm: tests of what
    # a job emits, not of its spread
    result = run_experiment(load_experiment(spec), tmp_path / "out", report=False)
    assert not result.failed, result.failed
    return [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
