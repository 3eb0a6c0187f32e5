"""The bounds a replay result must respect, checked beside every simulate-mode replay: a result outside its bounds
is a bug in a policy or in the replay, and is flagged, never hidden.

- ceiling: no policy hits more than an unlimited cache (the share of references to a block seen before);
- belady: no demand cache's fastest tier hits more than Belady's MIN with bypass over the same tiers and pinning
  (it bounds demand caches only: a tiering daemon may prefetch, which MIN does not);
- budget: the migration GB/s never exceeds the run's budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tieremu.policy.belady import Belady
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, ceiling_hit_ratio

# Float sums of the same counts in another order may differ in the last bits; nothing else may.
SLACK = 1e-9


@dataclass(frozen=True)
class BoundCheck:
    bound: str  # ceiling | belady | budget
    metric: str  # what is compared: hit_ratio, fast_hit_ratio or migration_gbps
    value: float  # the result's
    limit: float  # the bound's
    within: bool

    def describe(self) -> str:
        verdict = "within" if self.within else "OUTSIDE ITS BOUND"
        return f"{self.metric} {self.value:.4g} vs {self.bound} {self.limit:.4g}: {verdict}"


def check(requests: Sequence[Request], tiers: Sequence[SimTier], result: ReplayResult,
          **simulate_args: object) -> list[BoundCheck]:
    """The bounds that apply to `result` (replayed with `simulate_args` over `tiers`); belady is replayed here."""
    checks = [_check("ceiling", "hit_ratio", result.hit_ratio, ceiling_hit_ratio(requests))]
    if result.family == "demand" and not result.capacity_lifted and result.policy != Belady.name:
        belady = simulate(requests, tiers, Belady(policy_context(requests)), pin=result.pinned,
                          budget_gbps=result.budget_gbps, **simulate_args)  # type: ignore[arg-type]
        checks.append(_check("belady", "fast_hit_ratio", result.fast_hit_ratio, belady.fast_hit_ratio))
    if result.budget_gbps is not None:
        checks.append(_check("budget", "migration_gbps", result.migration_gbps, result.budget_gbps))
    return checks


def _check(bound: str, metric: str, value: float, limit: float) -> BoundCheck:
    return BoundCheck(bound, metric, value, limit, value <= limit + SLACK)
