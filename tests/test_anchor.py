"""Emulation anchored to the run: the run-start re-measure replaces a cached calibration that is off by more than
5% (both recorded), timing models resolve their ratios against it, and a round trip's rate is bytes over the hop's
wall time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tieremu.numa.topology import discover
from tieremu.probe.calibrate import anchor, anchored
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve
from tieremu.tiers.timing import Calibration

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _cached(latency_ns: float, read_gbps: float) -> Calibration:
    node = discover("/").memory_nodes[0]
    return Calibration(machine="test", created_utc="2026-01-01T00:00:00+00:00", node=node, latency_ns=latency_ns,
                       bandwidth_gbps={"read": read_gbps, "write": read_gbps / 2, "copy": read_gbps / 3},
                       latency_by_node={node: latency_ns}, read_gbps_by_node={node: read_gbps})


def test_a_stale_cache_is_replaced_by_the_runs_own_figures_and_both_are_kept() -> None:
    topo = discover("/")
    stale = _cached(latency_ns=5000.0, read_gbps=500.0)  # no memory here is that slow, nor that fast
    cal, record = anchor(stale, topo, working_set=64 * MIB, repeats=2)
    assert record.refreshed and (record.cached_latency_ns, record.cached_read_gbps) == (5000.0, 500.0)
    assert cal.latency_ns == record.run_latency_ns < 5000 and cal.latency_by_node[cal.node] == record.run_latency_ns
    assert cal.bandwidth_gbps["read"] == pytest.approx(record.run_read_gbps)
    scale = record.run_read_gbps / 500.0
    assert cal.bandwidth_gbps["write"] == pytest.approx(250.0 * scale)  # every kernel scaled alike
    # the timing model of a 2.2x tier now targets 2.2x the run's own latency
    cxl = resolve(load_tier_map(REPO / "configs/tiers/cxl-expander.yaml"), topo, calibration=cal)
    model = next(t.timing for t in cxl.tiers if t.name == "cxl" and t.timing is not None)
    assert model.target_latency_ns == pytest.approx(2.2 * record.run_latency_ns)


def test_a_cache_within_tolerance_is_kept_for_the_same_slowdown_on_every_run() -> None:
    cached = _cached(200.0, 20.0)
    cal, record = anchored(cached, working_set=256 * MIB, latency_ns=209.0, read_gbps=19.2)  # 4.5%, 4% off
    assert cal is cached and not record.refreshed
    assert (record.run_latency_ns, record.cached_latency_ns, record.working_set) == (209.0, 200.0, 256 * MIB)
    cal, record = anchored(cached, working_set=256 * MIB, latency_ns=200.0, read_gbps=18.8)  # bandwidth 6% off
    assert record.refreshed and cal.latency_ns == 200.0 and cal.bandwidth_gbps["read"] == 18.8


def test_round_trip_rate_is_bytes_over_the_hops_wall_time(memory_nodes: tuple[int, ...]) -> None:
    from tieremu.probe.calibrate import measure_calibration
    from tieremu.tiers.emulation import DelayInjector
    from tieremu.workloads.roundtrip import run_roundtrip

    topo = discover("/")
    cal = measure_calibration(topo, latency_bytes=32 * MIB, bandwidth_bytes=64 * MIB, repeats=2)
    resolved = resolve(load_tier_map(REPO / "configs/tiers/cxl-expander.yaml"), topo, calibration=cal)
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], cal)
    hops = run_roundtrip(resolved, ["dram", "cxl", "far"], 8 * MIB, 0, injector)
    for h in hops:
        assert h.seconds >= h.injected_seconds  # the wall time holds the injected delay and the migration
        moved = h.pages * 4096 if h.origin == "emulated" else None
        if moved is not None:
            assert h.gb_per_s == pytest.approx(moved / h.seconds / 1e9)
    assert dataclasses.asdict(hops[0])["seconds"] > 0


def test_the_probe_stage_anchors_every_later_run_and_the_manifest_says_so(tmp_path: Path,
                                                                          memory_nodes: tuple[int, ...]) -> None:
    import json

    from tieremu.runner.experiment import run_experiment
    from tieremu.runner.spec import load_experiment

    if len(memory_nodes) > 1:
        pytest.skip("no tier of cxl-expander.yaml is emulated on a multi-node machine")
    spec = tmp_path / "a.yaml"
    spec.write_text(f"name: a\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\nprobe: true\nrepetitions: 1\n"
                    "jobs:\n  - {kind: roundtrip, route: [dram, cxl, far], size_mib: 8, check_mib: 1}\n")
    result = run_experiment(load_experiment(spec), tmp_path / "out", report=False)
    assert not result.failed, result.failed
    extra = json.loads((result.path / "manifest.json").read_text())["extra"]
    taken = extra["calibration_anchor"]
    rows = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    probe_dram = next(r for r in rows if r["metric"] == "latency_ns" and r["tier"] == "dram")
    # the anchor is the probe's own local figure, and the manifest's calibration took it when the cache was off
    assert taken["run_latency_ns"] == probe_dram["value"] and taken["working_set"] == 256 * MIB
    assert extra["calibration_cached"]["latency_ns"] == taken["cached_latency_ns"]
    run_latency = extra["calibration"]["latency_ns"]
    assert run_latency == (taken["run_latency_ns"] if taken["refreshed"] else taken["cached_latency_ns"])
    models = {t["tier"]: t["timing_model"] for t in extra["tiers"] if t["timing_model"]}
    assert models["cxl"]["target_latency_ns"] == pytest.approx(2.2 * run_latency)
    # the later run (the round trip) was resolved against the same figure
    audits = [r for r in rows if r["job"] == "roundtrip" and r["metric"] == "injected_delay_s"]
    assert audits and all(a["params"]["local_latency_ns"] == run_latency for a in audits)
    ratios = {(r["tier"], r["metric"]): r for r in rows if r["metric"].endswith("_ratio")}
    assert set(ratios) == {(t, m) for t in ("cxl", "far") for m in ("latency_ratio", "read_bw_ratio")}
    cxl = ratios[("cxl", "latency_ratio")]
    assert cxl["params"]["target_ratio"] == pytest.approx(2.2) and cxl["params"]["local"] == probe_dram["value"]
    assert cxl["value"] == pytest.approx(cxl["params"]["achieved"] / probe_dram["value"])
