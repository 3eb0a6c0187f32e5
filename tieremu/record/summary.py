"""The long-format summary (summary.csv): one row per run group x metric x tier x phase.

A run group is every run of one job with the same labels but the repetition. Each run first reduces its samples of
a metric to one figure (the catalogue says how: median of tokens, total of a counter); the group is then described
across its runs by `describe` (n, median, mean, 95% CI, min, max), so the interval says how much the figure moves
from one repetition to the next, on this machine, at that time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tieremu.record.catalogue import EACH, MEAN, TOTAL, describe_metric
from tieremu.record.row import MetricRow
from tieremu.record.runs import DONE, RunRecord
from tieremu.record.stats import Stats, describe, percentile

COLUMNS = ("metric", "unit", "origin", "job", "tier", "policy", "phase", "point", "n", "median", "mean", "ci_low",
           "ci_high", "min", "max", "noisy_runs")
NOT_LABELS = ("policy", "rep")  # policy has its own column; rep is what a group pools over


@dataclass(frozen=True)
class GroupKey:
    job: str
    labels: tuple[tuple[str, Any], ...]  # the runs' labels without the repetition, policy included
    metric: str
    tier: str | None
    phase: str | None
    point: int | None  # the sample index, for metrics whose samples are points of a curve

    @property
    def policy(self) -> str | None:
        policy = dict(self.labels).get("policy")
        return None if policy is None else str(policy)


@dataclass(frozen=True)
class SummaryRow:
    key: GroupKey
    unit: str
    origin: str
    stats: Stats
    runs: tuple[str, ...]
    noisy_runs: int
    per_run: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        k = self.key
        out: dict[str, Any] = {"metric": k.metric, "unit": self.unit, "origin": self.origin, "job": k.job,
                               "tier": k.tier, "policy": k.policy, "phase": k.phase, "point": k.point}
        out |= self.stats.to_dict() | {"noisy_runs": self.noisy_runs}
        out |= {name: value for name, value in k.labels if name not in NOT_LABELS}
        return out


def run_figure(metric: str, rows: list[MetricRow]) -> float:
    """One run's figure of a metric from its rows (all of one tier and phase), as the catalogue says."""
    values = [r.value for r in rows if math.isfinite(r.value)]
    if not values:
        return math.nan
    how = describe_metric(metric).reduce
    if how == TOTAL:
        return math.fsum(values)
    if how == MEAN:
        return math.fsum(values) / len(values)
    return percentile(values, 50)


def summarise(rows: Iterable[MetricRow], runs: Iterable[RunRecord]) -> list[SummaryRow]:
    """Summary rows in the order their groups first appear among the runs (plan order); failed runs left out."""
    records = {r.run_id: r for r in runs if r.status == DONE}
    by_group: dict[GroupKey, dict[str, list[MetricRow]]] = {}
    for row in rows:
        record = records.get(row.run)
        if record is None:
            continue
        labels = tuple((k, v) for k, v in record.labels.items() if k != "rep")
        point = row.seq if describe_metric(row.metric).reduce == EACH else None
        key = GroupKey(record.job, labels, row.metric, row.tier, row.phase, point)
        by_group.setdefault(key, {}).setdefault(row.run, []).append(row)
    out = []
    for key, per_run in by_group.items():
        first = next(iter(per_run.values()))[0]
        origins = sorted({r.origin for rows_ in per_run.values() for r in rows_})
        figures = tuple(run_figure(key.metric, rows_) for rows_ in per_run.values())
        out.append(SummaryRow(key, first.unit, "+".join(origins), describe(figures), tuple(per_run),
                              sum(records[r].noisy for r in per_run), figures))
    return out


def to_table(summary: list[SummaryRow]) -> list[dict[str, Any]]:
    """The rows for summary.csv: the fixed columns first, then one column per sweep label (empty where absent)."""
    dicts = [s.to_dict() for s in summary]
    extra = list(dict.fromkeys(k for d in dicts for k in d if k not in COLUMNS))
    return [{c: _cell(d.get(c)) for c in (*COLUMNS, *extra)} for d in dicts]


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value
