"""The bounds a replay result must respect, checked beside every simulate-mode replay: a result outside its bounds
is a bug in a policy or in the replay, and is flagged, never hidden.

- ceiling: no policy hits more than an unlimited cache (the share of references to a block seen before);
- belady: no demand cache's fastest tier hits more than Belady's MIN with bypass over the same tiers and pinning
  (it bounds demand caches only: a tiering daemon may prefetch, which MIN does not);
- daemon-oracle: no tiering daemon's (or static placement's) fastest tier hits more than an oracle that may
  rearrange the fastest tier freely and at once at every epoch boundary, whatever the budget (`daemon_oracle`):
  between two boundaries a daemon's fastest tier changes only by admissions (new blocks, pushing victims down),
  so a block hit there was either in it when the epoch began (at most C blocks) or entered it by a (re)admission
  at one of its references in the epoch. So in each epoch the fastest tier serves at most, for every referenced
  block, its references after its first in the epoch, plus one first reference for each of at most C blocks that
  existed before the epoch. Every cost and budget only removes options, so this holds under any budget (and is
  loose under a tight one: it is not the best a budgeted daemon can do, only what none can beat);
- budget: the migration GB/s never exceeds the run's budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tieremu.policy.belady import Belady
from tieremu.workloads.simulate import (
    DEFAULT_EPOCH_S,
    ReplayResult,
    SimTier,
    arrival_times,
    epochs_due,
    policy_context,
    simulate,
)
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
    if result.family in ("daemon", "static") and not result.capacity_lifted and result.references:
        epoch_s = float(simulate_args.get("epoch_s", DEFAULT_EPOCH_S))  # type: ignore[arg-type]
        hits = daemon_oracle(requests, tiers[0].capacity_blocks, epoch_s)
        checks.append(_check("daemon-oracle", "fast_hit_ratio", result.fast_hit_ratio, hits / result.references))
    if result.budget_gbps is not None:
        checks.append(_check("budget", "migration_gbps", result.migration_gbps, result.budget_gbps))
    return checks


def daemon_oracle(requests: Sequence[Request], fast_capacity: int | None, epoch_s: float) -> int:
    """The most fastest-tier hits any tiering daemon can have on `requests` with a fastest tier of
    `fast_capacity` blocks (None: unlimited) and epochs of `epoch_s` (see the module docstring)."""
    arrivals = arrival_times(requests)
    if not arrivals:
        return 0
    start = arrivals[0]
    seen: set[int] = set()
    bound = 0
    group: dict[int, int] = {}  # references per block in the current epoch, first reference order
    current = 0
    for arrival, request in zip(arrivals, requests, strict=True):
        epoch = epochs_due(start, epoch_s, arrival)
        if epoch != current:
            bound += _epoch_bound(group, seen, fast_capacity)
            group, current = {}, epoch
        for block in request.hash_ids:
            group[block] = group.get(block, 0) + 1
    return bound + _epoch_bound(group, seen, fast_capacity)


def _epoch_bound(group: dict[int, int], seen: set[int], capacity: int | None) -> int:
    """One epoch's share of daemon_oracle; adds the epoch's blocks to `seen`."""
    existed = sum(1 for block in group if block in seen)
    seen.update(group)
    return sum(group.values()) - len(group) + (existed if capacity is None else min(capacity, existed))


def _check(bound: str, metric: str, value: float, limit: float) -> BoundCheck:
    return BoundCheck(bound, metric, value, limit, value <= limit + SLACK)
