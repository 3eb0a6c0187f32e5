"""What `tieremu run` shows: a run named by its job, policy and sweep point (not its id), the planned runs of
`--dry-run`, and the closing summary table (policy x key metrics) that stays on screen."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from tieremu.record.summary import SummaryRow
from tieremu.runner.sweep import PlannedRun

# The figures the closing table shows, in this order, where a job has them: (metric, tier, heading). Tier None is the
# run's overall figure. The report (tieremu report, report.html) has every metric; this is the glance.
KEY_METRICS = (
    ("ttft_ms", None, "TTFT p50 ms"),
    ("tpot_ms", None, "TPOT p50 ms"),
    ("tokens_per_s", None, "tokens/s"),
    ("hit_ratio", None, "hit ratio"),
    ("star", None, "STAR"),
    ("strr", None, "STRR"),
    ("migration_gbps", None, "migration GB/s"),
    ("latency_ns", None, "latency ns"),
)


def point_text(run: PlannedRun) -> str:
    """The sweep point of a run as `key=value` pairs; an axis a bound does not depend on shows as `key=*`."""
    shared = set(run.shared_axes)
    return " ".join(f"{k}={'*' if k in shared else v}" for k, v in run.axes.items())


def run_name(run: PlannedRun) -> str:
    """`replay lru fast_capacity_blocks=50 rep 0`: what a run is, as a person reads it."""
    parts = [f"{run.kind}#{run.job_index}" if run.job_index is not None else run.kind]
    if run.policy is not None:
        parts.append(run.policy)
    if point := point_text(run):
        parts.append(point)
    parts.append(f"rep {run.repetition}")
    return " ".join(parts)


def plan_table(runs: Sequence[PlannedRun], title: str) -> Table:
    """`--dry-run`: every planned run in the order it would run."""
    table = Table(title=Text(title))
    for col in ("#", "job", "policy", "sweep point", "rep", "worker", "run id"):
        table.add_column(col, overflow="fold", no_wrap=col in ("#", "rep", "worker", "run id", "sweep point"))
    if any(r.shared_axes for r in runs):
        table.caption = ("key=*: a bound whose result does not depend on that axis runs once, for every value of it; "
                         "worker: warm = the warm worker (accounting-only runs), fresh = a new process")
    for i, run in enumerate(runs, 1):
        job = run.kind if run.job_index is None else f"{run.kind} (jobs[{run.job_index}])"
        policy = run.policy or "-"
        if run.baseline or run.policy in run.job.bounds:
            policy += " (bound)"
        point = point_text(run) or "-"
        table.add_row(str(i), Text(job), Text(policy), Text(point), str(run.repetition), run.worker, Text(run.run_id))
    return table


def summary_table(summary: Sequence[SummaryRow], runs: Sequence[PlannedRun] = (),
                  fast_tier: str | None = None) -> Table | None:
    """Per job, sweep point and policy, the key metrics' medians over repetitions (with their 95% CI when there are
    several), and the fastest tier's hit ratio; None when no run produced any of them. `runs` (the plan) marks the
    axes a bound ran once for as `*`."""
    shared = {(r.kind, r.policy): set(r.shared_axes) for r in runs if r.shared_axes}
    metrics = (*KEY_METRICS[:4], ("hit_ratio", fast_tier, f"hit ratio {fast_tier}"), *KEY_METRICS[4:]) \
        if fast_tier else KEY_METRICS
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    present: list[str] = []
    for row in summary:
        k = row.key
        wanted = next((h for m, t, h in metrics if m == k.metric and t == k.tier), None)
        if wanted is None or k.phase is not None or k.point is not None:
            continue
        labels = dict(k.labels)
        once = shared.get((k.job, k.policy), set())
        point = " ".join(f"{n}={'*' if n in once else v}" for n, v in labels.items() if n not in ("policy", "rep"))
        cells.setdefault((k.job, point, k.policy or "-"), {})[wanted] = _figure(row)
        if wanted not in present:
            present.append(wanted)
    if not cells:
        return None
    headings = [h for _, _, h in metrics if h in present]
    table = Table(title="summary: median over repetitions [95% CI]")
    for col in ("job", "sweep point", "policy", *headings):
        table.add_column(col, justify="left" if col in ("job", "sweep point", "policy") else "right")
    for (job, point, policy), figures in cells.items():
        table.add_row(Text(job), Text(point or "-"), Text(policy), *(figures.get(h, "") for h in headings))
    return table


def summary_json(summary: Sequence[SummaryRow]) -> list[dict[str, Any]]:
    return [{"job": r.key.job, "labels": dict(r.key.labels), "metric": r.key.metric, "unit": r.unit,
             "median": _finite(r.stats.median), "ci_low": _finite(r.stats.ci_low), "ci_high": _finite(r.stats.ci_high),
             "n": r.stats.n}
            for r in summary
            if any(m == r.key.metric and t == r.key.tier for m, t, _ in KEY_METRICS)
            and r.key.phase is None and r.key.point is None]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _figure(row: SummaryRow) -> str:
    s = row.stats
    if s.median is None or not math.isfinite(s.median):
        return "-"
    text = _num(s.median)
    if s.n > 1 and s.ci_low is not None and s.ci_high is not None and math.isfinite(s.ci_low):
        sep = " to " if s.ci_low < 0 else "-"  # "-809-7,654" would read as a range of negatives
        text += f" [{_num(s.ci_low)}{sep}{_num(s.ci_high)}]"
    return text


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
