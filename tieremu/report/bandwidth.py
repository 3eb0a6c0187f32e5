"""The probe's bandwidth-latency plot: chase latency against the background traffic the other CPUs generate, per tier
and read/write mix (as Mess and MLC `--loaded_latency` draw it).

- A curve's first point is its idle point: no traffic, so its bandwidth coordinate is 0. The probe's idle latency of
  each tier (one thread, no traffic) is drawn there too, and the tier's one-thread read bandwidth, a ceiling rather
  than a point of the curve, as a vertical line: a tier's idle point can never sit right of its own loaded curve.
- An emulated tier has no memory of its own to load: its accesses are the host node's plus the model's fixed extra
  latency per access, and its traffic is paced to the model's bandwidth. Its curve is therefore modelled, not
  measured: the host node's measured curve shifted up by the extra latency and cut at the model's read bandwidth,
  drawn dashed and labelled "modelled". Where the host has no measured curve (one CPU) none is drawn, and the caption
  says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tieremu.report.figure import XONLY, Plot, finish, new
from tieremu.report.load import ResultSet
from tieremu.report.units import scale_for

MAX_LINES = 16
MIX_MARKERS = {"100/0": "o", "75/25": "^", "50/50": "s"}


@dataclass(frozen=True)
class Curve:
    tier: str
    mix: str
    origin: str
    node: int | None  # the memory node the curve was measured on
    points: tuple[tuple[float, float], ...]  # (traffic GB/s, latency ns), by traffic
    modelled_from: str = ""  # the measured curve an emulated tier's curve is derived from, with the model's terms


@dataclass(frozen=True)
class Model:
    tier: str
    host_node: int
    extra_latency_ns: float
    read_gbps: float


def curves_of(result: ResultSet) -> list[Curve]:
    found: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    nodes: dict[tuple[str, str, str], int | None] = {}
    for r in result.rows:
        if r.metric == "loaded_latency_ns" and "traffic_gb_per_s" in r.params and r.tier is not None \
                and math.isfinite(r.value):
            key = (r.tier, str(r.params.get("mix", "")), r.origin)
            found.setdefault(key, []).append((float(r.params["traffic_gb_per_s"]), r.value))
            node = r.params.get("memory_node")
            nodes[key] = int(node) if isinstance(node, int) else None
    return [Curve(t, mix, origin, nodes[(t, mix, origin)], tuple(sorted(points)))
            for (t, mix, origin), points in found.items()]


def models_of(result: ResultSet) -> list[Model]:
    """The timing model of every emulated tier, as the manifest recorded it (after the run's anchor)."""
    out = []
    for tier_map in result.tier_maps.values():
        for t in tier_map.get("tiers", []):
            model = t.get("timing_model")
            if isinstance(model, dict) and t.get("backing") == "emulated":
                out.append(Model(t["tier"], int(model["host_node"]), float(model["extra_latency_ns"]),
                                 float(model["target_bandwidth_gbps"]["read"])))
    return out


def modelled(measured: list[Curve], models: list[Model]) -> tuple[list[Curve], list[str]]:
    """Each emulated tier's curve from its host node's measured curves; the tiers that have none, and why."""
    curves, missing = [], []
    for m in models:
        host = [c for c in measured if c.node == m.host_node and c.origin != "emulated"]
        if not host:
            missing.append(f"{m.tier}: no measured curve of its host node {m.host_node} to model it from")
            continue
        for c in host:
            points = tuple((x, y + m.extra_latency_ns) for x, y in c.points if x <= m.read_gbps)
            curves.append(Curve(m.tier, c.mix, "emulated", m.host_node, points,
                                f"{c.tier} measured + {m.extra_latency_ns:.0f} ns, traffic ≤ {m.read_gbps:.1f} GB/s"))
    return curves, missing


def idle_figures(result: ResultSet) -> dict[str, dict[str, float]]:
    idle: dict[str, dict[str, float]] = {}
    for r in result.rows:
        if r.job == "probe" and r.metric in ("latency_ns", "read_gb_per_s") and r.tier is not None:
            idle.setdefault(r.tier, {})[r.metric] = r.value
    return idle


def bandwidth_latency(results: list[ResultSet]) -> Plot | None:
    drawn: list[tuple[str, Curve, dict[str, float]]] = []  # (folder prefix, curve, the tier's idle figures)
    missing: list[str] = []
    for i, result in enumerate(results):
        prefix = f"{chr(ord('A') + i)}: " if len(results) > 1 else ""
        measured = curves_of(result)
        if not measured:
            continue
        model_curves, why = modelled(measured, models_of(result))
        idle = idle_figures(result)
        drawn += [(prefix, c, idle.get(c.tier, {})) for c in measured + model_curves if c.points]
        missing += [prefix + w for w in why]
    if not drawn:
        return None
    drawn = drawn[:MAX_LINES]
    scale = scale_for([y for _, c, _ in drawn for _, y in c.points], "ns")
    fig, ax = new(5.0)
    colours = _colours(dict.fromkeys(prefix + c.tier for prefix, c, _ in drawn))
    for prefix, c, _ in drawn:
        emulated = bool(c.modelled_from)
        label = f"{prefix}{c.tier} {c.mix} " + ("(emulated: modelled)" if emulated else f"({c.origin})")
        ax.plot([x for x, _ in c.points], [scale(y) for _, y in c.points], marker=MIX_MARKERS.get(c.mix, "o"),
                markersize=4, color=colours[prefix + c.tier], linestyle="--" if emulated else "-", label=label)
    seen: set[str] = set()
    for prefix, c, idle in drawn:
        key = prefix + c.tier
        if key in seen:
            continue
        seen.add(key)
        if "latency_ns" in idle:
            ax.scatter([0.0], [scale(idle["latency_ns"])], marker="D", s=40, zorder=4, color=colours[key],
                       edgecolors="black", label=f"{key}: idle latency (probe, 1 thread, no traffic)")
        if "read_gb_per_s" in idle:
            ceiling = ax.axvline(idle["read_gb_per_s"], color=colours[key], linestyle=":", linewidth=1.2,
                                 label=f"{key}: one-thread read bandwidth {idle['read_gb_per_s']:.1f} GB/s")
            ceiling.set_gid(XONLY)
    ax.set_xlabel("background traffic (GB/s); 0: idle")
    ax.set_ylabel(f"chase latency ({scale.unit})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Bandwidth-latency (probe)")
    caption = ("solid: measured loaded latency per read/write mix; dashed: an emulated tier's modelled curve (its "
               "host's measured curve plus the model's extra latency, cut at its modelled read bandwidth); diamonds: "
               "each tier idle at 0 traffic; dotted verticals: each tier's one-thread read bandwidth")
    models = dict.fromkeys(f"{prefix}{c.tier} = {c.modelled_from}" for prefix, c, _ in drawn if c.modelled_from)
    if models:
        caption += "; modelled: " + "; ".join(models)
    if missing:
        caption += "; no curve for " + "; ".join(missing)
    return finish(fig, "bandwidth-latency", "Bandwidth-latency curves from the probe", caption,
                  kind="bandwidth-latency", facts={"modelled": sorted({c.tier for _, c, _ in drawn
                                                                         if c.modelled_from})})


def _colours(keys: dict[str, None]) -> dict[str, Any]:
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    return {k: cycle[i % len(cycle)] for i, k in enumerate(keys)}
