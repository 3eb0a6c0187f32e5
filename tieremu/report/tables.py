"""The report's tables as data (title, columns, rows of text), grouped per job and policy; rendered by the
terminal (rich) and the HTML page alike.

A group is every run of one job with the same labels except the repetition. Each run's samples become one figure
per run (TPOT p50 of that run, its hit ratio, its counters' total); the group's figure is the median of its runs'
figures, with the 95% confidence interval across runs (tieremu.record.stats.describe) beside it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tieremu.record.row import MetricRow
from tieremu.record.stats import Stats, describe, percentile
from tieremu.report.load import ResultSet
from tieremu.report.units import Scale, scale_for
from tieremu.runner.worker import headline

COUNTERS = ("promotions", "demotions", "ping_pongs", "evictions")
# Metrics the summary table shows; the rest of a job's metrics go to its "other figures" table.
SUMMARISED = ("tpot_ms", "ttft_ms", "tokens_per_s", "hit_ratio", "strr", "star", "migration_gbps", *COUNTERS)
PROBE = ("latency_ns", "read_gb_per_s", "write_gb_per_s", "copy_gb_per_s", "loaded_latency_ns")
POLICY_RANK = {"all-fastest": 0, "all-slowest": 2}
# The unit each summary figure is recorded in; the table shows it in the unit that suits the column's figures.
COLUMN_UNITS = {"tpot_p50": "ms", "tpot_p99": "ms", "ttft_p50": "ms", "ttft_p99": "ms", "migration_gbps": "GB/s"}


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass(frozen=True)
class Group:
    job: str
    labels: tuple[tuple[str, Any], ...]  # the runs' labels without the repetition
    runs: tuple[str, ...]
    done: int  # runs that finished (the others failed or never ran)
    rows: tuple[MetricRow, ...] = field(repr=False)

    @property
    def policy(self) -> str | None:
        return dict(self.labels).get("policy")

    @property
    def label(self) -> str:
        parts = [str(v) if k == "policy" else f"{k}={v}" for k, v in self.labels]
        return ", ".join(parts) or self.job

    def without_policy(self) -> tuple[tuple[str, Any], ...]:
        return tuple((k, v) for k, v in self.labels if k != "policy")

    def values(self, metric: str, tier: str | None = None) -> list[float]:
        return [r.value for r in self.rows if r.metric == metric and r.tier == tier and math.isfinite(r.value)]

    def tiers_of(self, metric: str) -> list[str]:
        return list(dict.fromkeys(r.tier for r in self.rows if r.metric == metric and r.tier is not None))

    def mean(self, metric: str, tier: str | None = None) -> float:
        values = self.values(metric, tier)
        return sum(values) / len(values) if values else math.nan

    def per_run_total(self, metric: str) -> float:
        return describe(self.per_run(metric, None, math.fsum)).median

    def per_run(self, metric: str, tier: str | None, reduce: Any) -> list[float]:
        """One figure per run that has the metric: `reduce` of that run's finite values."""
        by_run: dict[str, list[float]] = {}
        for r in self.rows:
            if r.metric == metric and r.tier == tier and math.isfinite(r.value):
                by_run.setdefault(r.run, []).append(r.value)
        return [reduce(values) for values in by_run.values()]


def groups(result: ResultSet) -> list[Group]:
    """Groups in plan order, the all-fastest bound first and all-slowest last within each sweep point."""
    by_key: dict[tuple[str, tuple[tuple[str, Any], ...]], list[str]] = {}
    for run in result.runs:
        labels = tuple((k, v) for k, v in run.labels.items() if k != "rep")
        by_key.setdefault((run.job, labels), []).append(run.run_id)
    rows_by_run: dict[str, list[MetricRow]] = {}
    for row in result.rows:
        rows_by_run.setdefault(row.run, []).append(row)
    done = {r.run_id for r in result.runs if r.status == "done"}
    out = [Group(job, labels, tuple(ids), sum(i in done for i in ids),
                 tuple(r for i in ids for r in rows_by_run.get(i, []))) for (job, labels), ids in by_key.items()]
    point_order = {g.job + repr(g.without_policy()): i for i, g in reversed(list(enumerate(out)))}
    return sorted(out, key=lambda g: (point_order[g.job + repr(g.without_policy())],
                                      POLICY_RANK.get(g.policy or "", 1)))


