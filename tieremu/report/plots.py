"""The report's plots, each drawn only when the results hold its data: latency CDFs (log axis), per-policy headline
bars, per-tier hit bars, hit ratio and STAR against every capacity sweep with the bounds drawn (tieremu.report.sweeps),
migrations over time, and the bandwidth-latency plot of the probe (tieremu.report.bandwidth).

Every plot is full width, SVG and PNG (tieremu.report.figure), with units chosen per magnitude (tieremu.report.units).
"""

from __future__ import annotations

import math
from typing import Any

from tieremu.record.stats import percentile
from tieremu.report.bandwidth import bandwidth_latency
from tieremu.report.figure import HEIGHT_IN, WIDTH_IN, Plot, finish, new, plt
from tieremu.report.load import ResultSet
from tieremu.report.sweeps import BOUNDS, headline, sweep_plots
from tieremu.report.tables import Group, figure_stats, groups
from tieremu.report.units import scale_for

__all__ = ["Plot", "all_plots"]

MAX_LINES = 16  # past this a plot is unreadable: the first ones are drawn and the caption says so
MIN_CDF_SAMPLES = 20  # below this a CDF is a staircase of a few steps: each sample is drawn as a point instead
MIGRATION_METRICS = ("window_migration_gbps", "migration_gbps", "promotions", "demotions", "ping_pongs")
MIGRATION_UNITS = {"window_migration_gbps": "GB/s", "migration_gbps": "GB/s"}


def all_plots(results: list[ResultSet]) -> list[Plot]:
    labelled = _labelled_groups(results)
    plots: list[Plot | None] = []
    for metric, title in (("tpot_ms", "TPOT"), ("ttft_ms", "TTFT")):
        plots += [latency_cdf(job, gs, metric, title) for job, gs in labelled.items()]
    plots += [headline_bars(job, gs) for job, gs in labelled.items()]
    plots += [hit_bars(job, gs) for job, gs in labelled.items()]
    plots += [p for job, gs in labelled.items() for p in sweep_plots(job, gs)]
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


def merge_identical(series: list[tuple[str, list[float]]]) -> list[tuple[str, list[float]]]:
    """Series with the same samples (to 9 significant digits) drawn once, under all their names: six policies whose
    TTFTs do not differ are one curve with six names, not six curves hiding each other."""
    merged: dict[tuple[float, ...], list[str]] = {}
    values: dict[tuple[float, ...], list[float]] = {}
    for label, vs in series:
        key = tuple(float(f"{v:.9g}") for v in sorted(vs))
        merged.setdefault(key, []).append(label)
        values.setdefault(key, sorted(vs))
    return [(" = ".join(names) + (" (identical)" if len(names) > 1 else ""), values[key])
            for key, names in merged.items()]


def latency_cdf(job: str, labelled: list[tuple[str, Group]], metric: str, title: str) -> Plot | None:
    """The samples' CDF per policy on a log axis, one panel per sweep point when there are several (a bound planned
    once across the sweep is drawn in every panel); with fewer than MIN_CDF_SAMPLES samples in a series, the samples
    themselves as points (a CDF of four samples is four steps that look like a distribution and are not one)."""
    raw = [(prefix + g.label, sorted(g.values(metric))) for prefix, g in labelled if g.values(metric)]
    if not raw:
        return None
    scale = scale_for([v for _, vs in raw for v in vs], "ms")
    if min(len(vs) for _, vs in raw) < MIN_CDF_SAMPLES:
        series = [(label, [scale(v) for v in vs]) for label, vs in merge_identical(raw)]
        return _sample_points(job, metric, title, series, scale.unit, len(raw))
    panels = facets([(prefix, g) for prefix, g in labelled if g.values(metric)]) or \
        {"": [(prefix + g.label, g) for prefix, g in labelled if g.values(metric)]}
    positive = all(v > 0 for _, vs in raw for v in vs)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt().subplots(rows, cols, figsize=(WIDTH_IN, HEIGHT_IN if rows == 1 and cols == 1 else 3.3 * rows),
                               sharex=True, sharey=True, squeeze=False)
    colours = _policy_colours([g.policy or g.label for _, g in labelled])
    curves = 0
    for ax, (point, members) in zip(axes.flat, panels.items(), strict=False):
        series = merge_identical([(name, g.values(metric)) for name, g in members])
        by_name = dict(members)
        for label, values in series[:MAX_LINES]:
            n = len(values)
            first = by_name[label.removesuffix(" (identical)").split(" = ")[0]]
            ax.step([scale(v) for v in values], [(i + 1) / n for i in range(n)], where="post", label=label,
                    color=colours[first.policy or first.label], **_bound_style(first.policy))
        curves += min(len(series), MAX_LINES)
        ax.set_title(point or f"{job}: {title} CDF", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6 if len(panels) > 1 else 7)
        if positive:
            ax.set_xscale("log")  # latencies span decades (a cache hit against a cold prefill): a log axis shows both
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(f"{title} ({scale.unit}, {'log scale' if positive else 'linear: some samples are 0'})")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of samples ≤ x")
    if len(panels) > 1:
        fig.suptitle(f"{job}: {title} CDF, one panel per sweep point")
    notes = [f"one panel per sweep point ({len(panels)})" if len(panels) > 1 else "",
             f"{len(raw)} series drawn as {curves} curves: identical ones once, named together"
             if curves < len(raw) else "", "bounds drawn dashed"]
    return finish(fig, f"{job}-{metric}-cdf", f"{job}: {title} CDF per policy", "; ".join(n for n in notes if n),
                  kind="cdf", facts={"samples": [len(vs) for _, vs in raw], "merged_from": len(raw),
                                     "panels": len(panels)})


