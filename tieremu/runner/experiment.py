"""Running one experiment spec end to end and writing its result folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tieremu.numa.topology import Topology, discover
from tieremu.probe.calibrate import calibration
from tieremu.runner import manifest
from tieremu.runner.results import ResultDir
from tieremu.runner.spec import ExperimentSpec
from tieremu.tiers.check import TierCheck, check_tiers
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.workloads.roundtrip import Hop, run_roundtrip


@dataclass(frozen=True)
class ExperimentResult:
    path: Path
    topology: Topology
    resolved: ResolvedTierMap
    checks: list[TierCheck]
    hops: list[Hop]


def run_experiment(spec: ExperimentSpec, out_root: Path) -> ExperimentResult:
    topology = discover()
    # Everything that can refuse (unknown nodes, impossible timing models) does so before a folder exists.
    resolved = resolve(spec.tier_map, topology)
    cal, injector = None, None
    if resolved.any_emulated:
        cal = calibration(topology)  # cached per machine: the same config means the same slowdown
        resolved = resolve(spec.tier_map, topology, calibration=cal)
        injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], cal)
    with ResultDir(out_root, spec.name) as out:
        out.write_json("manifest.json", manifest.collect(
            topology, experiment=spec.name, spec=str(spec.source), tier_map=str(spec.tier_map.source),
            tiers=tier_resolution(resolved), calibration=cal.to_dict() if cal else None,
        ).to_dict())
        checks = check_tiers(resolved, spec.check_mib << 20)
        hops = []
        if spec.roundtrip is not None:
            rt = spec.roundtrip
            hops = run_roundtrip(resolved, list(rt.route), rt.size_mib << 20, rt.seed, injector)
        rows = [{"kind": "check", "origin": _check_origin(c), **c.to_dict()} for c in checks]
        rows += [{"kind": "migration", **h.to_dict()} for h in hops]
        if injector is not None:
            rows += [{"kind": "emulation_audit", "origin": "emulated", **a.to_dict()}
                     for a in injector.audits.values()]
        out.write_text("metrics.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
        out.write_csv("summary.csv", [_summary_row(h) for h in hops])
    return ExperimentResult(out.final, topology, resolved, checks, hops)


def tier_resolution(resolved: ResolvedTierMap) -> list[dict[str, object]]:
    return [
        {"tier": t.name, "backing": t.label, "origin": t.backing.origin, "nodes": list(t.nodes),
         "requested_nodes": list(t.spec.nodes), "policy": t.spec.policy.name.lower(), "reason": t.reason,
         "emulation_targets": t.spec.emulate.describe() if t.spec.emulate else None,
         "timing_model": t.timing.to_dict() if t.timing else None}
        for t in resolved.tiers
    ]


def _check_origin(check: TierCheck) -> str:
    return "emulated" if check.backing == "emulated" else "measured"


def _summary_row(h: Hop) -> dict[str, object]:
    return {"source": h.source, "target": h.target, "target_node": h.target_node, "origin": h.origin,
            "backing": h.backing, "pages": h.pages, "moved": h.moved, "already": h.already,
            "failed": sum(h.failed.values()), "seconds": h.seconds, "injected_seconds": h.injected_seconds,
            "gb_per_s": h.gb_per_s, "fraction_on_target": h.fraction_on_target, "checksum_ok": h.checksum_ok,
            "note": h.note}
