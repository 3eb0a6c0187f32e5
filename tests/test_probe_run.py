"""`tieremu probe all` end to end at a tiny scale: every file a user expects lands, labelled, complete.

The storage probe has its own tests (test_probe_storage.py); here it is skipped to keep this fast.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

from tieremu.numa.topology import discover
from tieremu.runner.probe_run import ProbePlan, run_all

MIB = 1 << 20


def test_probe_all_writes_json_csv_plots_and_manifest(tmp_path: Path) -> None:
    plan = replace(ProbePlan.quick_plan(storage_dir=None), latency_sizes=(32 << 10, 4 * MIB),
                   matrix_bytes=16 * MIB, bandwidth_bytes=64 * MIB, loaded_chase_bytes=16 * MIB,
                   migrate_bytes=4 * MIB, repeats=2, seconds=0.01)
    folder = run_all(discover("/"), plan, tmp_path / "results")
    assert folder.parent == tmp_path / "results" / "probe" and not folder.name.endswith(".partial")
    names = {p.name for p in folder.iterdir()}
    assert {"probe.json", "manifest.json", "latency_sweep.csv", "latency_matrix.csv", "bandwidth.csv",
            "latency_vs_size.png", "bandwidth_matrix.png"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary files left behind

    data = json.loads((folder / "probe.json").read_text())
    assert [p["size_bytes"] for p in data["latency"]["sweep"]] == [32 << 10, 4 * MIB] * 2
    assert data["latency"]["matrix"]["0"]["0"]["median"] > 0
    assert set(data["bandwidth"]["matrix"]) == {"read", "write", "copy", "triad"}
    assert data["gpu"]["skipped"] or data["gpu"]["points"]
    assert data["storage"] == {"skipped": "no storage directory given (--storage-dir DIR: the NVMe tier's path)"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extra"]["probe"] == "all" and "steal_fraction" in manifest["extra"]["load"]
    assert manifest["cpu_model"] and manifest["knobs"]["thp_enabled"]

    with (folder / "bandwidth.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == {"read", "write", "copy", "triad"}
    assert all(r["origin"] in ("measured", "vm") and float(r["gb_per_s_median"]) > 0 for r in rows)
    assert (folder / "latency_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "latency_vs_size.svg").read_text().lstrip().startswith("<?xml")  # SVG beside every PNG
