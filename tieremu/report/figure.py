"""One drawn figure: SVG (inlined in the page, scales to its width) and PNG (for slides and mail), with what its axes
show written down beside it, so a check can tell an axis spent on empty range from one the data fills.

matplotlib is imported on first plot: it costs about half a second, which `tieremu report` without plots and
every worker process would otherwise pay.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any

WIDTH_IN, HEIGHT_IN = 11.0, 4.3  # a page's width: the figure is drawn at the width it is shown at
PNG_DPI = 110
XONLY, YONLY = "xonly", "yonly"  # gid of a line that spans the axes one way (a bandwidth ceiling): one data axis


@dataclass(frozen=True)
class AxisFacts:
    """What one axis shows: its scale and limits, and the range the drawn data takes on it."""

    label: str
    scale: str  # linear | log
    limits: tuple[float, float]
    data: tuple[float, float] | None  # None: nothing drawn on this axis

    @property
    def coverage(self) -> float | None:
        """Share of the axis (in its own scale: decades on a log axis) that the data spans; None for one value."""
        if self.data is None or self.data[0] == self.data[1]:
            return None
        f = _log if self.scale == "log" else float
        span = f(self.limits[1]) - f(self.limits[0])
        return (f(self.data[1]) - f(self.data[0])) / span if span else None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "scale": self.scale, "limits": list(self.limits),
                "data": None if self.data is None else list(self.data), "coverage": self.coverage}


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: plots/<name>.svg and plots/<name>.png
    title: str
    svg: bytes
    png: bytes
    caption: str = ""
    kind: str = ""  # cdf | points | bars | lines | capacity | bandwidth-latency
    axes: tuple[tuple[AxisFacts, AxisFacts], ...] = ()
    series: tuple[str, ...] = ()  # the legend's entries
    facts: dict[str, Any] = field(default_factory=dict)  # what a reader or a check needs beyond the axes

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "kind": self.kind, "series": list(self.series),
                "axes": [{"x": x.to_dict(), "y": y.to_dict()} for x, y in self.axes], **self.facts}


@cache
def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG: searchable, selectable, small
    import matplotlib.pyplot as pyplot

    return pyplot


def new(height: float = HEIGHT_IN) -> tuple[Any, Any]:
    """A full-width figure with one axes."""
    return plt().subplots(figsize=(WIDTH_IN, height))


def finish(fig: Any, name: str, title: str, caption: str = "", *, kind: str = "",
           facts: dict[str, Any] | None = None) -> Plot:
    """Lay out, read the axes' facts, render SVG and PNG, close the figure."""
    fig.tight_layout()
    svg, png = io.BytesIO(), io.BytesIO()
    fig.savefig(svg, format="svg")  # drawn: the limits are final from here on
    axes = tuple((_facts(ax, "x"), _facts(ax, "y")) for ax in fig.axes if ax.get_visible() and ax.has_data())
    series = tuple(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
    fig.savefig(png, format="png", dpi=PNG_DPI)
    plt().close(fig)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return Plot(safe, title, svg.getvalue(), png.getvalue(), caption, kind, axes, series, dict(facts or {}))


def _facts(ax: Any, which: str) -> AxisFacts:
    low, high = ax.get_xlim() if which == "x" else ax.get_ylim()
    label = ax.get_xlabel() if which == "x" else ax.get_ylabel()
    scale = ax.get_xscale() if which == "x" else ax.get_yscale()
    values = [v for v in _data(ax, which) if math.isfinite(v) and (scale != "log" or v > 0)]
    data = (min(values), max(values)) if values else None
    return AxisFacts(label, scale, (float(min(low, high)), float(max(low, high))), data)


def _data(ax: Any, which: str) -> list[float]:
    """Every data coordinate drawn on one axis: lines, markers, error bars, bars (from their base)."""
    from matplotlib.collections import LineCollection, PathCollection, PolyCollection
    from matplotlib.patches import Rectangle

    i = 0 if which == "x" else 1
    skip = YONLY if which == "x" else XONLY  # a line spanning the axes along this axis has no data on it
    out: list[float] = []
    for line in ax.get_lines():
        if line.get_gid() != skip and line.get_visible():
            out += [float(p[i]) for p in line.get_xydata()]
    for coll in ax.collections:
        if isinstance(coll, PathCollection):
            out += [float(p[i]) for p in coll.get_offsets()]
        elif isinstance(coll, LineCollection):
            out += [float(p[i]) for seg in coll.get_segments() for p in seg]
        elif isinstance(coll, PolyCollection):
            out += [float(p[i]) for path in coll.get_paths() for p in path.vertices]
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            start = patch.get_x() if which == "x" else patch.get_y()
            size = patch.get_width() if which == "x" else patch.get_height()
            out += [float(start), float(start + size)]
    return out


def _log(v: float) -> float:
    return math.log10(v) if v > 0 else -math.inf
