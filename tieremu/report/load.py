"""Reading a finished result folder back: manifest, metric rows and run records, refusing anything incomplete.

Reads both layouts: schema 2 (runs.jsonl, `seq`) and schema 1 (runs/<id>/status.json, `sample`); a folder of a
newer schema, one that is not tieremu's, or one that cannot be read is refused with a message saying which.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieremu.errors import ReportError
from tieremu.record import SCHEMA_VERSION
from tieremu.record.row import MetricRow, MetricRowError
from tieremu.record.runs import MISSING, RunRecord


@dataclass(frozen=True)
class ResultSet:
    path: Path
    manifest: dict[str, Any]
    rows: list[MetricRow]
    runs: list[RunRecord]

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

    @property
    def schema_version(self) -> int:
        return int(self.extra.get("schema_version", 1))

    @property
    def noisy(self) -> list[RunRecord]:
        return [r for r in self.runs if r.noisy]

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
    if not (folder / "manifest.json").exists():
        raise ReportError(f"{folder}: not a tieremu result folder (no manifest.json); give a folder that "
                          "`tieremu run` wrote: results/<experiment>/<timestamp>/")
    manifest = _json(folder / "manifest.json")
    extra = manifest.get("extra")
    if not isinstance(extra, dict) or "runs" not in extra:
        raise ReportError(f"{folder / 'manifest.json'}: no run list: not a sweep result folder (a probe folder, "
                          "or one written by an older tieremu)")
    version = extra.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise ReportError(f"{folder / 'manifest.json'}: schema_version {version!r} is not one this tieremu reads "
                          f"(1 to {SCHEMA_VERSION}); report it with the tieremu that wrote it "
                          f"(version {manifest.get('tieremu_version', '?')})")
    rows = _rows(folder / "metrics.jsonl")
    runs = _records(folder / "runs.jsonl", extra["runs"]) if version >= 2 else _runs(folder, extra["runs"])
    return ResultSet(folder, manifest, rows, runs)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing; a result folder has manifest.json, metrics.jsonl and summary.csv") \
            from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read: {exc.strerror or exc}") from None
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
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(MetricRow.from_dict(json.loads(line)))
        except (ValueError, MetricRowError) as exc:
            raise ReportError(f"{path}:{number}: {exc}") from None
    return rows


def _records(path: Path, planned: list[dict[str, Any]]) -> list[RunRecord]:
    """Schema 2: runs.jsonl, in plan order; a planned run without a line (a folder still being written) is missing.
    While the runner draws its own report runs.jsonl is not written yet: the runs' status.json stand in."""
    if not path.exists():
        return _runs(path.parent, planned)
    found = {}
    for number, line in enumerate(_lines(path), 1):
        try:
            record = RunRecord.from_dict(json.loads(line))
        except (ValueError, TypeError) as exc:
            raise ReportError(f"{path}:{number}: not a run record: {exc}") from None
        found[record.run_id] = record
    return [found.get(run["run_id"]) or _missing(run) for run in planned]


def _runs(folder: Path, planned: list[dict[str, Any]]) -> list[RunRecord]:
    """Schema 1 (and a folder being written): each run's status.json."""
    out = []
    for run in planned:
        status_file = folder / "runs" / run["run_id"] / "status.json"
        if not status_file.exists():
            out.append(_missing(run))
            continue
        status = _json(status_file)
        out.append(RunRecord.from_dict({"job": run["job"], "labels": dict(run.get("labels", {})), **status,
                                        "run_id": run["run_id"]}))
    return out


def _missing(run: dict[str, Any]) -> RunRecord:
    return RunRecord(run["run_id"], run["job"], dict(run.get("labels", {})), MISSING, None, None)


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read: {exc.strerror or exc}") from None
