"""Token economics: what serving a trace costs, from prices per instance-hour and per GB-hour of each tier.

cost = span_hours * (instances * instance_price_per_hour + instances * sum over tiers of capacity_GB * price)
cost per million tokens = cost / (input + output tokens served) * 1e6; tokens per dollar is its inverse * 1e6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tieremu.errors import ConfigError


@dataclass(frozen=True)
class Prices:
    instance_per_hour: float
    tier_per_gb_hour: tuple[float, ...]  # per tier, fastest first

    def __post_init__(self) -> None:
        for value in (self.instance_per_hour, *self.tier_per_gb_hour):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"price {value!r} must be a number >= 0 (per hour, or per GB-hour)")


@dataclass(frozen=True)
class Economics:
    cost: float  # dollars over the span
    cost_per_mtok: float
    tokens_per_dollar: float
    span_h: float


def economics(prices: Prices, *, instances: int, tier_bytes: Sequence[int], span_s: float,
              tokens: int) -> Economics:
    """Cost of `instances` instances each holding `tier_bytes` of KV capacity per tier for `span_s`."""
    if len(tier_bytes) != len(prices.tier_per_gb_hour):
        raise ConfigError(f"{len(prices.tier_per_gb_hour)} tier prices for {len(tier_bytes)} tiers")
    span_h = span_s / 3600.0
    per_instance = prices.instance_per_hour + math.fsum(
        b / 1e9 * p for b, p in zip(tier_bytes, prices.tier_per_gb_hour, strict=True))
    cost = span_h * instances * per_instance
    per_mtok = cost / tokens * 1e6 if tokens else math.inf
    return Economics(cost=cost, cost_per_mtok=per_mtok, tokens_per_dollar=tokens / cost if cost > 0 else math.inf,
                     span_h=span_h)
