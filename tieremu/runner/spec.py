"""Experiment specs (`configs/experiments/*.yaml`), validated before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tieremu.configfile import Section, load_yaml, positive
from tieremu.tiers.config import TierMap, load_tier_map


@dataclass(frozen=True)
class RoundTripSpec:
    route: tuple[str, ...]
    size_mib: int
    seed: int


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str
    tier_map: TierMap
    check_mib: int
    roundtrip: RoundTripSpec | None
    source: Path


def load_experiment(path: str | Path) -> ExperimentSpec:
    doc = load_yaml(path)
    name = doc.get("name", str)
    description = doc.get("description", str, "")
    tier_map = load_tier_map(doc.relative_path(doc.get("tiers", str)))
    check = doc.section("check", default_empty=True)
    check_mib = check.get("region_mib", int, 4, check=positive)
    check.done()
    roundtrip = _roundtrip(doc.section("roundtrip"), tier_map) if doc.has("roundtrip") else None
    doc.done()
    return ExperimentSpec(name, description, tier_map, check_mib, roundtrip, doc.source)


def _roundtrip(s: Section, tier_map: TierMap) -> RoundTripSpec:
    names = list(tier_map.names)
    route = tuple(s.get("route", list, names))
    for i, tier in enumerate(route):
        if tier not in names:
            raise s.error(f"route[{i}]", f"{tier!r} is not a tier of {tier_map.name!r}; tiers: {', '.join(names)}")
    if len(route) < 2:
        raise s.error("route", f"{list(route)}: a round trip needs at least two tiers")
    spec = RoundTripSpec(route=route, size_mib=s.get("size_mib", int, 256, check=positive),
                         seed=s.get("seed", int, 0))
    s.done()
    return spec
