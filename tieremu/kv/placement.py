"""Where a new block goes: a placement vector (FlexGen), fastest-first with spill, or layers pinned to tiers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tieremu.errors import KVError


class Occupancy(Protocol):
    """What a placement needs to know of the pool."""

    @property
    def memory_tiers(self) -> Sequence[str]: ...  # memory tiers, fastest first (the pool spills on to files)
    def used(self, tier: str) -> int: ...
    def room(self, tier: str) -> int: ...


class Placement(Protocol):
    def choose(self, pool: Occupancy, layer: int | None) -> str:
        """The tier for a new block (of `layer`, in the per-layer layout). The pool spills down the tier order
        if the choice is full."""
        ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Spill:
    """Fastest tier with room first: what a serving engine does when it fills HBM, then DRAM, then the rest."""

    def choose(self, pool: Occupancy, layer: int | None) -> str:
        tiers = pool.memory_tiers
        return next((t for t in tiers if pool.room(t) > 0), tiers[0])

    def describe(self) -> str:
        return "fastest tier first, spill down"


@dataclass(frozen=True)
class Vector:
    """A fraction of blocks per tier (FlexGen's placement vector), kept as blocks are created: each new block
    goes to the tier furthest below its share."""

    fractions: Mapping[str, float]

    def choose(self, pool: Occupancy, layer: int | None) -> str:
        total = sum(pool.used(t) for t in self.fractions) + 1
        open_tiers = [t for t in self.fractions if pool.room(t) > 0] or list(self.fractions)
        return max(open_tiers, key=lambda t: self.fractions[t] * total - pool.used(t))

    def describe(self) -> str:
        return "vector " + ", ".join(f"{t} {f:.0%}" for t, f in self.fractions.items())


@dataclass(frozen=True)
class PinnedLayers:
    """Each layer's blocks on a named tier (per-layer layout): e.g. the first layers in DRAM, the rest in CXL."""

    by_layer: Mapping[int, str]
    default: str = field(default="")

    def choose(self, pool: Occupancy, layer: int | None) -> str:
        if layer is None:
            raise KVError("pinned_layers placement needs the per-layer block layout (blocks of one layer)")
        return self.by_layer.get(layer, self.default or pool.memory_tiers[0])

    def describe(self) -> str:
        groups: dict[str, list[int]] = {}
        for layer, tier in sorted(self.by_layer.items()):
            groups.setdefault(tier, []).append(layer)
        return "layers pinned: " + "; ".join(f"{t} {v}" for t, v in groups.items())


class Directed:
    """Whatever tier the driver set last: for a cache whose blocks a placement policy admits (execute-mode replay,
    the engine connector's store), where the driver makes room in a tier and then allocates the block there."""

    def __init__(self, first: str, who: str) -> None:
        self.target = first
        self.who = who

    def choose(self, pool: Occupancy, layer: int | None) -> str:
        return self.target

    def describe(self) -> str:
        return f"where the {self.who} admits each block"


def placement_from(value: str | Mapping[str, object], tiers: Sequence[str], layers: int) -> Placement:
    """From config: `spill`, `{vector: {dram: 0.5, cxl: 0.5}}` or `{pinned_layers: {dram: [0, 1], cxl: [2, 3]}}`."""
    if value == "spill":
        return Spill()
    if isinstance(value, Mapping) and len(value) == 1:
        (kind, body), = value.items()
        if kind == "vector" and isinstance(body, Mapping):
            return _vector(body, tiers)
        if kind == "pinned_layers" and isinstance(body, Mapping):
            return _pinned(body, tiers, layers)
    raise KVError(f"placement {value!r} is not understood; valid: 'spill', {{vector: {{TIER: FRACTION, ...}}}}, "
                  f"{{pinned_layers: {{TIER: [LAYER, ...], ...}}}} with tiers {', '.join(tiers)}")


def _vector(body: Mapping[str, object], tiers: Sequence[str]) -> Vector:
    fractions = {}
    for tier, f in body.items():
        if tier not in tiers:
            raise KVError(f"placement vector names tier {tier!r}; memory tiers: {', '.join(tiers)}")
        if not isinstance(f, int | float) or not 0 <= f <= 1:
            raise KVError(f"placement vector fraction for {tier!r} is {f!r}; give a number from 0 to 1")
        fractions[tier] = float(f)
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise KVError(f"placement vector fractions sum to {sum(fractions.values()):g}, not 1: {fractions}")
    return Vector(fractions)


def _pinned(body: Mapping[str, object], tiers: Sequence[str], layers: int) -> PinnedLayers:
    by_layer: dict[int, str] = {}
    for tier, group in body.items():
        if tier not in tiers:
            raise KVError(f"pinned_layers names tier {tier!r}; memory tiers: {', '.join(tiers)}")
        if not isinstance(group, list) or not all(isinstance(x, int) and 0 <= x < layers for x in group):
            raise KVError(f"pinned_layers[{tier}] is {group!r}; give a list of layer numbers 0..{layers - 1}")
        for layer in group:
            if layer in by_layer:
                raise KVError(f"pinned_layers puts layer {layer} on both {by_layer[layer]!r} and {tier!r}")
            by_layer[layer] = tier
    missing = [x for x in range(layers) if x not in by_layer]
    if missing:
        raise KVError(f"pinned_layers leaves layers {missing} without a tier; pin every layer 0..{layers - 1}")
    return PinnedLayers(by_layer)
