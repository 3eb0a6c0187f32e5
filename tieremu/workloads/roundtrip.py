"""A placement-and-migration round trip of a KV-sized tensor through a route of tiers.

The tensor is placed on the first tier, filled, then migrated hop by hop along the route and back, with
the kernel asked where every page is and the data checksummed after each hop. It is the smallest end-to-end
proof that the tier map is enforced and that migration neither loses nor corrupts data.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

from tieremu.errors import PlacementError
from tieremu.numa.pages import MigrationResult
from tieremu.tiers.region import Region, allocate
from tieremu.tiers.resolve import Backing, ResolvedTier, ResolvedTierMap


@dataclass(frozen=True)
class Hop:
    source: str
    target: str
    target_node: int
    origin: str  # measured | emulated: emulated when either end is an emulated tier
    backing: str  # the target tier's backing: real | vm | emulated
    pages: int
    moved: int
    already: int
    failed: dict[str, int]
    busy_rechecked: int
    seconds: float
    gb_per_s: float
    fraction_on_target: float
    checksum_ok: bool
    note: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def run_roundtrip(resolved: ResolvedTierMap, route: list[str], nbytes: int, seed: int = 0) -> list[Hop]:
    tiers = [resolved.tier(name) for name in route]
    first = tiers[0]
    region = allocate(nbytes, first.nodes, first.spec.policy)
    try:
        rng = np.random.default_rng(seed)
        region.array[:] = rng.integers(0, 256, size=region.nbytes, dtype=np.uint8)
        checksum = zlib.crc32(region.array)
        placed = region.placement().fraction_on(first.nodes)
        if placed < 1.0:
            raise PlacementError(f"tier {first.name}: only {placed:.1%} of the tensor landed on node {first.nodes}")
        hops = []
        for source, target in zip(tiers, tiers[1:] + tiers[:1], strict=True):
            hops.append(_hop(region, source, target, checksum))
        return hops
    finally:
        region.close()


def _hop(region: Region, source: ResolvedTier, target: ResolvedTier, checksum: int) -> Hop:
    if len(target.nodes) != 1:
        raise PlacementError(f"tier {target.name}: a round trip migrates to one node, but the tier spans "
                             f"nodes {list(target.nodes)}")
    node = target.nodes[0]
    result: MigrationResult = region.migrate(node)
    fraction = region.placement().fraction_on((node,))
    emulated = Backing.EMULATED in (source.backing, target.backing)
    note = ""
    if result.moved == 0 and result.already == result.pages:
        note = f"no-op: tiers {source.name} and {target.name} share node {node}"
    return Hop(
        source=source.name, target=target.name, target_node=node,
        origin="emulated" if emulated else "measured", backing=target.label,
        pages=result.pages, moved=result.moved, already=result.already, failed=result.failed,
        busy_rechecked=result.busy_rechecked, seconds=result.seconds, gb_per_s=result.gb_per_s,
        fraction_on_target=fraction, checksum_ok=zlib.crc32(region.array) == checksum, note=note,
    )