def _p(q: float) -> Any:
    return lambda values: percentile(values, q)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def figure_stats(group: Group) -> dict[str, Stats]:
    """The standard figures of one group, by column key: each described across the group's runs."""
    per_run = {"tpot_p50": group.per_run("tpot_ms", None, _p(50)), "tpot_p99": group.per_run("tpot_ms", None, _p(99)),
               "tpot_max": group.per_run("tpot_ms", None, max), "ttft_p50": group.per_run("ttft_ms", None, _p(50)),
               "ttft_p99": group.per_run("ttft_ms", None, _p(99)), "ttft_max": group.per_run("ttft_ms", None, max),
               "tokens_per_s": group.per_run("tokens_per_s", None, _mean),
               "hit": group.per_run("hit_ratio", None, _mean), "strr": group.per_run("strr", None, _mean),
               "star": group.per_run("star", None, _mean),
               "migration_gbps": group.per_run("migration_gbps", None, _mean)}
    if not per_run["migration_gbps"]:  # per-tier figures only (a round trip's hops): their mean per run
        hops: dict[str, list[float]] = {}
        for r in group.rows:
            if r.metric == "migration_gbps" and math.isfinite(r.value):
                hops.setdefault(r.run, []).append(r.value)
        per_run["migration_gbps"] = [_mean(v) for v in hops.values()]
    for tier in group.tiers_of("hit_ratio"):
        per_run[f"hit[{tier}]"] = group.per_run("hit_ratio", tier, _mean)
    for counter in COUNTERS:
        per_run[counter] = group.per_run(counter, None, math.fsum)
    return {key: describe(values) for key, values in per_run.items()}


def figures(group: Group) -> dict[str, float]:
    """The standard figures of one group, by column key: the median of its runs' figures."""
    return {key: stats.median for key, stats in figure_stats(group).items()}


def bounds_check(group: Group, all_groups: list[Group]) -> str:
    """"outside bounds" when the group's CI of its headline (TPOT p50, else TTFT p50) lies wholly beyond the CI of
    all-fastest (better than the best placement can be) or of all-slowest (worse than the worst): the figures of
    this comparison cannot both be right. "" when within, "-" when it cannot be told (no bounds, or n < 2)."""
    if group.policy is None or group.policy in ("all-fastest", "all-slowest"):
        return ""
    bounds = {g.policy: g for g in all_groups if g.job == group.job and g.without_policy() == group.without_policy()
              and g.policy in ("all-fastest", "all-slowest")}
    if len(bounds) < 2:
        return "-"
    mine = figure_stats(group)
    key = "tpot_p50" if mine["tpot_p50"].n else "ttft_p50"
    fast, slow, own = figure_stats(bounds["all-fastest"])[key], figure_stats(bounds["all-slowest"])[key], mine[key]
    if not (own.has_ci and fast.has_ci and slow.has_ci):
        return "-"
    if own.ci_high < fast.ci_low:
        return "outside bounds (faster than all-fastest)"
    if own.ci_low > slow.ci_high:
        return "outside bounds (slower than all-slowest)"
    return "within"


def scaled(stats: Stats, scale: Scale | None) -> Stats:
    """The figures in the unit the column shows."""
    if scale is None:
        return stats
    return Stats(stats.n, scale(stats.median), scale(stats.mean), scale(stats.ci_low), scale(stats.ci_high),
                 scale(stats.min), scale(stats.max))


def fmt_ci(stats: Stats) -> str:
    """The median, and the 95% CI of the runs' mean when there are two runs or more: `4.81 [4.62-5.03]`."""
    if not stats.n:
        return "-"
    return fmt(stats.median) + (f" [{fmt(stats.ci_low)}-{fmt(stats.ci_high)}]" if stats.has_ci else "")


