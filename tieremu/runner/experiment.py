"""Running one experiment spec end to end and writing its result folder."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tieremu.numa.topology import Topology, discover
from tieremu.runner import manifest
from tieremu.runner.results import ResultDir
from tieremu.runner.spec import ExperimentSpec
from tieremu.tiers.check import TierCheck, check_tiers
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
    resolved = resolve(spec.tier_map, topology)  # an unresolvable map fails here, before a folder exists
    with ResultDir(out_root, spec.name) as out:
        out.write_json("manifest.json", manifest.collect(
            topology, experiment=spec.name, spec=str(spec.source), tier_map=str(spec.tier_map.source),
            tiers=tier_resolution(resolved),
        ).to_dict())
        checks = check_tiers(resolved, spec.check_mib << 20)
        hops = []
        if spec.roundtrip is not None:
            rt = spec.roundtrip
            hops = run_roundtrip(resolved, list(rt.route), rt.size_mib << 20, rt.seed)
        rows = [{"kind": "check", "origin": _check_origin(c), **c.to_dict()} for c in checks]
        rows += [{"kind": "migration", **h.to_dict()} for h in hops]
        out.write_text("metrics.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
        out.write_text("summary.csv", _summary_csv(hops))
    return ExperimentResult(out.final, topology, resolved, checks, hops)


def tier_resolution(resolved: ResolvedTierMap) -> list[dict[str, object]]:
    return [
        {"tier": t.name, "backing": t.label, "origin": t.backing.origin, "nodes": list(t.nodes),
         "requested_nodes": list(t.spec.nodes), "policy": t.spec.policy.name.lower(), "reason": t.reason,
         "emulation_targets": t.spec.emulate.describe() if t.spec.emulate else None}
        for t in resolved.tiers
    ]


def _check_origin(check: TierCheck) -> str:
    return "emulated" if check.backing == "emulated" else "measured"


def _summary_csv(hops: list[Hop]) -> str:
    buf = io.StringIO()
    fields = ["source", "target", "target_node", "origin", "backing", "pages", "moved", "already", "failed",
              "seconds", "gb_per_s", "fraction_on_target", "checksum_ok", "note"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for h in hops:
        writer.writerow(h.to_dict() | {"failed": sum(h.failed.values())})
    return buf.getvalue()
