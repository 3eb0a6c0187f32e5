"""A placement-and-migration round trip of a KV-sized tensor through a route of tiers.

The tensor is placed on the first tier, filled, then migrated hop by hop along the route and back, with
the kernel asked where every page is and the data checksummed after each hop. It is the smallest end-to-end
proof that the tier map is enforced and that migration neither loses nor corrupts data.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from tieremu.errors import PlacementError
from tieremu.numa.pages import MigrationResult
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.region import Region, allocate
from tieremu.tiers.resolve import ResolvedTier, ResolvedTierMap


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
    seconds: float  # wall time of the hop: page migration plus any delay injected for emulated ends
    injected_seconds: float  # delay injected for emulated or shaped ends (0 between real tiers)
    gb_per_s: float
    fraction_on_target: float
    checksum_ok: bool
    note: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def run_roundtrip(resolved: ResolvedTierMap, route: list[str], nbytes: int, seed: int = 0,
                  injector: DelayInjector | None = None) -> list[Hop]:
    """Place, fill, then migrate along route and back; emulated ends are charged through the injector."""
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
            hops.append(_hop(region, source, target, checksum, injector))
        return hops
    finally:
        region.close()


def _hop(region: Region, source: ResolvedTier, target: ResolvedTier, checksum: int,
         injector: DelayInjector | None) -> Hop:
    if len(target.nodes) != 1:
        raise PlacementError(f"tier {target.name}: a round trip migrates to one node, but the tier spans "
                             f"nodes {list(target.nodes)}")
    node = target.nodes[0]
    start = time.perf_counter()  # the hop's wall time: the migration and the emulated ends' delay, as a user waits
    result: MigrationResult = region.migrate(node)
    injected = _charge_emulated_ends(injector, source, target, result.pages * result.page_size)
    seconds = time.perf_counter() - start
    fraction = region.placement().fraction_on((node,))
    emulated = "emulated" in (source.backing.origin, target.backing.origin)
    notes = []
    if result.moved == 0 and result.already == result.pages:
        notes.append(f"no page moved: tiers {source.name} and {target.name} share node {node}")
    if injected:
        notes.append(f"{injected * 1e3:.1f} ms injected for the emulated end(s)")
    moved_bytes = result.bytes_moved if not emulated else result.pages * result.page_size
    return Hop(
        source=source.name, target=target.name, target_node=node,
        origin="emulated" if emulated else "measured", backing=target.label,
        pages=result.pages, moved=result.moved, already=result.already, failed=result.failed,
        busy_rechecked=result.busy_rechecked, seconds=seconds, injected_seconds=injected,
        gb_per_s=moved_bytes / seconds / 1e9 if seconds > 0 and moved_bytes else 0.0,
        fraction_on_target=fraction, checksum_ok=zlib.crc32(region.array) == checksum, note="; ".join(notes),
    )


def _charge_emulated_ends(injector: DelayInjector | None, source: ResolvedTier, target: ResolvedTier,
                          nbytes: int) -> float:
    """Bytes leave the source and land in the target: each emulated end costs its extra time; seconds."""
    if injector is None:
        return 0.0
    if injector.emulates(source.name):
        injector.transfer(source.name, nbytes, "read")
    if injector.emulates(target.name):
        injector.transfer(target.name, nbytes, "write")
    return injector.settle() / 1e9