def slowdown(group: Group, all_groups: list[Group]) -> tuple[float, str]:
    """TPOT p50 over the all-fastest bound's at the same sweep point (TTFT p50 where a job has no TPOT, as a
    simulated replay's estimate); (nan, "") when there is no bound to compare with."""
    if group.policy is None:
        return math.nan, ""
    base = next((g for g in all_groups if g.job == group.job and g.policy == "all-fastest"
                 and g.without_policy() == group.without_policy()), None)
    if base is None:
        return math.nan, ""
    mine, theirs = figures(group), figures(base)
    for key, basis in (("tpot_p50", "TPOT p50"), ("ttft_p50", "TTFT p50")):
        if math.isfinite(mine[key]) and math.isfinite(theirs[key]) and theirs[key] > 0:
            return mine[key] / theirs[key], basis
    return math.nan, ""


def fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def provenance(result: ResultSet) -> list[str]:
    """What the figures are: their origins and which tiers were not real nodes; stated above every table."""
    counts = result.origins
    lines = ["origin of the figures: " + (", ".join(f"{o} ({n} rows)" for o, n in counts.most_common()) or "none")]
    emulated = result.emulated_tiers
    lines.append("tiers not backed by a real node here: " + ("; ".join(emulated) if emulated else
                                                                 "none (every tier is a real NUMA node)"))
    done = sum(r.status == "done" for r in result.runs)
    failed = [r for r in result.runs if r.status == "failed"]
    lines.append(f"runs: {done} done, {len(failed)} failed, {len(result.runs)} planned")
    noisy = result.noisy
    if noisy:
        lines.append(f"NOISY: {len(noisy)} of {len(result.runs)} runs ran on a busy machine (figures kept, flagged): "
                     + noise_reasons([r.noisy_why for r in noisy]) + "; runs: " + ", ".join(r.run_id for r in noisy))
    elif result.schema_version >= 2:
        lines.append("noise: no run was flagged (steal, other processes' load and load average within limits)")
    else:
        lines.append("noise: not recorded (a schema 1 folder)")
    lines += [f"warning: {w}" for w in result.warnings]
    return lines


def noise_reasons(whys: list[list[str]]) -> str:
    """The runs' reasons, each kind once with the range of its first figure and how many runs it flagged:
    `other processes used 75%-91% of the CPUs > 25% (30 runs)` rather than thirty sentences that differ in a number."""
    number = r"\d+(?:\.\d+)?"
    kinds: dict[str, tuple[list[str], list[float]]] = {}
    for why in whys:
        for reason in why:
            numbers = re.findall(number, reason)
            template = re.sub(number, "{}", reason.replace("{", "{{").replace("}", "}}"))
            kinds.setdefault(template, (numbers, []))[1].append(float(numbers[0]) if numbers else math.nan)
    parts = []
    for template, (numbers, values) in kinds.items():
        if numbers:
            low, high = min(values), max(values)
            percent = template.find("{}%") == template.find("{}")
            span = f"{low:g}" if low == high else f"{low:g}{'%' if percent else ''}-{high:g}"
            text = template.replace("{}", span, 1).format(*numbers[1:])
        else:
            text = template.format()
        parts.append(f"{text} ({len(values)} run{'s' if len(values) != 1 else ''})")
    return "; ".join(parts)


SUMMARY_COLUMNS = (("tpot_p50", "TPOT p50"), ("tpot_p99", "TPOT p99"), ("ttft_p50", "TTFT p50"),
                   ("ttft_p99", "TTFT p99"), ("tokens_per_s", "tokens/s"), ("hit", "hit ratio"))
TAIL_COLUMNS = (("strr", "STRR"), ("star", "STAR"), ("migration_gbps", "migration"),
                ("promotions", "promotions"), ("demotions", "demotions"), ("ping_pongs", "ping-pongs"),
                ("evictions", "evictions"))


def job_tables(result: ResultSet) -> list[Table]:
    """Per job: the summary (one row per policy and sweep point), then its other figures."""
    all_groups = groups(result)
    tables = []
    for job in dict.fromkeys(g.job for g in all_groups):
        mine = [g for g in all_groups if g.job == job]
        summary = _summary_table(job, mine, all_groups)
        if summary is not None:
            tables.append(summary)
        other = _other_table(job, mine)
        if other is not None:
            tables.append(other)
    return tables


