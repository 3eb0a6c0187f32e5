"""Is my memory where I think it is? Allocate a small region per tier and ask the kernel where it landed.

File tiers and real device (cuda) tiers have no pages for the kernel to place: a block is written there and read
back instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tieremu.errors import CapabilityError, InvalidNodeError, NumaError, PlacementError, TieremuError
from tieremu.numa import syscalls
from tieremu.numa.pages import Placement
from tieremu.numa.sysfs import format_list
from tieremu.tiers.files import BlockFile
from tieremu.tiers.region import allocate
from tieremu.tiers.resolve import Backing, ResolvedTier, ResolvedTierMap

ENFORCED = "enforced"
EMULATED = "emulated"
NOT_ENFORCED = "not enforced"

DEFAULT_CHECK_BYTES = 4 << 20
BLOCK_CHECK_BYTES = 64 << 10


@dataclass(frozen=True)
class TierCheck:
    tier: str
    backing: str  # real | vm | emulated | shaped; a device tier's says which device: "real (cuda:0)"
    status: str  # enforced | emulated | not enforced
    nodes: tuple[int, ...]  # where the memory was asked to go
    achieved_fraction: float  # share of the region's pages found on those nodes
    placement: Placement | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "tier": self.tier, "backing": self.backing, "status": self.status, "nodes": list(self.nodes),
            "achieved_fraction": self.achieved_fraction, "reason": self.reason,
            "pages_by_node": self.placement.by_node if self.placement else {},
            "pages_absent": self.placement.absent if self.placement else {},
        }


def check_tiers(resolved: ResolvedTierMap, nbytes: int = DEFAULT_CHECK_BYTES) -> list[TierCheck]:
    return [check_tier(t, nbytes) for t in resolved.tiers]


def check_tier(tier: ResolvedTier, nbytes: int = DEFAULT_CHECK_BYTES) -> TierCheck:
    spec = tier.spec

    def verdict(status: str, fraction: float, placement: Placement | None, reason: str) -> TierCheck:
        return TierCheck(tier.name, tier.label, status, tier.nodes, fraction, placement, reason)

    if spec.is_file:
        return _check_file_tier(tier)
    if tier.device is not None:
        return _check_device_tier(tier, nbytes)
    try:
        region = allocate(nbytes, tier.nodes, spec.policy)
    except CapabilityError as exc:
        return verdict(NOT_ENFORCED, 0.0, None, f"no CAP_SYS_NICE: {exc}")
    except InvalidNodeError as exc:
        return verdict(NOT_ENFORCED, 0.0, None, f"node missing: {exc}")
    except NumaError as exc:
        return verdict(NOT_ENFORCED, 0.0, None, f"policy refused: {exc}")
    try:
        placement = region.placement()
    finally:
        region.close()

    fraction = placement.fraction_on(tier.nodes)
    if fraction < 1.0:
        return verdict(NOT_ENFORCED, fraction, placement,
                       f"only {fraction:.1%} of pages on node {format_list(tier.nodes)}: {placement.describe()}")
    if spec.policy in (syscalls.Policy.INTERLEAVE, syscalls.Policy.WEIGHTED_INTERLEAVE) and len(tier.nodes) > 1:
        unused = [n for n in tier.nodes if placement.by_node.get(n, 0) == 0]
        if unused:
            return verdict(NOT_ENFORCED, fraction, placement,
                           f"{spec.policy.name.lower()} left node {format_list(unused)} empty: {placement.describe()}")
    if tier.backing is Backing.EMULATED:
        return verdict(EMULATED, fraction, placement, tier.reason)
    return verdict(ENFORCED, fraction, placement, f"{placement.pages} of {placement.pages} pages on node "
                                                  f"{format_list(tier.nodes)} ({spec.policy.name.lower()})")


def _check_file_tier(tier: ResolvedTier) -> TierCheck:
    """Write a block to the tier's directory and read it back; O_DIRECT or not is stated."""
    assert tier.spec.path is not None
    region = allocate(BLOCK_CHECK_BYTES, policy=syscalls.Policy.DEFAULT)
    try:
        region.array[:] = np.arange(BLOCK_CHECK_BYTES, dtype=np.uint32).view(np.uint8)[:BLOCK_CHECK_BYTES]
        expected = region.array.copy()
        try:
            store = BlockFile(tier.spec.path, BLOCK_CHECK_BYTES, 1, name="check")
        except TieremuError as exc:
            return TierCheck(tier.name, tier.label, NOT_ENFORCED, (), 0.0, None, str(exc))
        try:
            store.write(0, region.addr)
            region.array[:] = 0
            store.read(0, region.addr)
        finally:
            store.close()
        same = bool((region.array == expected).all())
    finally:
        region.close()
    io = "O_DIRECT" if store.direct else "buffered (the filesystem refuses O_DIRECT: page cache speeds)"
    if not same:
        return TierCheck(tier.name, tier.label, NOT_ENFORCED, (), 0.0, None,
                         f"{tier.spec.path}: the block read back differs from the one written")
    return TierCheck(tier.name, tier.label, ENFORCED, (), 1.0, None, f"block written and read back in "
                     f"{tier.spec.path}, {io}")


def _check_device_tier(tier: ResolvedTier, nbytes: int) -> TierCheck:
    """Copy a pattern to the tier's device and back (an emulated cuda tier has no device: it is checked as the
    NUMA memory it lives in)."""
    import torch  # only a map with a real device tier needs it here

    assert tier.device is not None
    device = torch.device(tier.device)

    def verdict(status: str, fraction: float, reason: str) -> TierCheck:
        return TierCheck(tier.name, tier.describe_backing, status, (), fraction, None, reason)

    pattern = torch.arange(nbytes // 4, dtype=torch.int32)
    try:
        back = pattern.to(device).cpu()
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError when built without CUDA
        return verdict(NOT_ENFORCED, 0.0, f"cannot use {device}: {exc}")
    if not torch.equal(back, pattern):
        return verdict(NOT_ENFORCED, 0.0, f"{device}: the data read back differs from what was written")
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return verdict(ENFORCED, 1.0, f"{nbytes / (1 << 20):g} MiB written to {device}{name} and read back; device memory, "
                                  "no NUMA placement to verify")


def raise_unless_enforced(checks: list[TierCheck]) -> None:
    """For callers that must not carry on with unenforced placement."""
    bad = [c for c in checks if c.status == NOT_ENFORCED]
    if bad:
        raise PlacementError("; ".join(f"tier {c.tier}: {c.reason}" for c in bad))
