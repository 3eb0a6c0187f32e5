"""Carrying out a policy's plan on a live TieredKVCache: real page migrations or copies, under a byte budget.

Evictions come first, then moves in the plan's order (as simulate-mode replay does). Each move runs under the
cache's lock, so the workload never reads a block mid-move, and is checked again before anything happens:

- the block is gone (freed or evicted by the workload), pinned, already on its target, or no longer on the
  source the policy saw: skipped, with the reason counted;
- the target tier is full: the moving block is staged in it, pinned, and the policy is asked for a victim, which
  is pushed one tier down (making room there the same way) or, from the last tier, evicted if no sequence uses
  it. If no victim can be had, the move is skipped. Decisions are made first and carried out afterwards, deepest
  first, so nothing moves unless the whole chain fits. As in simulate, the moving block's departure frees its
  source slot for the chain, so a promotion and the demotion it causes can swap two blocks between full tiers;
- the kernel answers EBUSY for some pages: the move is tried again (`retries` times, yielding in between), then
  counted as failed; ENOMEM (per page, or NodeFullError) fails at once. Pages left half-way are migrated back
  to the block's tier, so a failed move leaves the block where it was, contents intact;
- some pages were already on the target (moved on their own, e.g. by the kernel's tiering): the move succeeds
  and is counted under `pages_already_there`.

`skipped` counts moves not attempted, `failed` moves the kernel (or the file system) refused; `reasons` says why.
A plan naming an unknown tier, moving the wrong way for its reason, or a victim that is not an unpinned block of
its tier is a bug in the policy: PolicyError, as in simulate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, field

from tieremu.daemon.room import LiveBoard
from tieremu.daemon.view import PoolView
from tieremu.errors import CapabilityError, KVError, NodeFullError, NumaError, PolicyError
from tieremu.kv.arena import NumaArena
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.pool import Block, MoveRecord
from tieremu.numa.syscalls import errno_name
from tieremu.policy.base import Move, Plan, Policy
from tieremu.policy.engine import Step, check_move, make_room

DEFAULT_RETRIES = 3


@dataclass
class PlanOutcome:
    moved: int = 0  # blocks moved, the plan's own moves and the demotions that made room for them
    failed: int = 0  # moves attempted that did not happen
    skipped: int = 0  # plan moves and evictions not attempted
    retried: int = 0  # extra attempts after EBUSY
    evicted: int = 0  # blocks dropped (the plan's evictions and victims pushed out of the last tier)
    bytes: int = 0  # block bytes moved
    seconds: float = 0.0
    records: list[MoveRecord] = field(default_factory=list)  # every attempt, failed ones included
    reasons: dict[str, int] = field(default_factory=dict)  # skip and failure reasons, and pages_already_there

    def count(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped += n
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.count(reason)

    def merge(self, other: PlanOutcome) -> None:
        """Add another outcome's counts and records to this one (a daemon's running total)."""
        for name in ("moved", "failed", "skipped", "retried", "evicted", "bytes", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.records.extend(other.records)
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n


@dataclass(frozen=True)
class _Step:
    ident: int
    source: str
    target: str | None  # None: evict


def execute_plan(cache: TieredKVCache, plan: Plan, view: PoolView, *, budget_bytes: int | None = None,
                 policy: Policy | None = None, retries: int = DEFAULT_RETRIES,
                 policy_lock: threading.RLock | None = None, own: Collection[int] = ()) -> PlanOutcome:
    """Carry out `plan` (see the module docstring). Moves stop once `budget_bytes` have moved (None: no limit);
    the rest are skipped as "budget". Without `policy`, a move into a full tier is skipped ("full"). The policy's
    victim() runs under `policy_lock` when given (the daemon's, so that no other thread is inside the policy).
    Blocks in `own` move although pinned: the driver's own request holds them (a demand cache's promotion on
    access); they are still never victims."""
    if budget_bytes is not None and budget_bytes < 0:
        raise PolicyError(f"budget_bytes={budget_bytes} must be 0 or more (None: unlimited)")
    if retries < 0:
        raise PolicyError(f"retries={retries} must be 0 or more")
    _check_moves(plan.moves, view, policy)
    return _Executor(cache, view, policy, retries, policy_lock, own).run(plan, budget_bytes)


def _check_moves(moves: list[Move], view: PoolView, policy: Policy | None) -> None:
    who = f"policy {policy.name}" if policy is not None else "the plan"
    for move in moves:
        check_move(move.block, move.source, move.target, move.reason, view.rank, who)


class _Executor:
    def __init__(self, cache: TieredKVCache, view: PoolView, policy: Policy | None, retries: int,
                 policy_lock: threading.RLock | None, own: Collection[int] = ()) -> None:
        self.cache = cache
        self.own = own
        self.pool = cache.pool
        self.view = view
        self.policy = policy
        self.retries = retries
        self.policy_lock = policy_lock or nullcontext()
        self.board = LiveBoard(view, self.pool.capacity, policy_lock)
        self.out = PlanOutcome()

    def run(self, plan: Plan, budget_bytes: int | None) -> PlanOutcome:
        t0 = time.perf_counter()
        for ident in plan.evictions:
            self._evict(ident)
        for i, move in enumerate(plan.moves):
            if budget_bytes is not None and self.out.bytes >= budget_bytes:
                self.out.skip("budget", len(plan.moves) - i)
                break
            self._move(move)
        self.out.seconds = time.perf_counter() - t0
        return self.out

    # -- one eviction, one move ------------------------------------------------------------------------------

    def _evict(self, ident: int) -> None:
        with self.cache.lock:
            block = self.view.block(ident)
            if block is None:
                self.out.skip("gone")
            elif self.view.pinned(ident):
                self.out.skip("pinned")
            elif block.refs:
                self.out.skip("in_use")  # a running sequence reads it: only unreferenced blocks can be dropped
            else:
                self.pool.evict(block)
                self.out.evicted += 1

    def _move(self, move: Move) -> None:
        with self.cache.lock:
            block = self.view.block(move.block)
            if block is None:
                return self.out.skip("gone")
            if self.view.pinned(move.block) and move.block not in self.own:
                return self.out.skip("pinned")
            if block.tier == move.target:
                return self.out.skip("already_there")
            if block.tier != move.source:
                return self.out.skip("not_in_source")
            steps = self._decide(move)
            if steps is not None:
                self._carry_out(steps, move.source)

    # -- deciding how to make room ---------------------------------------------------------------------------

    def _decide(self, move: Move) -> list[_Step] | None:
        """The steps that put the block on its target, deepest victim first, the move itself last; None (with the
        reason counted) if room cannot be made. Nothing is moved here: the view only shows the outcome (the
        placement engine's make_room on the live board)."""
        view, names = self.view, self.board.names
        chain: list[Step] = []
        with view.staging():
            view.stage(move.block, None)  # it leaves its source: that slot is free for the chain
            reason = make_room(self.board, self.policy, move.block, view.rank[move.target], chain)
        if reason is not None:
            self.out.skip(reason)
            return None
        return [*(_Step(b, names[f], None if t is None else names[t]) for b, f, t in chain),
                _Step(move.block, move.source, move.target)]

    # -- carrying it out ---------------------------------------------------------------------------------------

    def _carry_out(self, steps: list[_Step], source: str) -> None:
        pool = self.pool
        # The plan's block leaves `source` last, but the chain was decided with its slot free: lend the slot.
        pool.capacity[source] += 1
        try:
            for step in steps:
                block = self.view.block(step.ident)
                assert block is not None, "blocks cannot vanish while the executor holds the cache's lock"
                if step.target is None:
                    pool.evict(block)
                    self.out.evicted += 1
                elif not self._attempt(block, step.target):
                    if step is not steps[-1]:
                        self.out.skip("no_room")  # a victim would not move: the plan's move cannot happen
                    break
                self._tell(step)
        finally:
            pool.capacity[source] -= 1
        if pool.used(source) > pool.capacity[source]:
            self._give_back_lent_slot(steps, source)

    def _tell(self, step: _Step) -> None:
        """Report a move carried out to the policy, so that its rankings file the block where it now is."""
        if self.policy is not None:
            with self.policy_lock:
                self.policy.moved(step.ident, step.source, step.target)

    def _give_back_lent_slot(self, steps: list[_Step], source: str) -> None:
        """The plan's move failed after a victim had moved into its source: move that victim back up."""
        step = next((s for s in steps[:-1] if s.target == source), None)
        block = None if step is None else self.view.block(step.ident)
        if block is None or not self._attempt(block, step.source):
            self.out.count("over_capacity")

    def _attempt(self, block: Block, target: str) -> bool:
        """Move one block, retrying EBUSY; True if it reached the target."""
        record: MoveRecord | None = None
        for attempt in range(1 + self.retries):
            if attempt:
                self.out.retried += 1
                time.sleep(0)  # let whatever holds the page get on (the kernel itself retries a few times)
            try:
                record = self.pool.move(block, target)
            except NodeFullError:
                return self._failed(block, "enomem")
            except CapabilityError:
                return self._failed(block, "eperm")
            except NumaError as exc:
                return self._failed(block, errno_name(exc.errno).lower() if exc.errno else "numa")
            except (KVError, OSError):
                return self._failed(block, "error")
            self.out.records.append(record)
            if record.ok:
                self.out.moved += 1
                self.out.bytes += record.bytes
                if record.pages_already and not attempt:  # (on a retry, they are the earlier attempts' pages)
                    self.out.count("pages_already_there")
                return True
            if not all(_busy(name) for name in record.pages_failed):
                break
        assert record is not None
        return self._failed(block, _failure_reason(record.pages_failed))

    def _failed(self, block: Block, reason: str) -> bool:
        self.out.fail(reason)
        self._restore(block)
        return False

    def _restore(self, block: Block) -> None:
        """Pages a failed migration left on other nodes go back to the node of the block's tier."""
        arena = self.pool.arenas.get(block.arena)
        if not isinstance(arena, NumaArena) or self.pool.tiers[block.tier].spec.is_file:
            return
        home = self.pool.numa_node(block.tier)
        nodes = arena.page_nodes([block.slot])
        if bool((nodes[nodes >= 0] != home).any()):
            try:
                ok = arena.migrate(block.slot, home).ok
            except NumaError:
                ok = False
            if not ok:
                self.out.count("restore_incomplete")


def _busy(name: str) -> bool:
    """A page failure worth another try. pages.migrate asks again about pages answered EBUSY (huge pages report a
    subpage busy although they moved), so a page still busy comes back as "on node N": where it stayed."""
    return name == "EBUSY" or name.startswith("on node")


def _failure_reason(failed: dict[str, int]) -> str:
    if "ENOMEM" in failed:
        return "enomem"
    if failed and all(_busy(name) for name in failed):
        return "ebusy"
    return "+".join(sorted(name.lower() for name in failed if not _busy(name))) or "error"