def _summary_table(job: str, mine: list[Group], all_groups: list[Group]) -> Table | None:
    if not any(r.metric in SUMMARISED for g in mine for r in g.rows):
        return None
    stats = [figure_stats(g) for g in mine]
    figs = [{k: v.median for k, v in s.items()} for s in stats]
    tiers = list(dict.fromkeys(t for g in mine for t in g.tiers_of("hit_ratio")))
    columns = [*SUMMARY_COLUMNS, *((f"hit[{t}]", f"hit {t}") for t in tiers), *TAIL_COLUMNS]
    shown = [(k, h) for k, h in columns if any(math.isfinite(f.get(k, math.nan)) for f in figs)]
    slow = [slowdown(g, all_groups) for g in mine]
    bases = sorted({b for _, b in slow if b})
    axes = point_axes(mine)
    checks = [bounds_check(g, all_groups) for g in mine]
    scales = {k: scale_for([f.get(k, math.nan) for f in figs], COLUMN_UNITS[k]) for k, _ in shown if k in COLUMN_UNITS}
    headers = [*axes, "runs", "origin"] + [f"{h} {scales[k].unit}" if k in scales else h for k, h in shown]
    if bases:
        headers.append("slowdown vs all-fastest")
    if any(checks):
        headers.append("bounds")
    rows = []
    for g, st, (ratio, _), check in zip(mine, stats, slow, checks, strict=True):
        row = [*point_cells(g, axes), f"{g.done}/{len(g.runs)}", ", ".join(sorted({r.origin for r in g.rows})) or "-"]
        row += [fmt_ci(scaled(st[k], scales.get(k))) if k in st else "-" for k, _ in shown]
        if bases:
            row.append("-" if not math.isfinite(ratio) else f"{ratio:.2f}x")
        if any(checks):
            row.append(check)
        rows.append(row)
    notes = ["runs: finished / planned; each figure is the median of the runs' own figures, with the 95% CI of "
             "their mean in brackets (two runs or more)"]
    if bases:
        notes.append(f"slowdown: ratio of {' / '.join(bases)} to the all-fastest bound at the same sweep point")
    if any(c.startswith("outside") for c in checks):
        notes.append("outside bounds: the policy's CI lies beyond a bound's CI: noise, or a bug in the comparison")
    per = " per policy" if any(g.policy for g in mine) else ""
    return Table(f"{job}: summary{per}", headers, rows, "; ".join(notes))


def point_axes(gs: list[Group]) -> list[str]:
    """The label names that tell these groups apart (policy first), one table column each."""
    names = list(dict.fromkeys(k for g in gs for k, _ in g.labels))
    return sorted(names, key=lambda k: k != "policy") or ["run"]


def point_cells(g: Group, axes: list[str]) -> list[str]:
    labels = dict(g.labels)
    return [str(labels.get(a, g.job if a == "run" else "-")) for a in axes]


def _other_table(job: str, mine: list[Group]) -> Table | None:
    columns: dict[str, tuple[str, str | None, str]] = {}
    for g in mine:
        for r in g.rows:
            if r.metric not in SUMMARISED and r.metric not in PROBE:
                columns.setdefault(r.column, (r.metric, r.tier, r.unit))
    if not columns:
        return None
    rows = []
    axes = point_axes(mine)
    for g in mine:
        for column, (metric, tier, unit) in columns.items():
            values = g.values(metric, tier)
            if not values:
                continue
            origins = ", ".join(sorted({r.origin for r in g.rows if r.metric == metric and r.tier == tier}))
            sc = scale_for(values, unit)
            rows.append([*point_cells(g, axes), column, fmt(len(values)), fmt(sc(percentile(values, 50))),
                         fmt(sc(min(values))), fmt(sc(max(values))), sc.unit, origins])
    return Table(f"{job}: other figures", [*axes, "metric", "n", "median", "min", "max", "unit", "origin"], rows)


