"""The connector's tier map, resolved on this machine: tiers (real or emulated, labelled), the injector that makes
emulated tiers as slow as their timing models, the placement policy, and the node the engine's KV tensor goes to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tieremu.errors import ConfigError
from tieremu.policy.base import Policy
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap, resolve


@dataclass(frozen=True)
class StoreConfig:
    tiers: Path
    policy: str = "lru"
    policy_params: Mapping[str, object] = field(default_factory=dict)
    kv_tier: str | None = None  # the tier whose node holds the engine's own KV tensor


@dataclass
class ResolvedStoreConfig:
    config: StoreConfig
    tiers: ResolvedTierMap
    injector: DelayInjector | None
    policy: Policy
    kv_node: int | None
    kv_backing: str
    kv_note: str
    kv_tier_nodes: tuple[int, ...] = ()  # the nodes the tier map names for the KV tier (kv_node: where it really is)
    # Charges the engine's own attention reads of its KV tensor with the KV tier's timing model, when that tier is
    # emulated or shaped (its memory is host memory at host speed); None otherwise.
    kv_injector: DelayInjector | None = None


def open_tiers(config: StoreConfig) -> ResolvedStoreConfig:
    """Resolve the tier map here; emulated and shaped tiers get their timing models from the cached calibration
    (measured first if there is none), as execute-mode replay does."""
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration

    tier_map = load_tier_map(config.tiers)
    topo = discover()
    resolved = resolve(tier_map, topo)
    injector = None
    if resolved.any_emulated:
        cal = calibration(topo)
        resolved = resolve(tier_map, topo, calibration=cal)
        models = [t.timing for t in resolved.tiers if t.timing is not None]
        injector = DelayInjector(models, cal) if models else None
    if any(t.spec.is_cuda for t in resolved.tiers):
        raise ConfigError(f"{config.tiers}: cuda tiers are not supported by the vLLM CPU connector; use numa and "
                          "file tiers")
    policy = get_policy(config.policy, config.policy_params)
    kv_node, backing, note, tier_nodes, kv_injector = None, "default", "", (), None
    if config.kv_tier is not None:
        names = [t.name for t in resolved.tiers]
        if config.kv_tier not in names:
            raise ConfigError(f"--kv-tier {config.kv_tier!r}: no such tier in {config.tiers}; tiers: "
                              f"{', '.join(names)}")
        tier = resolved.tier(config.kv_tier)
        if tier.spec.is_file:
            raise ConfigError(f"--kv-tier {config.kv_tier!r} is a file tier; the engine's KV tensor needs memory "
                              f"(a numa tier): {', '.join(t.name for t in resolved.tiers if not t.spec.is_file)}")
        kv_node, backing, tier_nodes = tier.nodes[0], tier.backing.value, tuple(tier.spec.nodes)
        if tier.timing is not None:
            assert injector is not None  # an emulated or shaped tier has a timing model only with a calibration
            # A separate injector, so that its audit is the attention reads' alone (not the connector's loads).
            kv_injector = DelayInjector([tier.timing], injector.calibration)
            where = (f"asks for node(s) {', '.join(map(str, tier.spec.nodes))}, which this machine lacks"
                     if tier.backing.value == "emulated" else f"is node {kv_node} slowed to its targets")
            note = (f"--kv-tier {tier.name} {where}: the engine's KV tensor is on node {kv_node} and vLLM's attention "
                    f"reads it at that node's speed; tieremu charges those reads the tier's timing model (modelled: "
                    "bytes of KV each layer's attention reads x the tier's extra time per byte, plus its extra "
                    "latency per block, busy-waited after each layer; see kv_placement.attention_reads)")
    return ResolvedStoreConfig(config, resolved, injector, policy, kv_node, backing, note, tier_nodes, kv_injector)