def facets(labelled: list[tuple[str, Group]]) -> dict[str, list[tuple[str, Group]]]:
    """Groups by sweep point (their labels but the policy), each named by its policy; a policy that ran at one point
    only while the others ran at several (a bound that does not depend on the sweep) joins every panel."""
    panels: dict[str, list[tuple[str, Group]]] = {}
    for prefix, g in labelled:
        point = ", ".join(f"{k}={v}" for k, v in g.labels if k != "policy")
        panels.setdefault(prefix + point, []).append((prefix, g))
    if len(panels) == 1:
        return {k: [(prefix + g.label, g) for prefix, g in members] for k, members in panels.items()}
    points_of: dict[str, int] = {}
    for members in panels.values():
        for prefix, g in members:
            points_of[prefix + (g.policy or "")] = points_of.get(prefix + (g.policy or ""), 0) + 1
    once = [(prefix, g) for members in panels.values() for prefix, g in members
            if g.policy is not None and points_of[prefix + g.policy] == 1]
    out = {}
    for point, members in panels.items():
        mine = [(prefix + (g.policy or g.label), g) for prefix, g in members if (prefix, g) not in once]
        if not mine:
            continue
        out[point] = mine + [(prefix + f"{g.policy} (run once)", g) for prefix, g in once]
    return out


def _policy_colours(names: list[str]) -> dict[str, str]:
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
             "tab:cyan"]
    out: dict[str, str] = {}
    for name in dict.fromkeys(names):
        bound = BOUNDS.get(name)
        out[name] = bound[0] if bound else cycle[len([n for n in out if n not in BOUNDS]) % len(cycle)]
    return out


def _bound_style(policy: str | None) -> dict[str, Any]:
    bound = BOUNDS.get(policy or "")
    return {"linestyle": bound[1], "linewidth": 1.4} if bound else {}


def _sample_points(job: str, metric: str, title: str, series: list[tuple[str, list[float]]], unit: str,
                   raw: int) -> Plot:
    series = series[:MAX_LINES]
    fig, ax = new(max(2.2, 0.45 * len(series) + 1.4))
    for row, (_, values) in enumerate(series):
        ax.scatter(values, [row] * len(values), s=28, alpha=0.75, zorder=3)
        for q, name in ((0, "min"), (50, "median"), (100, "max")):
            v = percentile(values, q)
            ax.annotate(f"{name} {v:.4g}", (v, row), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=7)
    ax.set_yticks(range(len(series)), [label for label, _ in series], fontsize=7)
    ax.set_ylim(-0.6, len(series) - 0.2)
    values = [v for _, vs in series for v in vs]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"{title} ({unit})")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"{job}: {title}, every sample")
    counts = sorted({len(vs) for _, vs in series})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return finish(fig, f"{job}-{metric}-samples", f"{job}: {title} per policy, every sample",
                  f"{n} samples per series, fewer than {MIN_CDF_SAMPLES}: each sample is a point, not a CDF; "
                  "labels give the min, median and max" + (f"; {raw} series, identical ones once" if raw > len(series)
                                                          else ""),
                  kind="points", facts={"samples": [len(vs) for _, vs in series], "merged_from": raw})


