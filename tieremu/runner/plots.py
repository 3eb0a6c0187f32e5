"""Plots of probe results (matplotlib, headless), full page width, each written as PNG and as SVG beside it
(`latency_vs_size.png` and `latency_vs_size.svg`): the SVG for papers and pages, the PNG for slides and mail.

matplotlib is imported on first plot, not with the CLI: it costs ~0.4 s here and tens of seconds inside the
QEMU guest, where every command would otherwise pay it.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path
from typing import Any

from tieremu.safefile import atomic_write

WIDTH_IN, HEIGHT_IN = 11.0, 4.3  # the report's figure size (tieremu.report.figure): a page's width


@cache
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG
    import matplotlib.pyplot as plt

    return plt


def latency_vs_size(sweep: list[dict[str, Any]], path: Path, origin: str) -> Path:
    fig, ax = _plt().subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    for huge in (False, True):
        pts = sorted((p["size_bytes"], p["ns"]["median"], p["ns"]["min"], p["ns"]["max"])
                     for p in sweep if p["hugepages"] == huge)
        if not pts:
            continue
        sizes, med, lo, hi = zip(*pts, strict=True)
        ax.plot(sizes, med, marker="o", label="2 MiB THP" if huge else "4 KiB pages")
        ax.fill_between(sizes, lo, hi, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("working set (bytes)")
    ax.set_ylabel("load-to-use latency (ns)")
    ax.set_title(f"Pointer-chase latency vs size ({origin})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def bandwidth_heatmaps(matrix: dict[str, dict[str, dict[str, Any]]], path: Path, origin: str) -> Path:
    kernels = list(matrix)
    fig, axes = _plt().subplots(1, len(kernels), figsize=(WIDTH_IN, min(WIDTH_IN / len(kernels), HEIGHT_IN)),
                                squeeze=False)
    for ax, kernel in zip(axes[0], kernels, strict=True):
        rows = sorted(matrix[kernel], key=int)
        cols = sorted({c for r in rows for c in matrix[kernel][r]}, key=int)
        grid = [[matrix[kernel][r].get(c, {}).get("median", float("nan")) for c in cols] for r in rows]
        ax.imshow(grid, cmap="viridis")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("memory node")
        ax.set_ylabel("initiator node")
        ax.set_title(f"{kernel} GB/s")
    fig.suptitle(f"Bandwidth matrix, all threads of the initiator ({origin})")
    return _save(fig, path)


def loaded_curves(curves: dict[str, list[dict[str, Any]]], path: Path, origin: str) -> Path:
    fig, ax = _plt().subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    for mix, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["traffic_gb_per_s"])
        med = [p["latency_ns"]["median"] for p in pts]
        # Min-max bars: on shared machines a curve can be noisy, and the reader must see how much.
        err = [[m - p["latency_ns"]["min"] for m, p in zip(med, pts, strict=True)],
               [p["latency_ns"]["max"] - m for m, p in zip(med, pts, strict=True)]]
        ax.errorbar([p["traffic_gb_per_s"] for p in pts], med, yerr=err, marker="o", capsize=3,
                    label=f"{mix} read/write")
    ax.set_xlabel("background traffic (GB/s)")
    ax.set_ylabel("loaded latency (ns)")
    ax.set_title(f"Bandwidth-latency curves ({origin})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def migrate_bars(points: list[dict[str, Any]], path: Path, origin: str) -> Path:
    fig, ax = _plt().subplots(figsize=(max(WIDTH_IN, 0.9 * len(points)), HEIGHT_IN))
    labels = [f"{p['source']}→{p['target']}\n{'THP' if p['hugepages'] else '4K'} b{p['batch_pages']}" for p in points]
    x = range(len(points))
    ax.bar([i - 0.2 for i in x], [p["migrate_gb_per_s"]["median"] for p in points], width=0.4, label="move_pages")
    ax.bar([i + 0.2 for i in x], [p["copy_gb_per_s"]["median"] for p in points], width=0.4, label="memcpy")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"Migration vs copy between nodes ({origin})")
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """The PNG at `path` and the SVG beside it; returns the PNG's path."""
    fig.tight_layout()
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    fig.savefig(svg, format="svg")
    _plt().close(fig)
    atomic_write(path.with_suffix(".svg"), svg.getvalue())  # never through a planted link, never half a file
    return atomic_write(path, png.getvalue())
