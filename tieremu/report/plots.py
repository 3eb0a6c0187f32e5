"""The report's plots as PNG bytes (matplotlib, headless): latency CDFs, per-tier hit bars, capacity sweeps,
migrations over time and bandwidth-latency curves. Each is drawn only when the results hold its data.

matplotlib is imported on first plot: it costs about half a second, which `tieremu report` without plots and
every worker process would otherwise pay.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from tieremu.report.load import ResultSet
from tieremu.report.tables import Group, figure_stats, figures, groups

MAX_LINES = 16  # past this a plot is unreadable: the first ones are drawn and the caption says so
MIGRATION_METRICS = ("window_migration_gbps", "migration_gbps", "promotions", "demotions", "ping_pongs")
MIGRATION_LABELS = {"window_migration_gbps": "migration GB/s", "migration_gbps": "migration GB/s"}


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: plots/<name>.png
    title: str
    png: bytes
    caption: str = ""


@cache
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def all_plots(results: list[ResultSet]) -> list[Plot]:
    labelled = _labelled_groups(results)
    plots: list[Plot | None] = []
    for metric, title in (("tpot_ms", "TPOT"), ("ttft_ms", "TTFT")):
        plots += [latency_cdf(job, gs, metric, title) for job, gs in labelled.items()]
    plots += [headline_bars(job, gs) for job, gs in labelled.items()]
    plots += [hit_bars(job, gs) for job, gs in labelled.items()]
    plots += [p for job, gs in labelled.items() for p in capacity_sweeps(job, gs)]
    plots += [migrations_over_time(job, gs) for job, gs in labelled.items()]
    plots.append(bandwidth_latency(results))
    return [p for p in plots if p is not None]


def _labelled_groups(results: list[ResultSet]) -> dict[str, list[tuple[str, Group]]]:
    """Groups per job, each with its folder's legend prefix ("A: " when comparing folders, else "")."""
    out: dict[str, list[tuple[str, Group]]] = {}
    for i, result in enumerate(results):
        prefix = f"{chr(ord('A') + i)}: " if len(results) > 1 else ""
        for g in groups(result):
            out.setdefault(g.job, []).append((prefix, g))
    return out


def latency_cdf(job: str, labelled: list[tuple[str, Group]], metric: str, title: str) -> Plot | None:
    series = [(prefix + g.label, sorted(g.values(metric))) for prefix, g in labelled if g.values(metric)]
    if not series:
        return None
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    for label, values in series[:MAX_LINES]:
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{job}: {title} CDF")
    return _plot(fig, f"{job}-{metric}-cdf", f"{job}: {title} CDF per policy", _cut(len(series)))


