"""Making room in a tier of a PoolView: the one "push the policy's victim one tier down" chain that execute-mode
replay and the engine connector's store both stage before they move any memory.

Simulate mode applies the same rule to its own counters (tieremu.workloads.simulate, and the compiled core), where
no memory moves and nothing needs staging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tieremu.daemon.view import PoolView
from tieremu.policy.base import Policy, checked_victim

# (block, from tier, to tier or None = out of the last tier), deepest move last: carried out in reverse.
Chain = list[tuple[int, str, str | None]]


def stage_fit(view: PoolView, policy: Policy, capacity: Mapping[str, int], names: Sequence[str], ident: int,
              tier: str, chain: Chain) -> bool:
    """Show block ident (in no tier) in `tier`; if that overfills it, push the policy's victim one tier down
    (recursively) or out of the last tier, recording each push in `chain`. False, with nothing staged, if the tier is
    full of pinned blocks. The newcomer is staged pinned before the policy is asked, so the policy never picks it."""
    used = view.used(tier)
    if used >= capacity[tier] and used <= view.pinned_in(tier):
        return False
    view.stage(ident, tier, pinned=True)
    if used < capacity[tier]:
        return True
    victim = checked_victim(policy, tier, view)
    view.stage(victim, None)
    rank = names.index(tier)
    if rank + 1 < len(names) and stage_fit(view, policy, capacity, names, victim, names[rank + 1], chain):
        chain.append((victim, tier, names[rank + 1]))
    else:
        chain.append((victim, tier, None))
    return True
