"""Figures against a numeric sweep axis, one line per policy, with the bounds drawn as bounds.

For every capacity sweep (an axis whose name holds "capacity"), the two figures every caching paper has: the fastest
tier's hit ratio against capacity and STAR (share of KV reads served outside the fastest tier) against capacity, with
the all-fastest / all-slowest placements and, where the sweep ran it, Belady's MIN (the offline optimal eviction of a
demand cache) drawn as labelled bounds. A bound that does not depend on the axis runs once (the sweep plans it once
across capacities) and is drawn as a level line across the axis. Every numeric axis also gets its job's headline
figure (TPOT p50, else TTFT p50, ...) against it, with the same bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tieremu.record.stats import Stats
from tieremu.report.figure import Plot, finish, new
from tieremu.report.tables import Group, figure_stats, figures
from tieremu.report.units import scale_for

# The headline figure of a job, by the first key its groups have: (key in figure_stats, name, unit of the figure).
HEADLINES = (("tpot_p50", "TPOT p50", "ms"), ("ttft_p50", "TTFT p50", "ms"), ("hit", "hit ratio", "fraction"),
             ("migration_gbps", "migration rate", "GB/s"))
# Bounds, how each is drawn and what it is.
BOUNDS = {
    "all-fastest": ("black", "--", "bound: all-fastest (every block in the fastest tier)"),
    "all-slowest": ("dimgray", ":", "bound: all-slowest (every block in the slowest tier)"),
    "belady": ("darkred", "-.", "bound: Belady MIN (offline optimal demand eviction)"),
}
MAX_LINES = 16


@dataclass
class _Line:
    name: str
    policy: str | None
    points: list[tuple[float, Stats]] = field(default_factory=list)


def headline(gs: list[Group]) -> tuple[str | None, str, str]:
    """(key, name, unit) of the first headline figure any of the groups has; (None, "", "") when none."""
    for key, name, unit in HEADLINES:
        if any(math.isfinite(figures(g)[key]) for g in gs):
            return key, name, unit
    return None, "", ""


def sweep_plots(job: str, labelled: list[tuple[str, Group]]) -> list[Plot]:
    gs = [g for _, g in labelled]
    plots: list[Plot | None] = []
    for axis in numeric_axes(gs):
        if "capacity" in axis:
            tier = fastest_tier(gs)
            hit_key = f"hit[{tier}]" if tier else "hit"
            hit_name = f"hit ratio of the fastest tier ({tier})" if tier else "hit ratio"
            plots.append(versus(job, labelled, axis, hit_key, hit_name, "fraction", name=f"{job}-hit-vs-{axis}",
                                note=f"{hit_name}: share of KV block reads served there; higher is better"))
            plots.append(versus(job, labelled, axis, "star", "STAR", "fraction", name=f"{job}-star-vs-{axis}",
                                note="STAR: share of KV reads served outside the fastest tier; lower is better"))
        key, name, unit = headline(gs)
        if key is not None and not (key == "hit" and "capacity" in axis):
            plots.append(versus(job, labelled, axis, key, name, unit))
    return [p for p in plots if p is not None]


def fastest_tier(gs: list[Group]) -> str | None:
    """The first tier with a per-tier hit ratio (rows list tiers in tier-map order, fastest first)."""
    return next((t for g in gs for t in g.tiers_of("hit_ratio")), None)


def numeric_axes(gs: list[Group]) -> list[str]:
    axes: dict[str, set[float]] = {}
    for g in gs:
        for k, v in g.labels:
            if k != "policy":
                number = isinstance(v, (int, float)) and not isinstance(v, bool)
                axes.setdefault(k, set()).add(float(v) if number else math.nan)
    return [k for k, vs in axes.items() if len(vs) >= 2 and all(math.isfinite(v) for v in vs)]


def axis_label(axis: str) -> str:
    """`fast_capacity_blocks` -> `fast capacity (blocks)`."""
    for suffix, unit in (("_blocks", "blocks"), ("_mib", "MiB"), ("_gib", "GiB"), ("_kib", "KiB"), ("_ms", "ms"),
                         ("_tokens", "tokens")):
        if axis.endswith(suffix):
            return f"{axis.removesuffix(suffix).replace('_', ' ')} ({unit})"
    return axis.replace("_", " ")


def versus(job: str, labelled: list[tuple[str, Group]], axis: str, key: str, what: str, unit: str, *,
           name: str | None = None, note: str = "") -> Plot | None:
    """`key` (median over runs, 95% CI bars) against `axis`, one line per policy and other labels; bounds dashed."""
    plot_name = name or f"{job}-{key}-vs-{axis}"
    lines = _lines(labelled, axis, key)
    xs = sorted({x for line in lines.values() for x, _ in line.points})
    if len(xs) < 2 or not any(len(line.points) >= 2 for line in lines.values()):
        return None
    scale = scale_for([st.median for line in lines.values() for _, st in line.points], unit)
    fig, ax = new()
    levels = []
    for line in list(lines.values())[:MAX_LINES]:
        line.points.sort(key=lambda p: p[0])
        bound = BOUNDS.get(line.policy or "")
        style: dict[str, Any] = {"color": bound[0], "linestyle": bound[1], "linewidth": 1.6} if bound else {}
        label = line.name if bound is None else line.name.replace(line.policy or "", bound[2], 1)
        if len(line.points) == 1 and bound is not None:
            # Planned once across the axis (it does not depend on it): a level line over the whole sweep.
            st = line.points[0][1]
            ax.plot([xs[0], xs[-1]], [scale(st.median)] * 2, label=f"{label}, run once: same at every {axis}",
                    **style)
            levels.append(line.policy)
        else:
            px = [x for x, _ in line.points]
            med = [scale(st.median) for _, st in line.points]
            err = [[scale(max(0.0, st.median - st.ci_low)) if st.has_ci else 0.0 for _, st in line.points],
                   [scale(max(0.0, st.ci_high - st.median)) if st.has_ci else 0.0 for _, st in line.points]]
            ax.errorbar(px, med, yerr=err, marker="o" if bound is None else "s", markersize=4, capsize=3,
                        label=label, **style)
    if xs[0] > 0 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)  # capacities are swept geometrically: equal steps on the page
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(axis_label(axis) + (", log scale" if ax.get_xscale() == "log" else ""))
    shown_unit = "" if scale.unit in ("fraction", "") else f" ({scale.unit})"
    medians = [st.median for line in lines.values() for _, st in line.points]
    if unit != "fraction" and min(medians) > 0 and max(medians) / min(medians) > 30:
        ax.set_yscale("log")  # one policy 40x the others: on a linear axis the rest are one line
        shown_unit += ", log scale"
    ax.set_ylabel(what + shown_unit)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{job}: {what} vs {axis_label(axis)}")
    bounds = sorted({line.policy for line in lines.values() if line.policy in BOUNDS})
    parts = [note] if note else []
    parts.append("points: median over runs, bars: 95% CI of the mean (two runs or more)")
    if bounds:
        parts.append("bounds drawn dashed: " + ", ".join(bounds))
    if levels:
        parts.append(f"{', '.join(levels)} ran once across {axis} (drawn level)")
    if len(lines) > MAX_LINES:
        parts.append(f"the first {MAX_LINES} of {len(lines)} series are drawn")
    return finish(fig, plot_name, f"{job}: {what} against {axis}", "; ".join(parts), kind="capacity"
                  if "capacity" in axis else "lines", facts={"axis": axis, "metric": key, "bounds": bounds})


def _lines(labelled: list[tuple[str, Group]], axis: str, key: str) -> dict[str, _Line]:
    lines: dict[str, _Line] = {}
    for prefix, g in labelled:
        labels = dict(g.labels)
        if axis not in labels:
            continue
        st = figure_stats(g).get(key)
        if st is None or not math.isfinite(st.median):
            continue
        rest = ", ".join(str(v) if k == "policy" else f"{k}={v}" for k, v in g.labels if k != axis)
        name = prefix + (rest or g.job)
        lines.setdefault(name, _Line(name, g.policy)).points.append((float(labels[axis]), st))
    return lines
