"""The report's figures from rows written here: units per magnitude, identical curves drawn once, too few samples
drawn as points, one CDF panel per sweep point, an axis with its data in a corner seen as such, the
bandwidth-latency plot's idle points and modelled curves, and the machine line. (The whole page, from a real run, in
headless Chromium: tests/test_report_html.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tieremu.record.row import MetricRow
from tieremu.record.runs import RunRecord
from tieremu.report.bandwidth import bandwidth_latency, modelled
from tieremu.report.figure import finish, new
from tieremu.report.html import machine_line
from tieremu.report.load import ResultSet
from tieremu.report.plots import facets, latency_cdf, merge_identical
from tieremu.report.tables import Group, noise_reasons
from tieremu.report.units import scale_for


@pytest.mark.parametrize(("values", "unit", "shown", "factor"), [
    ([0.012, 0.009], "GB/s", "MB/s", 1e3),  # migration rates of 0.01 GB/s read as 12 MB/s
    ([3.5, 20.0], "GB/s", "GB/s", 1.0),
    ([0.0004], "s", "µs", 1e6),
    ([2500.0, 8000.0], "ms", "s", 1e-3),
    ([0.2, 0.9], "ms", "µs", 1e3),
    ([150.0], "ns", "ns", 1.0),
    ([3 * 2 ** 30], "B", "GiB", 2.0 ** -30),
    ([0.5], "fraction", "fraction", 1.0),  # not a family: kept
    ([], "GB/s", "GB/s", 1.0),
])
def test_units_are_chosen_per_magnitude(values: list[float], unit: str, shown: str, factor: float) -> None:
    scale = scale_for(values, unit)
    assert scale.unit == shown and scale.factor == pytest.approx(factor)
    if values and scale.unit != unit:
        assert 1 <= sorted(scale(v) for v in values)[len(values) // 2] < 1000


def _group(policy: str, point: int, ttfts: list[float]) -> Group:
    labels = (("policy", policy), ("fast_capacity_blocks", point))
    run = f"replay-{policy}-{point}"
    rows = tuple(MetricRow(run, "replay", "ttft_ms", v, "ms", "simulated", seq=i) for i, v in enumerate(ttfts))
    return Group("replay", labels, (run,), 1, rows)


def _samples(n: int, scale: float = 1.0) -> list[float]:
    return [scale * 10 ** (1 + 3 * i / n) for i in range(n)]  # 10 ms .. 10 s


def test_identical_curves_are_drawn_once_under_all_their_names() -> None:
    same, other = _samples(40), _samples(40, 2.0)
    merged = merge_identical([("lru", same), ("belady", list(reversed(same))), ("all-slowest", other)])
    assert [name for name, _ in merged] == ["lru = belady (identical)", "all-slowest"]


def test_a_cdf_is_on_a_log_axis_with_a_panel_per_sweep_point_and_the_run_once_bounds_in_each() -> None:
    gs = [("", _group(p, c, _samples(40, 1 + i / 10))) for c in (25, 400) for i, p in enumerate(("lru", "belady"))]
    gs += [("", _group("all-fastest", 25, _samples(40, 0.9))), ("", _group("all-slowest", 25, _samples(40, 3)))]
    panels = facets(gs)
    assert list(panels) == ["fast_capacity_blocks=25", "fast_capacity_blocks=400"]
    assert [name for name, _ in panels["fast_capacity_blocks=400"]] == ["lru", "belady", "all-fastest (run once)",
                                                                        "all-slowest (run once)"]
    plot = latency_cdf("replay", gs, "ttft_ms", "TTFT")
    assert plot is not None and plot.kind == "cdf" and plot.meta()["panels"] == 2
    for x, _ in plot.axes:
        assert x.scale == "log" and x.coverage is not None and x.coverage > 0.8  # 10 ms .. 30 s: no empty decades


def test_a_few_samples_are_drawn_as_points_with_their_values() -> None:
    gs = [("", _group(p, 25, [537.8, 789.7, 816.3, 1033.0 + i])) for i, p in enumerate(("lru", "all-fastest"))]
    plot = latency_cdf("decode", gs, "ttft_ms", "TTFT")
    assert plot is not None and plot.kind == "points" and plot.name == "decode-ttft_ms-samples"
    assert "fewer than 20: each sample is a point, not a CDF" in plot.caption
    svg = plot.svg.decode()
    assert "min 537.8" in svg and "max 1034" in svg and "median" in svg


def test_an_axis_with_its_data_in_a_corner_is_seen() -> None:
    """What the Chromium test checks, on a figure drawn the way the old replay CDF was: 0-19 s, data below 1 s."""
    fig, ax = new()
    ax.plot([0.02, 0.3, 0.9], [0.1, 0.5, 1.0])
    ax.set_xlim(0, 19)
    x, y = finish(fig, "corner", "corner").axes[0]
    assert x.coverage is not None and x.coverage < 0.05
    assert y.coverage == pytest.approx(1 / 1.1, rel=0.01)  # matplotlib's 5% margins either side


def _probe_result(tmp_path: Path) -> ResultSet:
    run = "probe-r0"
    rows = [MetricRow(run, "probe", "latency_ns", 100.0, "ns", "measured", "dram"),
            MetricRow(run, "probe", "read_gb_per_s", 12.0, "GB/s", "measured", "dram"),
            MetricRow(run, "probe", "latency_ns", 250.0, "ns", "emulated", "cxl"),
            MetricRow(run, "probe", "read_gb_per_s", 8.0, "GB/s", "emulated", "cxl")]
    rows += [MetricRow(run, "probe", "loaded_latency_ns", 100.0 + 5 * t, "ns", "measured", "dram", seq=i,
                       params={"mix": "100/0", "traffic_gb_per_s": float(t), "memory_node": 0})
             for i, t in enumerate((0, 2, 6, 10))]
    model = {"tier": "cxl", "mode": "emulated", "host_node": 0, "extra_latency_ns": 150.0,
             "target_bandwidth_gbps": {"read": 8.0, "write": 6.0, "copy": 8.0}}
    tiers = [{"tier": "dram", "backing": "real", "reason": "node 0 exists", "timing_model": None},
             {"tier": "cxl", "backing": "emulated", "reason": "node 1 missing", "timing_model": model}]
    manifest: dict[str, Any] = {"hostname": "vm", "cpu_model": "AMD EPYC", "cpus": 2, "kernel": "Linux 6.18",
                                "in_vm": False, "git_revision": "abc", "git_dirty": False,
                                "extra": {"runs": [{"run_id": run, "job": "probe"}], "tiers": tiers}}
    record = RunRecord(run, "probe", {}, "done", 1.0, None, steal_fraction=0.02)
    return ResultSet(tmp_path, manifest, rows, [record])


def test_bandwidth_latency_idle_points_sit_at_zero_traffic_and_emulated_tiers_get_modelled_curves(
        tmp_path: Path) -> None:
    result = _probe_result(tmp_path)
    plot = bandwidth_latency([result])
    assert plot is not None and plot.meta()["modelled"] == ["cxl"]
    [(x, y)] = plot.axes
    # the idle points are at 0 traffic (left of or on every curve), the one-thread read bandwidths are ceilings
    assert x.data == (0.0, 12.0) and y.data == (100.0, 100.0 + 5 * 6 + 150)
    assert "cxl 100/0 (emulated: modelled)" in plot.series and "dram 100/0 (measured)" in plot.series
    assert "cxl = dram measured + 150 ns, traffic ≤ 8.0 GB/s" in plot.caption
    from tieremu.report.bandwidth import curves_of, models_of

    [curve] = modelled(curves_of(result), models_of(result))[0]
    # the host's curve shifted by the model's extra latency, cut at its read bandwidth (10 GB/s > 8 GB/s)
    assert curve.points == ((0.0, 250.0), (2.0, 260.0), (6.0, 280.0))


def test_an_emulated_tier_without_a_host_curve_is_said_to_have_none(tmp_path: Path) -> None:
    result = _probe_result(tmp_path)
    result.manifest["extra"]["tiers"][1]["timing_model"]["host_node"] = 3
    plot = bandwidth_latency([result])
    assert plot is not None and plot.meta()["modelled"] == []
    assert "no curve for cxl: no measured curve of its host node 3 to model it from" in plot.caption


def test_the_machine_line_says_what_the_manifest_and_the_runs_know(tmp_path: Path) -> None:
    line = machine_line(_probe_result(tmp_path))
    assert line.startswith("machine: host name vm, CPU AMD EPYC, 2 CPUs, kernel Linux 6.18; ")
    assert "inside tieremu's QEMU guest: no" in line and "hypervisor steal time seen in 1 of 1 runs" in line
    assert "in VM: False" not in line


def test_noisy_runs_reasons_are_summarised_once_per_kind() -> None:
    whys = [["other processes used 88% of the CPUs > 25%", "load average 16.79 on 2 CPUs before"],
            ["other processes used 75% of the CPUs > 25%", "load average 11.5 on 2 CPUs before"], ["steal 7% > 5%"],
            ["odd {reason}"]]
    assert noise_reasons(whys) == ("other processes used 75%-88% of the CPUs > 25% (2 runs); load average 11.5-16.79 "
                                   "on 2 CPUs before (2 runs); steal 7% > 5% (1 run); odd {reason} (1 run)")