def headline_bars(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    """The job's headline figure per policy and sweep point: the median of the runs' figures, with the 95% CI of
    their mean as an error bar (groups of one run have none)."""
    key, name, unit = headline([g for _, g in labelled])
    if key is None:
        return None
    shown = [(prefix + g.label, figure_stats(g)[key]) for prefix, g in labelled][:MAX_LINES]
    shown = [(label, st) for label, st in shown if st.n]
    if not shown:
        return None
    scale = scale_for([st.median for _, st in shown], unit)
    ylabel = f"{name} ({scale.unit})" if scale.unit and scale.unit != "fraction" else name
    fig, ax = new()
    medians = [scale(st.median) for _, st in shown]
    low = [scale(st.median - st.ci_low) if st.has_ci else 0.0 for _, st in shown]
    high = [scale(st.ci_high - st.median) if st.has_ci else 0.0 for _, st in shown]
    ax.bar(range(len(shown)), medians, yerr=[[max(0.0, v) for v in low], [max(0.0, v) for v in high]], capsize=4,
           color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown], rotation=20, ha="right", fontsize=7)
    if wide_range(medians):
        ax.set_yscale("log")  # one policy 40x the others: on a linear axis the rest are slivers
        ylabel += ", log scale"
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{job}: {name} per policy, 95% CI over runs")
    runs = sorted({st.n for _, st in shown})
    return finish(fig, f"{job}-{key}-per-policy", f"{job}: {name} per policy with 95% CI",
                  f"bars: median of the runs' figures; error bars: 95% CI of their mean; runs per bar: "
                  f"{', '.join(map(str, runs))}" + (f"; {_cut(len(labelled))}" if _cut(len(labelled)) else ""),
                  kind="bars")


def hit_bars(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    tiers = list(dict.fromkeys(t for _, g in labelled for t in g.tiers_of("hit_ratio")))
    shown = [(prefix + g.label, g) for prefix, g in labelled
             if any(g.values("hit_ratio", t) for t in tiers)][:MAX_LINES]
    if not tiers or not shown:
        return None
    fig, ax = new()
    width = 0.8 / len(tiers)
    for j, tier in enumerate(tiers):
        xs = [i + (j - (len(tiers) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(xs, [g.mean("hit_ratio", tier) if g.values("hit_ratio", tier) else 0 for _, g in shown], width,
               label=tier)
    ax.set_xticks(range(len(shown)), [label for label, _ in shown], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("hit ratio (share of KV block reads)")
    ax.legend(title="tier")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{job}: hits served per tier")
    return finish(fig, f"{job}-hits-per-tier", f"{job}: hit ratio per tier", _cut(len(labelled)), kind="bars")


def migrations_over_time(job: str, labelled: list[tuple[str, Group]]) -> Plot | None:
    metric = next((m for m in MIGRATION_METRICS
                   if any(r.metric == m and "time_s" in r.params for _, g in labelled for r in g.rows)), None)
    if metric is None:
        return None
    lines = []
    for prefix, g in labelled:
        points: dict[float, list[float]] = {}
        for r in g.rows:
            if r.metric == metric and "time_s" in r.params and math.isfinite(r.value):
                points.setdefault(float(r.params["time_s"]), []).append(r.value)
        if points and len(lines) < MAX_LINES:
            xs = sorted(points)
            lines.append((prefix + g.label, xs, [sum(points[x]) / len(points[x]) for x in xs]))  # mean over reps
    unit = MIGRATION_UNITS.get(metric, "blocks")
    scale = scale_for([y for _, _, ys in lines for y in ys], unit)
    fig, ax = new()
    for label, xs, ys in lines:
        ax.plot(xs, [scale(y) for y in ys], label=label)
    what = "migration rate" if metric in MIGRATION_UNITS else metric.replace("_", " ")
    ax.set_xlabel("time since the run began (s)")
    ax.set_ylabel(f"{what} ({scale.unit})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{job}: {what} over time")
    return finish(fig, f"{job}-{metric}-over-time", f"{job}: {what} over time, window by window",
                  "mean over repetitions", kind="lines")


def wide_range(values: list[float], ratio: float = 30.0) -> bool:
    """Positive figures spanning more than `ratio`: drawn on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > ratio


def _cut(n: int) -> str:
    return f"the first {MAX_LINES} of {n} series are drawn" if n > MAX_LINES else ""