def headline_bars(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    """The job's headline figure per policy and sweep point: the median of the runs' figures, with the 95% CI of
    their mean as an error bar (groups of one run have none)."""
    key, ylabel = _headline([g for _, g in labelled])
    if key is None:
        return None
    shown = [(prefix + g.label, figure_stats(g)[key]) for prefix, g in labelled][:MAX_LINES]
    shown = [(label, st) for label, st in shown if st.n]
    if not shown:
        return None
    fig, ax = _plt().subplots(figsize=(max(6, 0.8 * len(shown) + 2), 4.5))
    medians = [st.median for _, st in shown]
    low = [st.median - st.ci_low if st.has_ci else 0.0 for _, st in shown]
    high = [st.ci_high - st.median if st.has_ci else 0.0 for _, st in shown]
    ax.bar(range(len(shown)), medians, yerr=[[max(0.0, v) for v in low], [max(0.0, v) for v in high]], capsize=4,
           color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{job}: {ylabel} per policy, 95% CI over runs")
    runs = sorted({st.n for _, st in shown})
    return _plot(fig, f"{job}-{key}-per-policy", f"{job}: {ylabel} per policy with 95% CI",
                 f"bars: median of the runs' figures; error bars: 95% CI of their mean; runs per bar: "
                 f"{', '.join(map(str, runs))}" + (f"; {_cut(len(labelled))}" if _cut(len(labelled)) else ""))


def hit_bars(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    tiers = list(dict.fromkeys(t for _, g in labelled for t in g.tiers_of("hit_ratio")))
    shown = [(prefix + g.label, g) for prefix, g in labelled
             if any(g.values("hit_ratio", t) for t in tiers)][:MAX_LINES]
    if not tiers or not shown:
        return None
    fig, ax = _plt().subplots(figsize=(max(6, 0.8 * len(shown) + 2), 4.5))
    width = 0.8 / len(tiers)
    for j, tier in enumerate(tiers):
        xs = [i + (j - (len(tiers) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(xs, [g.mean("hit_ratio", tier) if g.values("hit_ratio", tier) else 0 for _, g in shown], width,
               label=tier)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0, 1.05)
    ax.legend(title="tier")
    ax.set_title(f"{job}: hits served per tier")
    return _plot(fig, f"{job}-hits-per-tier", f"{job}: hit ratio per tier", _cut(len(labelled)))


def capacity_sweeps(job: str, labelled: list[tuple[str, Group]]) -> list[Plot]:
    """For each numeric sweep axis: the headline figure against it, one line per policy (and other axes)."""
    plots = []
    for axis in _numeric_axes([g for _, g in labelled]):
        key, ylabel = _headline([g for _, g in labelled])
        if key is None:
            continue
        lines: dict[str, list[tuple[float, float, float, float]]] = {}
        for prefix, g in labelled:
            labels = dict(g.labels)
            rest = ", ".join(str(v) if k == "policy" else f"{k}={v}" for k, v in g.labels if k != axis)
            st = figure_stats(g)[key]
            if math.isfinite(st.median):
                below = max(0.0, st.median - st.ci_low) if st.has_ci else 0.0
                above = max(0.0, st.ci_high - st.median) if st.has_ci else 0.0
                lines.setdefault(prefix + (rest or job), []).append((float(labels[axis]), st.median, below, above))
        if not lines:
            continue
        fig, ax = _plt().subplots(figsize=(7, 4.5))
        for name, points in list(lines.items())[:MAX_LINES]:
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[[p[2] for p in points],
                        [p[3] for p in points]], marker="o", capsize=3, label=name)
        ax.set_xlabel(axis)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{job}: {ylabel} vs {axis}")
        plots.append(_plot(fig, f"{job}-{key}-vs-{axis}", f"{job}: {ylabel} against {axis}", _cut(len(lines))))
    return plots


def migrations_over_time(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    metric = next((m for m in MIGRATION_METRICS
                   if any(r.metric == m and "time_s" in r.params for _, g in labelled for r in g.rows)), None)
    if metric is None:
        return None
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    drawn = 0
    for prefix, g in labelled:
        points: dict[float, list[float]] = {}
        for r in g.rows:
            if r.metric == metric and "time_s" in r.params and math.isfinite(r.value):
                points.setdefault(float(r.params["time_s"]), []).append(r.value)
        if not points or drawn >= MAX_LINES:
            continue
        xs = sorted(points)
        ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], label=prefix + g.label)  # mean over repetitions
        drawn += 1
    label = MIGRATION_LABELS.get(metric, metric)
    ax.set_xlabel("time since the run began (s)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{job}: {label} over time")
    return _plot(fig, f"{job}-{metric}-over-time", f"{job}: {label} over time, window by window",
                 "mean over repetitions")


def bandwidth_latency(results: list[ResultSet]) -> Plot | None:
    """Loaded-latency curves from probe rows (latency against background traffic, per read/write mix), with the
    per-tier idle latency and read bandwidth as points."""
    curves: dict[str, list[tuple[float, float]]] = {}
    idle: dict[str, dict[str, float]] = {}
    for i, result in enumerate(results):
        prefix = f"{chr(ord('A') + i)}: " if len(results) > 1 else ""
        for r in result.rows:
            if r.metric == "loaded_latency_ns" and "traffic_gb_per_s" in r.params:
                name = f"{prefix}{r.tier} {r.params.get('mix', '')} ({r.origin})"
                curves.setdefault(name, []).append((float(r.params["traffic_gb_per_s"]), r.value))
            elif r.job == "probe" and r.metric in ("latency_ns", "read_gb_per_s") and r.tier is not None:
                idle.setdefault(f"{prefix}{r.tier} ({r.origin})", {})[r.metric] = r.value
    points = {k: v for k, v in idle.items() if len(v) == 2}
    if not curves and not points:
        return None
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    for name, pts in list(curves.items())[:MAX_LINES]:
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    for name, v in points.items():
        ax.scatter([v["read_gb_per_s"]], [v["latency_ns"]], marker="s", s=60, zorder=3, label=f"{name}: idle, 1 thread")
    ax.set_xlabel("bandwidth (GB/s)")
    ax.set_ylabel("latency (ns)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Bandwidth-latency (probe)")
    return _plot(fig, "bandwidth-latency", "Bandwidth-latency curves from the probe",
                 "curves: latency under background traffic per read/write mix; squares: each tier idle, one thread")


def _numeric_axes(gs: list[Group]) -> list[str]:
    axes: dict[str, set[float]] = {}
    for g in gs:
        for k, v in g.labels:
            if k != "policy":
                axes.setdefault(k, set())
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    axes[k].add(float(v))
                else:
                    axes[k].add(math.nan)
    return [k for k, vs in axes.items() if len(vs) >= 2 and all(math.isfinite(v) for v in vs)]


def _headline(gs: list[Group]) -> tuple[str | None, str]:
    for key, ylabel in (("tpot_p50", "TPOT p50 (ms)"), ("ttft_p50", "TTFT p50 (ms)"), ("hit", "hit ratio"),
                        ("migration_gbps", "migration GB/s")):
        if any(math.isfinite(figures(g)[key]) for g in gs):
            return key, ylabel
    return None, ""


def _cut(n: int) -> str:
    return f"the first {MAX_LINES} of {n} series are drawn" if n > MAX_LINES else ""


def _plot(fig: Any, name: str, title: str, caption: str = "") -> Plot:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return Plot(safe, title, buf.getvalue(), caption)
