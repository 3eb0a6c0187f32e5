"""Reading a finished result folder back: manifest, metric rows and run statuses, refusing anything incomplete."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieremu.errors import ReportError
from tieremu.runner.metrics import MetricRow, MetricRowError


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    job: str
    status: str  # done | failed | missing (planned, never run: only in a folder still being written)
    seconds: float | None
    error: str | None
    labels: dict[str, Any]  # what tells the run apart: policy, swept values, rep


@dataclass(frozen=True)
class ResultSet:
    path: Path
    manifest: dict[str, Any]
    rows: list[MetricRow]
    runs: list[RunStatus]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})

    @property
    def experiment(self) -> str:
        return str(self.extra.get("experiment", self.path.parent.name))

    @property
    def final_path(self) -> Path:
        """Where the folder is once finished (the runner draws its report while the folder is still partial)."""
        return self.path.with_name(self.path.name.removesuffix(".partial"))

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.final_path.name}"

    @property
    def tier_maps(self) -> dict[str, dict[str, Any]]:
        return self.extra.get("tier_maps") or {"": {"name": "", "tiers": self.extra.get("tiers", [])}}

    @property
    def emulated_tiers(self) -> list[str]:
        """`tier (map): backing, reason` for every tier not backed by a real node of this machine."""
        return [f"{t['tier']} ({m['name']}): {t['backing']} — {t['reason']}"
                for m in self.tier_maps.values() for t in m["tiers"] if t["backing"] != "real"]

    @property
    def origins(self) -> Counter[str]:
        return Counter(r.origin for r in self.rows)

    @property
    def warnings(self) -> list[str]:
        return list(self.extra.get("warnings", []))

    def labels_of(self, run_id: str) -> dict[str, Any]:
        return next((r.labels for r in self.runs if r.run_id == run_id), {})


def load_result(path: str | Path, *, allow_partial: bool = False) -> ResultSet:
    """A result folder; `allow_partial` is for the runner drawing its own report just before it finishes."""
    folder = Path(path)
    if folder.name.endswith(".partial") and not allow_partial:
        raise ReportError(f"{folder}: the run is still going or was interrupted (.partial); finish it first: "
                          f"tieremu run SPEC --resume {folder}")
    if folder.name.endswith(".failed"):
        raise ReportError(f"{folder}: the experiment failed (.failed): see {folder / 'error.txt'}; "
                          f"or run again with: tieremu run SPEC --resume {folder}")
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such result folder (expected results/<experiment>/<timestamp>/)")
    manifest = _json(folder / "manifest.json")
    if "runs" not in manifest.get("extra", {}):
        raise ReportError(f"{folder / 'manifest.json'}: no run list: not a sweep result folder (a probe folder, "
                          "or one written by an older tieremu)")
    rows = _rows(folder / "metrics.jsonl")
    return ResultSet(folder, manifest, rows, _runs(folder, manifest["extra"]["runs"]))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing; a result folder has manifest.json, metrics.jsonl and summary.csv") \
            from None
    except ValueError as exc:
        raise ReportError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _rows(path: Path) -> list[MetricRow]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: missing; a result folder has manifest.json, metrics.jsonl and summary.csv") \
            from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(MetricRow.from_dict(json.loads(line)))
        except (ValueError, MetricRowError) as exc:
            raise ReportError(f"{path}:{number}: {exc}") from None
    return rows


def _runs(folder: Path, planned: list[dict[str, Any]]) -> list[RunStatus]:
    out = []
    for run in planned:
        status_file = folder / "runs" / run["run_id"] / "status.json"
        status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "missing"}
        out.append(RunStatus(run["run_id"], run["job"], status["status"], status.get("seconds"), status.get("error"),
                             dict(run.get("labels", {}))))
    return out
