"""The placement engine (tieremu.policy.engine) on a live TieredKVCache: its Board over a PoolView, and the
admission that execute-mode replay and the engine connector's store both run before they write a new block.

The engine decides on the view's staging (the newcomer shown in its tier, pinned; victims shown where they are
headed) before any memory moves; then the chain is carried out deepest first with real page moves (or copies), so
each move has room. The daemon's executor (executor.py) drives the same board for plan moves and promotions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from tieremu.daemon.view import PoolView
from tieremu.errors import KVError, TieremuError
from tieremu.kv.cache import TieredKVCache
from tieremu.policy.base import Policy, checked_victim
from tieremu.policy.engine import Admission, admit, rank_in


class LiveBoard:
    """The engine's Board over a PoolView: shows are the view's staging, capacities the pool's (read live, so a
    slot the executor lends is seen)."""

    def __init__(self, view: PoolView, capacity: Mapping[str, int], policy_lock: threading.RLock | None = None) -> None:
        self.view = view
        self.names: Sequence[str] = list(view.pool.order)
        self.rank = dict(view.rank)
        self.capacity = capacity
        self.policy_lock: AbstractContextManager[object] = policy_lock or nullcontext()

    def used_in(self, rank: int) -> int:
        return self.view.used(self.names[rank])

    def capacity_of(self, rank: int) -> int | None:
        return self.capacity[self.names[rank]]

    def pinned_count(self, rank: int) -> int:
        return self.view.pinned_in(self.names[rank])

    def show(self, block: int, rank: int) -> None:
        self.view.stage(block, self.names[rank], pinned=True)

    def hide(self, block: int) -> None:
        self.view.stage(block, None)

    def pick_victim(self, policy: Policy, rank: int, newcomer: int) -> int:
        with self.policy_lock:
            return checked_victim(policy, self.names[rank], self.view)

    def droppable(self, block: int) -> bool:
        found = self.view.block(block)
        return found is not None and not found.refs  # out of the last tier means dropped: no sequence may need it

    def trial(self) -> AbstractContextManager[None]:
        return self.view.staging()


@dataclass
class ChainOutcome:
    demoted: int = 0  # victims pushed one tier down
    evicted: int = 0  # victims pushed out of the last tier (or dropped when their demotion failed)
    failed: int = 0  # demotions the kernel refused (those victims were dropped instead)


def admit_new(board: LiveBoard, policy: Policy, key: int) -> Admission:
    """Where a new block goes and the chain that makes room there (nothing moved yet); call under the cache's lock,
    so that nothing takes the room before the block lands in it. The policy is asked under its lock."""
    with board.policy_lock:
        wanted = rank_in(board.rank, policy.admit(key, board.view), f"policy {policy.name}")
        return admit(board, policy, key, wanted)


def carry_out_admission(cache: TieredKVCache, board: LiveBoard, policy: Policy, key: int, admission: Admission,
                        on_move: Callable[[int, str, str | None], None] | None = None) -> ChainOutcome:
    """Carry out an admission's chain, deepest first, so each move has room; a demotion the kernel refuses drops
    the victim instead (the newcomer's room must be made, and the victim was going down anyway). Every push, and
    where the newcomer went if not where the policy admitted it, is told to the policy, as simulate tells it."""
    out = ChainOutcome()
    names = board.names
    for ident, source, target in admission.chain:
        block = board.view.block(ident)
        if block is None:
            raise KVError(f"victim block {ident} vanished while the cache's lock was held")
        if target is not None:
            try:
                ok = cache.move(block, names[target]).ok
            except (TieremuError, OSError):
                ok = False
            if ok:
                out.demoted += 1
                _tell(board, policy, ident, names[source], names[target], on_move)
                continue
            out.failed += 1
        cache.pool.evict(block)
        out.evicted += 1
        _tell(board, policy, ident, names[source], None, on_move)
    if admission.rank != admission.wanted:  # the tiers it was admitted to were full of pinned blocks
        placed = None if admission.rank is None else names[admission.rank]
        _tell(board, policy, key, names[admission.wanted], placed, None)
    return out


def _tell(board: LiveBoard, policy: Policy, ident: int, source: str, target: str | None,
          on_move: Callable[[int, str, str | None], None] | None) -> None:
    with board.policy_lock:
        policy.moved(ident, source, target)
    if on_move is not None:
        on_move(ident, source, target)