def probe_table(result: ResultSet) -> Table | None:
    """Per tier: idle latency and stream bandwidth through the tier's own path (emulated tiers: their model)."""
    rows_by_tier: dict[str, dict[str, MetricRow]] = {}
    ratios: dict[tuple[str, str], MetricRow] = {}  # (tier, probe metric): the emulated tier's ratio to local
    for r in result.rows:
        if r.job == "probe" and r.metric in PROBE[:4] and r.tier is not None:
            rows_by_tier.setdefault(r.tier, {})[r.metric] = r
        elif r.job == "probe" and r.metric.endswith("_ratio") and r.tier is not None and "of" in r.params:
            ratios[(r.tier, str(r.params["of"]))] = r
    if not rows_by_tier:
        return None
    metrics = [m for m in PROBE[:4] if any(m in v for v in rows_by_tier.values())]
    rows = []
    for tier, by_metric in rows_by_tier.items():
        first = next(iter(by_metric.values()))
        cells = []
        for m in metrics:
            r = by_metric.get(m)
            target = r.params.get("requested") if r else None
            cell = "-" if r is None else fmt(r.value) + ("" if target is None else f" (target {fmt(target)})")
            ratio = ratios.get((tier, m))
            if ratio is not None:
                cell += f"; {ratio.value:.2f}x local (target {float(ratio.params['target_ratio']):.2f}x)"
            cells.append(cell)
        rows.append([tier, str(first.params.get("backing", "-")), *cells, first.origin])
    headers = {"latency_ns": "idle latency ns", "read_gb_per_s": "read GB/s", "write_gb_per_s": "write GB/s",
               "copy_gb_per_s": "copy GB/s"}
    return Table("probe: every tier through its own path", ["tier", "backing", *(headers[m] for m in metrics),
                                                            "origin"], rows,
                 "one thread; emulated tiers run through their timing model, with the target beside what was achieved "
                 "and the ratio to the local tier's figure of the same probe")


def failed_table(result: ResultSet) -> Table | None:
    failed = [r for r in result.runs if r.status != "done"]
    if not failed:
        return None
    return Table("runs that did not finish", ["run", "job", "labels", "status", "error"],
                 [[r.run_id, r.job, ", ".join(f"{k}={v}" for k, v in r.labels.items()), r.status,
                   headline(r.error)] for r in failed],
                 "full errors in runs/<run>/status.json and runs/<run>/worker.log")


def comparison_table(results: list[ResultSet]) -> Table:
    """Side by side: one row per job and sweep point, for each folder its headline figures."""
    keys: dict[tuple[str, str], None] = {}
    per_folder: list[dict[tuple[str, str], tuple[dict[str, float], float]]] = []
    for result in results:
        all_groups = groups(result)
        found = {}
        for g in all_groups:
            if not any(r.metric in SUMMARISED for r in g.rows):
                continue
            found[(g.job, g.label)] = (figures(g), slowdown(g, all_groups)[0])
            keys.setdefault((g.job, g.label))
        per_folder.append(found)
    letters = [chr(ord("A") + i) for i in range(len(results))]
    heads = (("tpot_p50", "TPOT p50"), ("ttft_p50", "TTFT p50"), ("hit", "hit ratio"))
    shown = [(k, h) for k, h in heads
             if any(math.isfinite(f[k]) for found in per_folder for f, _ in found.values())]
    columns = ["job", "policy / sweep point"]
    for letter in letters:
        columns += [f"{h} {letter}" for _, h in shown] + [f"slowdown {letter}"]
    rows = []
    for key in keys:
        row = list(key)
        for found in per_folder:
            f, ratio = found.get(key, ({}, math.nan))
            row += [fmt(f.get(k, math.nan)) for k, _ in shown]
            row.append("-" if not math.isfinite(ratio) else f"{ratio:.2f}x")
        rows.append(row)
    legend = "; ".join(f"{letter} = {r.name}" for letter, r in zip(letters, results, strict=True))
    return Table("comparison of result folders", columns, rows, legend)


def all_tables(results: list[ResultSet]) -> list[Table]:
    tables: list[Table] = []
    if len(results) > 1:
        tables.append(comparison_table(results))
    for result in results:
        prefix = f"{result.name} — " if len(results) > 1 else ""
        for table in _tables_of(result):
            tables.append(Table(prefix + table.title, table.columns, table.rows, table.note))
    return tables


def _tables_of(result: ResultSet) -> Iterable[Table]:
    probe = probe_table(result)
    if probe is not None:
        yield probe
    yield from job_tables(result)
    failed = failed_table(result)
    if failed is not None:
        yield failed

